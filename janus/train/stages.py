"""The three training stages (DESIGN.md §6): what each trains and its default hyper-parameters."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..models.unified import JanusModel


@dataclass(frozen=True)
class StageDefaults:
    trains: tuple[str, ...]  # top-level JanusModel modules that receive gradients
    lr: float
    warmup_steps: int
    ratios: tuple[float, float, float]  # understanding : text : generation


ADAPTORS_AND_HEAD = ("und_adaptor", "gen_embed", "gen_adaptor", "gen_head")
STAGES = {
    1: StageDefaults(ADAPTORS_AND_HEAD, lr=1e-3, warmup_steps=600, ratios=(1, 0, 3)),
    2: StageDefaults(ADAPTORS_AND_HEAD + ("decoder",), lr=1e-4, warmup_steps=5000, ratios=(2, 3, 5)),
    3: StageDefaults(ADAPTORS_AND_HEAD + ("decoder", "vision"), lr=4e-5, warmup_steps=0, ratios=(5, 1, 4)),
}


def apply_stage(model: JanusModel, stage: int, trains: Sequence[str] | None = None) -> list[str]:
    """Freeze everything the stage does not train (the VQ tokenizer is always frozen); return the
    names of the trainable modules. `trains` replaces the stage's own list."""
    if stage not in STAGES:
        raise ValueError(f"stage must be 1, 2 or 3, got {stage}")
    trains = STAGES[stage].trains if trains is None else tuple(trains)
    names = {name for name, _ in model.named_children()}
    if not set(trains) <= names:
        raise ValueError(f"model has no modules {sorted(set(trains) - names)}; it has {sorted(names)}")
    if "vq" in trains:
        raise ValueError("the VQ tokenizer is trained in stage 0 (stages/stage0_vq.py), not here")
    for name, module in model.named_children():
        module.requires_grad_(name in trains)
    return list(trains)
