"""Stage 0: training the VQ image tokenizer on a data set's images.

LlamaGen trains with L2 reconstruction, perceptual and PatchGAN losses; the last two need pretrained
networks we cannot download, so this trains what is possible offline: L2 reconstruction plus the
codebook and commitment losses (DESIGN.md §5). It reports reconstruction PSNR and codebook usage on
held-out images and writes the VQ's weights (official names, without the `gen_vision_model.` prefix).

`train: decoder` refits only the decoder of a trained VQ (`init_from`): the encoder and codebook stay
frozen, so every image keeps its codes and a model trained on those codes keeps working; it just gets
sharper pictures (`janus.train.assemble.refit_vq_decoder` puts the result into a model).

    python stages/stage0_vq.py --config configs/RUN.yaml [--set steps=4000]
"""

from __future__ import annotations

import json
import math
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..checkpoint import load_model
from ..data.records import read_records
from ..models.config import ConfigError, VQConfig
from ..models.vq import VQModel
from ..processing.image import preprocess_generation

WEIGHTS = "vq.safetensors"
TRAIN_PARTS = ("all", "decoder")
WARMUP_STEPS = 100


@dataclass
class VQRunConfig:
    train_data: list[str]  # manifests or tar shards of any kind: every image they hold is used
    heldout_data: list[str]
    out: str
    vq: dict = field(default_factory=dict)  # VQConfig fields
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    seed: int = 0
    eval_every: int = 500
    cpu_autocast: bool = False  # on CPU, bf16 autocast of the forward (fp32 weights, float32 code search)
    init_from: str | None = None  # a model checkpoint whose VQ training starts from; None: a fresh VQ
    train: str = "all"  # "all" | "decoder" (post_quant_conv and decoder only; needs init_from)
    lr_decay: bool = False  # cosine decay to a tenth of lr over the run (after a 100-step warm-up)

    def __post_init__(self):
        if self.train not in TRAIN_PARTS:
            raise ValueError(f"train must be one of {TRAIN_PARTS}, got {self.train!r}")
        if self.train == "decoder" and not self.init_from:
            raise ValueError("train: decoder refits a trained VQ's decoder: set init_from to the model checkpoint it comes from")


def load_images(paths: list[str], size: int) -> torch.Tensor:
    """All images of the records in `paths`, as generation targets [N, 3, size, size] in [-1, 1]."""
    skipped: Counter = Counter()
    images = [preprocess_generation(im, size) for p in paths for r in read_records(p, skipped) for im in r.images]
    if not images:
        raise ValueError(f"no readable images in {paths}")
    return torch.stack(images)


def learning_rate_factor(step: int, cfg: VQRunConfig) -> float:
    """Multiplier of cfg.lr at `step`: constant, or with lr_decay a linear warm-up then a cosine decay to 0.1."""
    if not cfg.lr_decay:
        return 1.0
    progress = min(step, cfg.steps) / cfg.steps
    return min(1.0, (step + 1) / WARMUP_STEPS) * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(vq: VQModel, images: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Reconstruction PSNR (pixels in [-1, 1], so the peak-to-peak range is 2) and the fraction of
    codebook entries the images use."""
    vq.eval()
    squared_error, used = 0.0, torch.zeros(vq.cfg.codebook_size, dtype=torch.bool)
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size]
        codes = vq.encode(x)
        used[codes.flatten().unique()] = True
        squared_error += float(((vq.decode(codes).clamp(-1, 1) - x) ** 2).sum())
    mse = squared_error / images.numel()
    vq.train()
    return {"psnr": 10 * torch.log10(torch.tensor(4.0 / mse)).item(), "codebook_usage": float(used.float().mean())}


@torch.no_grad()
def encode_all(vq: VQModel, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([vq.encode(images[start : start + batch_size]) for start in range(0, len(images), batch_size)])


def train_vq(cfg: VQRunConfig) -> dict[str, float]:
    """Train, evaluate every `eval_every` steps and at the end, write the weights; returns the final metrics."""
    torch.manual_seed(cfg.seed)
    vq_cfg = VQConfig(**cfg.vq)
    vq = VQModel(vq_cfg).train()
    if cfg.init_from:
        try:
            vq.load_state_dict(load_model(cfg.init_from, "cpu", torch.float32).vq.state_dict())
        except RuntimeError as e:  # names or shapes that do not match the run's VQ config
            raise ConfigError(f"{cfg.init_from} does not fit the run's VQ config {vq_cfg}: {e}") from None
    train_images = load_images(cfg.train_data, vq_cfg.image_size)
    heldout = load_images(cfg.heldout_data, vq_cfg.image_size)
    train_codes = None
    if cfg.train == "decoder":
        vq.requires_grad_(False)
        for part in (vq.post_quant_conv, vq.decoder):
            part.requires_grad_(True)
        train_codes = encode_all(vq, train_images, cfg.batch_size)  # fixed: the encoder and codebook are frozen
    optimizer = torch.optim.AdamW([p for p in vq.parameters() if p.requires_grad], lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(step, cfg))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    order = random.Random(cfg.seed)
    log = open(out / "metrics.jsonl", "w")
    # Evaluations during training share the training precision; the final one runs in float32.
    def autocast(final: bool = False) -> torch.autocast:
        return torch.autocast("cpu", torch.bfloat16, enabled=cfg.cpu_autocast and not final)

    with autocast():
        metrics = {"step": 0, **evaluate(vq, heldout, cfg.batch_size)}
    log.write(json.dumps(metrics) + "\n")
    log.flush()
    for step in range(1, cfg.steps + 1):
        batch = torch.tensor(order.sample(range(len(train_images)), min(cfg.batch_size, len(train_images))))
        x = train_images[batch]
        with autocast():
            if train_codes is None:
                result = vq(x)
                output, vq_losses = result.reconstruction, result.codebook_loss + result.commitment_loss
            else:
                output, vq_losses = vq.decode(train_codes[batch]), 0.0
        reconstruction = torch.nn.functional.mse_loss(output.float(), x)
        loss = reconstruction + vq_losses
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            with autocast(final=step == cfg.steps):
                metrics = {"step": step, "loss": float(loss), "reconstruction": float(reconstruction), **evaluate(vq, heldout, cfg.batch_size)}
            log.write(json.dumps(metrics) + "\n")
            log.flush()
    log.close()
    tmp = out / f".{WEIGHTS}.tmp"
    save_file({k: v.contiguous() for k, v in vq.state_dict().items()}, str(tmp))
    os.replace(tmp, out / WEIGHTS)
    (out / "vq_config.json").write_text(json.dumps({**vq_cfg.__dict__, "channel_mult": list(vq_cfg.channel_mult)}, indent=2) + "\n")
    return metrics
