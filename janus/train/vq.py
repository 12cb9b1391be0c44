"""Stage 0: training the VQ image tokenizer on a data set's images.

LlamaGen trains with L2 reconstruction, perceptual and PatchGAN losses; the last two need pretrained
networks we cannot download, so this trains what is possible offline: L2 reconstruction plus the
codebook and commitment losses (DESIGN.md §5). It reports reconstruction PSNR and codebook usage on
held-out images and writes the VQ's weights (official names, without the `gen_vision_model.` prefix).

    python stages/stage0_vq.py --config configs/RUN.yaml [--set steps=4000]
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..data.records import read_records
from ..models.config import VQConfig
from ..models.vq import VQModel
from ..processing.image import preprocess_generation

WEIGHTS = "vq.safetensors"


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


def load_images(paths: list[str], size: int) -> torch.Tensor:
    """All images of the records in `paths`, as generation targets [N, 3, size, size] in [-1, 1]."""
    skipped: Counter = Counter()
    images = [preprocess_generation(im, size) for p in paths for r in read_records(p, skipped) for im in r.images]
    if not images:
        raise ValueError(f"no readable images in {paths}")
    return torch.stack(images)


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


def train_vq(cfg: VQRunConfig) -> dict[str, float]:
    """Train, evaluate every `eval_every` steps and at the end, write the weights; returns the final metrics."""
    torch.manual_seed(cfg.seed)
    vq_cfg = VQConfig(**cfg.vq)
    vq = VQModel(vq_cfg).train()
    train_images = load_images(cfg.train_data, vq_cfg.image_size)
    heldout = load_images(cfg.heldout_data, vq_cfg.image_size)
    optimizer = torch.optim.AdamW(vq.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=0.0)
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
        x = train_images[order.sample(range(len(train_images)), min(cfg.batch_size, len(train_images)))]
        with autocast():
            result = vq(x)
        reconstruction = torch.nn.functional.mse_loss(result.reconstruction.float(), x)
        loss = reconstruction + result.codebook_loss + result.commitment_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
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
