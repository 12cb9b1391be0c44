"""Stage 0: pretraining the understanding encoder on the shapes world's exact labels.

Janus starts from a pretrained SigLIP encoder and keeps it frozen until stage 3. No pretrained encoder
can be downloaded here, and a random frozen one gives stages 1-2 nothing to align: in the first
default model, even after stage 3 had trained it, its patch features told an object's shape apart
worse than raw pixels (docs/default_model.md). So for
the shapes world, the encoder is pretrained first, on what the world gives exactly: for every patch,
the shape and the colour of the object covering most of it (or none). The patch features then carry
what the questions ask about. The labels come from each scene's ground truth (`scenes.jsonl` of
`janus.data.shapes.write_dataset`), rendered one object at a time.

    python stages/stage0_vit.py --config configs/default/vit.yaml [--set steps=3000]
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from ..data.shapes import BACKGROUND, PALETTE, SHAPES, Scene, render
from ..models.config import JanusConfig, VisionConfig
from ..models.siglip import build_siglip
from ..processing.image import preprocess_understanding

WEIGHTS = "vit.safetensors"
COLOURS = tuple(PALETTE)
MIN_COVER = 1 / 8  # of a patch's pixels: less than this and the patch is background
INK_THRESHOLD = 30  # summed RGB distance from the background: the pixel belongs to the object


@dataclass
class ViTRunConfig:
    train_scenes: list[str]  # scenes.jsonl files written by write_dataset (images beside them)
    heldout_scenes: list[str]
    out: str
    model: str = "shapes"  # the preset whose vision encoder is trained
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    seed: int = 0
    eval_every: int = 250


def patch_labels(scene: Scene, vision: VisionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per patch (row-major, as the encoder's tokens): 1 + the index in SHAPES and in COLOURS of the
    object covering most of the patch, or 0 where objects cover less than MIN_COVER of it. Objects
    drawn later cover earlier ones, as in `render`."""
    size, patch = vision.image_size, vision.patch_size
    grid = size // patch
    owner = np.full((size, size), -1)
    for k, obj in enumerate(scene.objects):
        ink = np.abs(np.asarray(render(Scene((obj,)), size), dtype=np.int64) - np.array(BACKGROUND)).sum(-1)
        owner[ink > INK_THRESHOLD] = k
    cells = owner.reshape(grid, patch, grid, patch).transpose(0, 2, 1, 3).reshape(grid * grid, patch * patch)
    shapes, colours = torch.zeros(grid * grid, dtype=torch.long), torch.zeros(grid * grid, dtype=torch.long)
    for c, cell in enumerate(cells):
        counts = np.bincount(cell[cell >= 0], minlength=len(scene.objects))
        if counts.size and counts.max() >= MIN_COVER * patch * patch:
            obj = scene.objects[int(counts.argmax())]
            shapes[c], colours[c] = 1 + SHAPES.index(obj.shape), 1 + COLOURS.index(obj.colour)
    return shapes, colours


def load_scenes(paths: list[str], vision: VisionConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encoder inputs [N, 3, S, S] (bfloat16, to halve the memory of a whole data set) and the patch
    labels [N, P] of shapes and colours, for every scene of the scenes.jsonl files."""
    pixels, shapes, colours = [], [], []
    for path in map(Path, paths):
        with open(path, encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                with Image.open(path.parent / record["image"]) as image:
                    pixels.append(preprocess_understanding([image], vision.image_size)[0].to(torch.bfloat16))
                s, c = patch_labels(Scene.from_json(record), vision)
                shapes.append(s)
                colours.append(c)
    if not pixels:
        raise ValueError(f"no scenes in {paths}")
    return torch.stack(pixels), torch.stack(shapes), torch.stack(colours)


class PatchClassifier(nn.Module):
    """The encoder with linear heads for each patch's shape and colour."""

    def __init__(self, vision: VisionConfig) -> None:
        super().__init__()
        self.encoder = build_siglip(vision)
        self.shape_head = nn.Linear(vision.width, 1 + len(SHAPES))
        self.colour_head = nn.Linear(vision.width, 1 + len(COLOURS))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder.forward_features(pixels)
        return self.shape_head(features), self.colour_head(features)


@torch.no_grad()
def evaluate(model: PatchClassifier, pixels: torch.Tensor, shapes: torch.Tensor, colours: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Accuracy over the patches that hold an object (most patches are background, an easy answer)."""
    model.eval()
    shape_hits = colour_hits = 0
    for start in range(0, len(pixels), batch_size):
        shape_logits, colour_logits = model(pixels[start : start + batch_size].float())
        on_object = shapes[start : start + batch_size] > 0
        shape_hits += int((shape_logits.argmax(-1) == shapes[start : start + batch_size])[on_object].sum())
        colour_hits += int((colour_logits.argmax(-1) == colours[start : start + batch_size])[on_object].sum())
    model.train()
    patches = int((shapes > 0).sum())
    return {"shape_accuracy": shape_hits / patches, "colour_accuracy": colour_hits / patches}


def train_vit(cfg: ViTRunConfig) -> dict[str, float]:
    """Train, evaluate every `eval_every` steps and at the end, write the encoder's weights (the names
    of `JanusModel.vision`); returns the final metrics."""
    if cfg.steps < 1:
        raise ValueError(f"steps must be at least 1, got {cfg.steps}")
    torch.manual_seed(cfg.seed)
    vision = JanusConfig.preset(cfg.model).vision
    model = PatchClassifier(vision).train()
    train = load_scenes(cfg.train_scenes, vision)
    heldout = load_scenes(cfg.heldout_scenes, vision)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=0.0)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    order = random.Random(cfg.seed)
    with open(out / "metrics.jsonl", "w") as log:
        for step in range(1, cfg.steps + 1):
            batch = order.sample(range(len(train[0])), min(cfg.batch_size, len(train[0])))
            shape_logits, colour_logits = model(train[0][batch].float())
            loss = F.cross_entropy(shape_logits.flatten(0, 1), train[1][batch].flatten()) + F.cross_entropy(
                colour_logits.flatten(0, 1), train[2][batch].flatten()
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % cfg.eval_every == 0 or step == cfg.steps:
                metrics = {"step": step, "loss": loss.item(), **evaluate(model, *heldout, cfg.batch_size)}
                log.write(json.dumps(metrics) + "\n")
                log.flush()
    tmp = out / f".{WEIGHTS}.tmp"
    save_file({k: v.contiguous() for k, v in model.encoder.state_dict().items()}, str(tmp))
    os.replace(tmp, out / WEIGHTS)
    return metrics
