"""The training loop shared by the three stages, run under DeepSpeed.

`deepspeed stages/stage2_pretrain.py --config configs/X.yaml` on any number of GPUs or nodes, or plain
`python stages/stage2_pretrain.py --config ...` for one process (CPU or one GPU). Each optimiser step
reads `grad_accum` micro-batches of packed rows per process; checkpoints resume exactly (model,
optimiser, schedule, data position, RNG); the end result is exported in our native layout.
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import shutil
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from ..checkpoint import load_model, save_model
from ..data.codes import CodeCache, make_image_codes_fn
from ..data.mixture import Mixture
from ..data.packing import Batch, Packer, PackedStream, collate
from ..data.prefetch import Prefetcher
from ..data.sequences import SampleBuilder
from ..models.attention import Documents
from ..models.unified import IGNORE, JanusModel
from ..processing.tokenizer import Tokenizer
from .checkpointing import CheckpointManager
from .config import KINDS, RunConfig, load_run_config
from .stages import apply_stage

# Dense bf16 tensor-core peaks (TFLOP/s) for the MFU estimate; the first name found in the device's wins.
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


class LossModule(nn.Module):
    """What DeepSpeed wraps: per-position losses [B, T] of a packed batch."""

    def __init__(self, model: JanusModel):
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> Tensor:
        hidden = self.model(
            batch.tokens, batch.image_mask, batch.pixels, batch.code_mask, batch.positions, Documents(batch.doc_ids)
        )
        return self.model.token_losses(hidden, batch.targets, batch.target_is_code)


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the process group the launcher describes; a plain `python` run is a group of one."""
    if "RANK" not in os.environ:
        with socket.socket() as s:  # a free port, so several single-process runs can share a machine
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def make_stream(cfg: RunConfig, model_cfg, vq: nn.Module, tokenizer: Tokenizer, rank: int) -> PackedStream:
    """Each rank draws its own mixture (seeded by rank), so ranks see different data. `vq` encodes
    generation images that the code cache lacks."""
    seed = cfg.train.seed + 1000 * rank
    caches = [CodeCache.load(directory) for directory in cfg.data.code_cache]
    builder = SampleBuilder(tokenizer, model_cfg, make_image_codes_fn(vq, caches), cfg.data.seq_len, cfg.data.uncond_prob, seed)
    sources = {kind: [f for pattern in paths for f in sorted(glob.glob(pattern)) or [pattern]] for kind, paths in cfg.data.sources.items()}
    return PackedStream(Mixture(sources, cfg.data.ratios, seed), builder, Packer(cfg.data.seq_len, tokenizer.pad_id))


def deepspeed_config(cfg: RunConfig, cuda: bool) -> dict:
    ds = cfg.deepspeed_config()
    ds.update(
        train_micro_batch_size_per_gpu=cfg.train.micro_batch_size,
        gradient_accumulation_steps=cfg.train.grad_accum,
        gradient_clipping=cfg.optim.grad_clip,
        steps_per_print=10**12,
    )
    if cuda:
        ds.setdefault("bf16", {"enabled": True})
    return ds


def lr_factor(step: int, cfg: RunConfig) -> float:
    """Learning-rate multiplier for 0-based optimiser step `step`: linear warm-up, then constant, then
    (with `optim.decay_steps`) a linear decay over the run's last steps, down to 1/decay_steps."""
    factor = min(1.0, (step + 1) / cfg.optim.warmup_steps) if cfg.optim.warmup_steps else 1.0
    decay = cfg.optim.decay_steps
    if decay and step >= cfg.train.steps - decay:
        factor *= (cfg.train.steps - step) / decay
    return factor


def flops_per_token(model: JanusModel, seq_len: int) -> float:
    """Training FLOPs per token: 6 x decoder parameters plus attention (the usual estimate)."""
    d = model.cfg.decoder
    params = sum(p.numel() for p in model.decoder.layers.parameters())
    return 6 * params + 12 * d.n_layers * d.dim * seq_len


def train(cfg: RunConfig, resume: bool = False) -> Path:
    """Run a stage to `cfg.train.steps` optimiser steps; returns the exported model directory."""
    rank, world, device = init_distributed()
    import deepspeed

    torch.manual_seed(cfg.train.seed)
    model = load_model(cfg.init_from, device="cpu", dtype=torch.float32)
    tokenizer = Tokenizer.from_dir(cfg.init_from)
    trainable = apply_stage(model, cfg.stage, cfg.trains)
    model.train()
    model.vq.eval()  # frozen tokenizer
    model.decoder.checkpoint_layers = cfg.train.activation_checkpointing
    # The data pipeline's own copy of the frozen VQ: ZeRO-3 partitions the model's parameters.
    data_vq = copy.deepcopy(model.vq).to(device)
    token_flops = flops_per_token(model, cfg.data.seq_len)  # before ZeRO-3 partitions the parameters away
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    engine, _, _, _ = deepspeed.initialize(
        model=LossModule(model), optimizer=optimizer, lr_scheduler=schedule, config=deepspeed_config(cfg, device.type == "cuda")
    )
    stream = make_stream(cfg, model.cfg, data_vq, tokenizer, rank)
    checkpoints = CheckpointManager(cfg.checkpoint.dir, cfg.checkpoint.keep, rank)
    step = 0
    if resume and checkpoints.latest() is not None:
        step, data_state = checkpoints.load(engine)
        stream.load_state_dict(data_state)
    rows = Prefetcher(stream, cfg.data.prefetch_rows) if cfg.data.prefetch_rows else stream
    log = Path(cfg.checkpoint.dir) / "metrics.jsonl"
    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(Path(cfg.checkpoint.dir) / "tensorboard"))
        print(f"stage {cfg.stage}: training {', '.join(trainable)} on {world} process(es), from step {step}")
    peak = cfg.train.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if device.type == "cuda" and k in torch.cuda.get_device_name(device)), None)

    autocast = cfg.train.cpu_autocast and device.type == "cpu"
    bar = tqdm(total=cfg.train.steps, initial=step, disable=rank != 0, desc=f"stage {cfg.stage}")
    while step < cfg.train.steps:
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]  # the rate this step uses (the schedule moves at its end)
        # per kind: loss sum and target count; last entry: tokens (non-padding positions)
        stats = torch.zeros(2 * len(KINDS) + 1, dtype=torch.float64, device=device)
        for _ in range(cfg.train.grad_accum):
            batch = collate([next(rows) for _ in range(cfg.train.micro_batch_size)]).to(device)
            with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                losses = engine(batch)
            counted = batch.targets != IGNORE
            engine.backward(losses.sum() / counted.sum().clamp(min=1))
            engine.step()
            for k in range(len(KINDS)):
                of_kind = counted & (batch.kinds == k)
                stats[2 * k] += (losses.detach() * of_kind).sum()
                stats[2 * k + 1] += of_kind.sum()
            stats[-1] += (batch.doc_ids >= 0).sum()
        step += 1
        dist.all_reduce(stats)
        stats = stats.cpu()
        seconds = time.perf_counter() - started
        if rank == 0:
            record = _step_record(step, stats, seconds, lr, token_flops, peak, world)
            with open(log, "a") as f:
                f.write(json.dumps(record) + "\n")
            for key, value in record.items():
                if key != "step" and value is not None:
                    writer.add_scalar(key, value, step)
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.train.steps:
                bar.set_postfix({k: f"{v:.3g}" for k, v in record.items() if k.startswith("loss") and v is not None})
        if step % cfg.checkpoint.every == 0 or step == cfg.train.steps:
            checkpoints.save(engine, step, rows.state_dict())
    bar.close()
    if rows is not stream:
        rows.close()
    if rank == 0:
        writer.close()
        if rows.skipped:
            print(f"skipped records: {rows.skipped}")
    return export(engine, model, cfg, rank)


def _step_record(step: int, stats: Tensor, seconds: float, lr: float, token_flops: float, peak: float | None, world: int) -> dict:
    sums = stats[:-1].view(len(KINDS), 2)
    record = {"step": step, "loss": float(sums[:, 0].sum() / sums[:, 1].sum().clamp(min=1)), "lr": lr}
    for k, kind in enumerate(KINDS):
        record[f"loss/{kind}"] = float(sums[k, 0] / sums[k, 1]) if sums[k, 1] > 0 else None
    tokens_per_s = float(stats[-1]) / seconds
    record["tokens_per_s"] = tokens_per_s
    record["mfu"] = tokens_per_s * token_flops / (peak * 1e12 * world) if peak else None
    return record


def export(engine, model: JanusModel, cfg: RunConfig, rank: int) -> Path:
    """Write the trained model in our native layout (with the tokenizer) to CHECKPOINT_DIR/export.

    In float32 training that is the module itself. Under bf16, DeepSpeed trains a bf16 copy of the
    module and keeps float32 masters in the optimiser: the export then takes the trainable weights from
    the masters and the frozen ones from `init_from`, so it stays float32 and frozen weights stay
    bit-identical from stage to stage (the VQ's codebook, which code caches are checked against).
    """
    import deepspeed

    out = Path(cfg.checkpoint.dir) / "export"
    params = list(model.parameters())
    if params[0].dtype == torch.float32:
        with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):
            if rank == 0:
                _save_export(model, out, cfg)
    else:
        full = load_model(cfg.init_from, device="cpu", dtype=torch.float32) if rank == 0 else None
        targets = dict(full.named_parameters()) if full is not None else {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            master = _fp32_master(engine, param)
            if master is None:
                raise RuntimeError(f"no float32 master weight for trainable parameter {name}")
            if rank == 0:
                with torch.no_grad():
                    targets[name].copy_(master)
        if rank == 0:
            _save_export(full, out, cfg)
    dist.barrier()
    return out


def _fp32_master(engine, param: nn.Parameter) -> Tensor | None:
    """The optimiser's float32 copy of a parameter trained in bf16. ZeRO-1/2/3 link it to the parameter
    (fetching it is a collective: every rank calls this); under ZeRO-0 DeepSpeed's unfused optimiser
    keeps the copies group by group."""
    from deepspeed.utils import safe_get_full_fp32_param

    master = safe_get_full_fp32_param(param)
    if master is None:
        optimizer = engine.optimizer
        for low, full in zip(getattr(optimizer, "fp16_groups", ()), getattr(optimizer, "fp32_groups", ())):
            master = next((copy for p, copy in zip(low, full) if p is param), None)
            if master is not None:
                break
    return master


def _save_export(model: JanusModel, out: Path, cfg: RunConfig) -> None:
    if out.exists():  # a resumed run exports again
        shutil.rmtree(out)
    save_model(model, out, "native", extra_files_from=cfg.init_from)


def main(stage: int) -> None:
    """Entry point of stages/stageN_*.py."""
    parser = argparse.ArgumentParser(description=f"Janus training, stage {stage}")
    parser.add_argument("--config", required=True, help="run config YAML")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # added by the launcher
    args = parser.parse_args()
    cfg = load_run_config(args.config, args.set, stage)
    if cfg.stage != stage:
        parser.error(f"{args.config} is a stage {cfg.stage} config; run it with stages/stage{cfg.stage}_*.py")
    out = train(cfg, resume=args.resume)
    if dist.get_rank() == 0:
        print(f"exported {out}")
    dist.destroy_process_group()
