"""Stage 0: the VQ tokenizer learns to reconstruct shapes-world images; a decoder refit keeps its codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file, save_file

from janus.checkpoint import load_model
from janus.data.shapes import write_dataset
from janus.models.config import ConfigError, JanusConfig, VQConfig
from janus.models.vq import VQModel
from janus.testing import save_tiny_checkpoint
from janus.train.assemble import refit_vq_decoder

REPO = Path(__file__).resolve().parents[1]


def test_stage0_improves_reconstruction_and_writes_a_loadable_vq(tmp_path):
    write_dataset(tmp_path / "data", 400, seed=0, resolution=32)
    out = tmp_path / "vq"
    vq = "{image_size: 32, codebook_size: 64, codebook_dim: 8, z_channels: 32, base_channels: 32, channel_mult: [1, 1, 2], num_res_blocks: 1}"
    cmd = [
        sys.executable, "stages/stage0_vq.py", "--config", "configs/default/vq.yaml", "--set", "cpu_autocast=false",
        "--set", f"train_data=[{tmp_path}/data/train/generation.jsonl]",
        "--set", f"heldout_data=[{tmp_path}/data/heldout/generation.jsonl]",
        "--set", f"out={out}", "--set", f"vq={vq}", "--set", "steps=240", "--set", "batch_size=16",
        "--set", "lr=0.003", "--set", "eval_every=120",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in log] == [0, 120, 240]
    assert log[-1]["psnr"] > log[0]["psnr"] + 3, log  # held-out reconstruction error at least halved (+4.4 dB measured)
    assert 0 < log[-1]["codebook_usage"] <= 1
    cfg = VQConfig(**json.loads((out / "vq_config.json").read_text()))
    model = VQModel(cfg)
    model.load_state_dict(load_file(out / "vq.safetensors"))  # strict: official names, no extras
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert model.decode(model.encode(images)).shape == images.shape


def test_decoder_refit_keeps_every_code_and_goes_into_the_model(tmp_path):
    write_dataset(tmp_path / "data", 200, seed=0, resolution=32)
    src = save_tiny_checkpoint(tmp_path / "trained")
    out = tmp_path / "vq"
    cmd = [
        sys.executable, "stages/stage0_vq.py", "--config", "configs/default/vq_decoder.yaml", "--set", "cpu_autocast=false",
        "--set", f"train_data=[{tmp_path}/data/train/generation.jsonl]", "--set", f"heldout_data=[{tmp_path}/data/heldout/generation.jsonl]",
        "--set", f"out={out}", "--set", f"init_from={src}", "--set", f"vq={json.dumps(asdict(JanusConfig.preset('tiny').vq))}",
        "--set", "steps=100", "--set", "batch_size=16", "--set", "lr=0.003", "--set", "eval_every=50",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in log] == [0, 50, 100]
    assert log[-1]["psnr"] > log[0]["psnr"] + 3, log  # the tiny checkpoint's decoder is random
    assert log[-1]["codebook_usage"] == log[0]["codebook_usage"]  # the same codes

    before = load_model(src, "cpu").state_dict()
    refit = load_model(refit_vq_decoder(src, out / "vq.safetensors", tmp_path / "refit"), "cpu").state_dict()
    trained = load_file(out / "vq.safetensors")
    assert all(torch.equal(refit[f"vq.{k}"], v) for k, v in trained.items())
    frozen = [k for k in before if k.startswith(("vq.encoder.", "vq.quant_conv.", "vq.quantize."))]
    assert frozen and all(torch.equal(refit[k], before[k]) for k in frozen)
    assert not torch.equal(refit["vq.decoder.conv_out.weight"], before["vq.decoder.conv_out.weight"])
    assert all(torch.equal(refit[k], v) for k, v in before.items() if not k.startswith("vq."))

    # A VQ whose encoder moved would give images other codes than the model learnt: refused.
    moved = {**trained, "encoder.conv_in.weight": trained["encoder.conv_in.weight"] + 0.01}
    save_file(moved, tmp_path / "moved.safetensors")
    with pytest.raises(ConfigError, match="changes the encoder or codebook"):
        refit_vq_decoder(src, tmp_path / "moved.safetensors", tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    # Refitting a decoder needs the model it comes from.
    proc = subprocess.run([*cmd, "--set", "init_from=null"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "set init_from" in proc.stderr
