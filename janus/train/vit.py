"""Stage 0: pretraining the understanding encoder on the shapes world's exact labels.

Janus starts from a pretrained SigLIP encoder and keeps it frozen until stage 3. No pretrained encoder
can be downloaded here, and a random frozen one gives stages 1-2 nothing to align: in the first
default model, even after stage 3 had trained it, its patch features told an object's shape apart
worse than raw pixels (docs/default_model.md). So for
the shapes world, the encoder is pretrained first, on what the world gives exactly: for every patch,
the shape and the colour of the object covering most of it (or none), and where that object's centre
lies. The patch features then carry what the questions ask about: trained on shape and colour alone,
they lost most of where each patch is, which position and relation questions need. The labels come
from each scene's ground truth (`scenes.jsonl` of `janus.data.shapes.write_dataset`), rendered one
object at a time.

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

from ..checkpoint import load_model
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
    init_from: str | None = None  # a checkpoint whose encoder training starts from; None: timm's initialisation
    centre_weight: float = 0.0  # weight of the centre loss (0: shape and colour alone, as the first encoder)
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    seed: int = 0
    eval_every: int = 250


def patch_labels(scene: Scene, vision: VisionConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per patch (row-major, as the encoder's tokens): 1 + the index in SHAPES and in COLOURS of the
    object covering most of the patch, or 0 where objects cover less than MIN_COVER of it, and that
    object's centre (x, y in image sides; 0 for background). Objects drawn later cover earlier ones,
    as in `render`."""
    size, patch = vision.image_size, vision.patch_size
    grid = size // patch
    owner = np.full((size, size), -1)
    for k, obj in enumerate(scene.objects):
        ink = np.abs(np.asarray(render(Scene((obj,)), size), dtype=np.int64) - np.array(BACKGROUND)).sum(-1)
        owner[ink > INK_THRESHOLD] = k
    cells = owner.reshape(grid, patch, grid, patch).transpose(0, 2, 1, 3).reshape(grid * grid, patch * patch)
    shapes, colours = torch.zeros(grid * grid, dtype=torch.long), torch.zeros(grid * grid, dtype=torch.long)
    centres = torch.zeros(grid * grid, 2)
    for c, cell in enumerate(cells):
        counts = np.bincount(cell[cell >= 0], minlength=len(scene.objects))
        if counts.size and counts.max() >= MIN_COVER * patch * patch:
            obj = scene.objects[int(counts.argmax())]
            shapes[c], colours[c] = 1 + SHAPES.index(obj.shape), 1 + COLOURS.index(obj.colour)
            centres[c] = torch.tensor((obj.x, obj.y))
    return shapes, colours, centres


def load_scenes(paths: list[str], vision: VisionConfig) -> tuple[torch.Tensor, ...]:
    """Encoder inputs [N, 3, S, S] (bfloat16, to halve the memory of a whole data set) and the patch
    labels of every scene of the scenes.jsonl files: shapes and colours [N, P], centres [N, P, 2]."""
    pixels, shapes, colours, centres = [], [], [], []
    for path in map(Path, paths):
        with open(path, encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                with Image.open(path.parent / record["image"]) as image:
                    pixels.append(preprocess_understanding([image], vision.image_size)[0].to(torch.bfloat16))
                s, c, xy = patch_labels(Scene.from_json(record), vision)
                shapes.append(s)
                colours.append(c)
                centres.append(xy)
    if not pixels:
        raise ValueError(f"no scenes in {paths}")
    return torch.stack(pixels), torch.stack(shapes), torch.stack(colours), torch.stack(centres)


class PatchClassifier(nn.Module):
    """The encoder with linear heads for each patch's shape, colour and object centre."""

    def __init__(self, vision: VisionConfig) -> None:
        super().__init__()
        self.encoder = build_siglip(vision)
        self.shape_head = nn.Linear(vision.width, 1 + len(SHAPES))
        self.colour_head = nn.Linear(vision.width, 1 + len(COLOURS))
        self.centre_head = nn.Linear(vision.width, 2)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features = self.encoder.forward_features(pixels)
        return self.shape_head(features), self.colour_head(features), self.centre_head(features)


def _ninths(centres: torch.Tensor) -> torch.Tensor:
    """The (column, row) third of the image holding each centre, as `janus.data.shapes.region` divides it."""
    return (centres * 3).long().clamp(0, 2)


@torch.no_grad()
def evaluate(model: PatchClassifier, pixels: torch.Tensor, shapes: torch.Tensor, colours: torch.Tensor, centres: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Over the patches that hold an object (most patches are background, an easy answer): shape and
    colour accuracy, the mean distance of the predicted centre from the object's (in image sides), and
    how often it falls in the object's ninth of the image (what position questions ask)."""
    model.eval()
    shape_hits = colour_hits = 0
    predicted, true = [], []
    for start in range(0, len(pixels), batch_size):
        batch = slice(start, start + batch_size)
        shape_logits, colour_logits, centre = model(pixels[batch].float())
        on_object = shapes[batch] > 0
        shape_hits += int((shape_logits.argmax(-1) == shapes[batch])[on_object].sum())
        colour_hits += int((colour_logits.argmax(-1) == colours[batch])[on_object].sum())
        predicted.append(centre[on_object])
        true.append(centres[batch][on_object])
    model.train()
    predicted, true = torch.cat(predicted), torch.cat(true)
    patches = len(true)
    regions_hit = int((_ninths(predicted) == _ninths(true)).all(-1).sum())
    return {
        "shape_accuracy": shape_hits / patches,
        "colour_accuracy": colour_hits / patches,
        "centre_error": float((predicted - true).norm(dim=-1).mean()),
        "region_accuracy": regions_hit / patches,
    }


def patch_loss(model: PatchClassifier, pixels: torch.Tensor, shapes: torch.Tensor, colours: torch.Tensor, centres: torch.Tensor, centre_weight: float) -> torch.Tensor:
    """Cross-entropy of every patch's shape and colour, plus `centre_weight` x the squared error of
    the centre (in patches, so an error of one patch costs 1) on object patches."""
    shape_logits, colour_logits, centre = model(pixels)
    loss = F.cross_entropy(shape_logits.flatten(0, 1), shapes.flatten()) + F.cross_entropy(colour_logits.flatten(0, 1), colours.flatten())
    if centre_weight:
        grid = model.encoder.patch_embed.grid_size[0]
        on_object = shapes > 0
        loss = loss + centre_weight * F.mse_loss(centre[on_object] * grid, centres[on_object] * grid, reduction="none").sum(-1).mean()
    return loss


def train_vit(cfg: ViTRunConfig) -> dict[str, float]:
    """Train, evaluate every `eval_every` steps and at the end, write the encoder's weights (the names
    of `JanusModel.vision`); returns the final metrics."""
    if cfg.steps < 1:
        raise ValueError(f"steps must be at least 1, got {cfg.steps}")
    torch.manual_seed(cfg.seed)
    vision = JanusConfig.preset(cfg.model).vision
    model = PatchClassifier(vision).train()
    if cfg.init_from is not None:
        model.encoder.load_state_dict(load_model(cfg.init_from, "cpu", torch.float32).vision.state_dict())
    train = load_scenes(cfg.train_scenes, vision)
    heldout = load_scenes(cfg.heldout_scenes, vision)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=0.0)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    order = random.Random(cfg.seed)
    with open(out / "metrics.jsonl", "w") as log:
        for step in range(1, cfg.steps + 1):
            batch = order.sample(range(len(train[0])), min(cfg.batch_size, len(train[0])))
            loss = patch_loss(model, train[0][batch].float(), *(labels[batch] for labels in train[1:]), cfg.centre_weight)
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
