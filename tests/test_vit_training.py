"""Stage 0: the understanding encoder learns each patch's shape and colour from the shapes world."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from janus.checkpoint import load_model
from janus.data.shapes import Scene, SceneObject, write_dataset
from janus.models.config import ConfigError, JanusConfig
from janus.models.unified import JanusModel
from janus.processing.tokenizer import Tokenizer
from janus.testing import save_tiny_checkpoint
from janus.train.assemble import load_encoder, refit_encoder
from janus.train.vit import COLOURS, SHAPES, patch_labels

REPO = Path(__file__).resolve().parents[1]
VISION = JanusConfig.preset("tiny").vision  # 32 px, 8 px patches: a 4 x 4 grid


def test_patch_labels_name_the_object_covering_each_patch():
    # A large square filling the centre four patches (8..24 px of 32), a small circle in the top-left patch.
    square = SceneObject("square", "red", "large", 0.5, 0.5)
    circle = SceneObject("circle", "blue", "small", 0.125, 0.125)
    shapes, colours, centres = patch_labels(Scene((square, circle)), VISION)
    grid, centres = shapes.view(4, 4), centres.view(4, 4, 2)
    for row, col in [(1, 1), (1, 2), (2, 1), (2, 2)]:
        assert grid[row, col] == 1 + SHAPES.index("square") and colours.view(4, 4)[row, col] == 1 + COLOURS.index("red")
        assert centres[row, col].tolist() == [0.5, 0.5]
    assert grid[0, 0] == 1 + SHAPES.index("circle") and colours[0] == 1 + COLOURS.index("blue")
    assert centres[0, 0].tolist() == [0.125, 0.125]
    assert grid[3, 3] == 0 and grid[0, 3] == 0  # background
    assert (centres[grid == 0] == 0).all()
    # Drawn later, an overlapping object takes the patches it covers most of.
    cover = SceneObject("triangle", "green", "large", 0.5, 0.5)
    shapes, colours, _ = patch_labels(Scene((square, cover)), VISION)
    assert set(shapes.view(4, 4)[1:3, 1:3].flatten().tolist()) <= {1 + SHAPES.index("triangle"), 1 + SHAPES.index("square")}
    assert (colours.view(4, 4)[1:3, 1:3] == 1 + COLOURS.index("green")).any()


def test_stage0_vit_learns_patch_labels_and_its_encoder_refits_a_trained_model(tmp_path):
    write_dataset(tmp_path / "data", 40, seed=0, resolution=32, splits={"train": 1.0})
    scenes = tmp_path / "data" / "train" / "scenes.jsonl"
    out = tmp_path / "vit"
    cmd = [
        sys.executable, "stages/stage0_vit.py", "--config", "configs/default/vit.yaml", "--set", "model=tiny",
        "--set", f"train_scenes=[{scenes}]", "--set", f"heldout_scenes=[{scenes}]",  # overfit a few scenes
        "--set", f"out={out}", "--set", "steps=150", "--set", "batch_size=16", "--set", "lr=0.003", "--set", "eval_every=75",
    ]
    subprocess.run([*cmd, "--set", "centre_weight=1.0"], cwd=REPO, check=True)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [75, 150]
    assert metrics[-1]["colour_accuracy"] > 0.9 and metrics[-1]["shape_accuracy"] > 0.6
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    # where each object is: within a patch (0.25 of the side) of its centre, and better than at first
    assert metrics[-1]["centre_error"] < min(0.25, metrics[0]["centre_error"]) and 0 <= metrics[-1]["region_accuracy"] <= 1

    # Refitting: a trained checkpoint gets the encoder; everything else stays as it was.
    src = save_tiny_checkpoint(tmp_path / "trained")
    refit = load_model(refit_encoder(src, out / "vit.safetensors", tmp_path / "refit"), "cpu")
    before = load_model(src, "cpu")
    trained = load_file(str(out / "vit.safetensors"))
    assert trained.keys() == refit.vision.state_dict().keys()
    assert all(torch.equal(refit.vision.state_dict()[k], v) for k, v in trained.items())
    assert not all(torch.equal(before.vision.state_dict()[k], v) for k, v in trained.items())
    rest = {k: v for k, v in before.state_dict().items() if not k.startswith("vision.")}
    assert all(torch.equal(refit.state_dict()[k], v) for k, v in rest.items())
    assert Tokenizer.from_dir(tmp_path / "refit").vocab_size == Tokenizer.from_dir(src).vocab_size

    # init_from starts from a checkpoint's encoder: at learning rate 0 it comes out unchanged.
    again = tmp_path / "again"
    subprocess.run([*cmd, "--set", f"out={again}", "--set", f"init_from={src}", "--set", "steps=1", "--set", "lr=0.0"], cwd=REPO, check=True)
    assert all(torch.equal(before.vision.state_dict()[k], v) for k, v in load_file(str(again / "vit.safetensors")).items())

    wider = JanusConfig.preset("tiny")
    wider.vision.width = 48
    with pytest.raises(ConfigError, match="does not fit the model's vision config"):
        load_encoder(JanusModel(wider), out / "vit.safetensors")
