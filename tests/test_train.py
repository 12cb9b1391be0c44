"""Three-stage training through DeepSpeed on CPU with the tiny config: freezing, overfitting, exact
resume after SIGKILL, ZeRO-3 equal to ZeRO-0, and the exported model loading with janus.load."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import janus
from janus.checkpoint import load_model
from janus.models.config import ConfigError
from janus.testing import make_tiny_run, save_tiny_checkpoint
from janus.train.assemble import interpolate_models
from janus.train.config import load_flat_config, load_run_config
from janus.train.loop import flops_per_token
from janus.train.stages import apply_stage
from janus.train.vit import ViTRunConfig
from janus.train.vq import VQRunConfig

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {1: "stages/stage1_adaptors.py", 2: "stages/stage2_pretrain.py", 3: "stages/stage3_sft.py"}
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def command(stage: int, root: Path, *overrides: str, launcher: bool = False, resume: bool = False) -> list[str]:
    script = [SCRIPTS[stage], "--config", "configs/tiny.yaml", "--set", f"root={root}"]
    for o in overrides:
        script += ["--set", o]
    if resume:
        script.append("--resume")
    if launcher:
        return [str(Path(sys.executable).parent / "deepspeed"), "--num_accelerators", "1", "--master_port", "29613", *script]
    return [sys.executable, *script]


def run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def losses(run_dir: Path) -> dict[int, dict]:
    """step -> metrics; a resumed run rewrites the steps after its checkpoint, the last line wins."""
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_model(path, "cpu").state_dict()


def changed(before: dict, after: dict, prefix: str) -> bool:
    keys = [k for k in before if k.startswith(prefix)]
    assert keys
    return any(not torch.equal(before[k], after[k]) for k in keys)


def assert_export_holds_masters_and_frozen_encoders(root) -> None:
    """A bf16 stage-2 run's export: the frozen encoders exactly as loaded, and the trained decoder's fp32
    masters (some of their values are not representable in bf16), not the bf16 copy."""
    before, after = weights(root / "stage0" / "export"), weights(root / "stage2" / "export")
    for prefix in ("vision.", "vq."):
        assert not changed(before, after, prefix), f"frozen {prefix} was rounded to bf16"
    assert changed(before, after, "decoder.")
    trained = [v for k, v in after.items() if k.startswith("decoder.")]
    assert any((v != v.bfloat16().float()).any() for v in trained), "the export holds the bf16 copy, not the masters"


def test_three_stages_chain_through_the_deepspeed_launcher(tmp_path):
    root = make_tiny_run(tmp_path / "run")
    frozen_by_stage = {1: ("vision.", "decoder.", "vq."), 2: ("vision.", "vq."), 3: ("vq.",)}
    trained_by_stage = {1: ("und_adaptor.", "gen_embed.", "gen_adaptor.", "gen_head."), 2: ("decoder.", "gen_head."), 3: ("vision.", "decoder.")}
    for stage in (1, 2, 3):
        run(command(stage, root, launcher=True))
        before, after = weights(root / f"stage{stage - 1}" / "export"), weights(root / f"stage{stage}" / "export")
        for prefix in frozen_by_stage[stage]:
            assert not changed(before, after, prefix), f"stage {stage} changed frozen {prefix}"
        for prefix in trained_by_stage[stage]:
            assert changed(before, after, prefix), f"stage {stage} did not train {prefix}"
        record = losses(root / f"stage{stage}")
        assert sorted(record) == list(range(1, 7))
        assert all(r["tokens_per_s"] > 0 for r in record.values())
        assert (root / f"stage{stage}" / "tensorboard").is_dir()
        assert sorted(p.name for p in (root / f"stage{stage}").glob("step-*")) == ["step-00000003", "step-00000006"]
    model = janus.load(root / "stage3" / "export", device="cpu")
    assert isinstance(model.chat("What colour is the square?", max_new_tokens=4), str)
    assert len(model.generate_image("a red square", seed=0)) == 1


def test_overfitting_a_handful_of_samples_drives_every_loss_down(tmp_path):
    root = make_tiny_run(tmp_path / "run")
    run(command(3, root, "init_from={root}/stage0/export", "train.steps=80", "optim.lr=0.003", "optim.warmup_steps=5", "checkpoint.every=1000"))
    record = losses(root / "stage3")
    for kind in ("understanding", "text", "generation"):
        first = record[1][f"loss/{kind}"]
        last = min(r[f"loss/{kind}"] for r in record.values() if r["step"] > 70 and r[f"loss/{kind}"] is not None)
        assert last < first / 5, (kind, first, last)


def test_sigkill_then_resume_gives_the_uninterrupted_loss_sequence(tmp_path):
    steps = ["init_from={root}/stage0/export", "train.steps=14", "checkpoint.every=4", "train.grad_accum=1"]
    full = make_tiny_run(tmp_path / "full")
    run(command(2, full, *steps))
    killed = make_tiny_run(tmp_path / "killed")
    proc = subprocess.Popen(command(2, killed, *steps), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = killed / "stage2" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 6:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "stage2" / "latest").read_text().strip() == "step-00000004"
    run(command(2, killed, *steps, resume=True))
    expected, got = losses(full / "stage2"), losses(killed / "stage2")
    assert sorted(got) == list(range(1, 15))
    assert [got[s]["loss"] for s in got] == [expected[s]["loss"] for s in got]
    a, b = weights(full / "stage2" / "export"), weights(killed / "stage2" / "export")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_zero3_trains_exactly_like_zero0(tmp_path):
    results = {}
    for zero in (0, 3):
        root = make_tiny_run(tmp_path / f"zero{zero}")
        run(command(2, root, "init_from={root}/stage0/export", "train.steps=3", "train.peak_tflops=1", f"deepspeed={{zero_optimization: {{stage: {zero}}}}}"))
        results[zero] = (losses(root / "stage2"), weights(root / "stage2" / "export"))
    assert [r["loss"] for r in results[0][0].values()] == pytest.approx([r["loss"] for r in results[3][0].values()], rel=1e-6)
    # MFU / (tokens/s) x peak is the FLOPs per token, which count the parameters ZeRO-3 partitions
    expected = flops_per_token(load_model(root / "stage2" / "export", "cpu"), seq_len=512)  # configs/tiny.yaml's
    for zero in (0, 3):
        assert [r["mfu"] / r["tokens_per_s"] * 1e12 for r in results[zero][0].values()] == pytest.approx([expected] * 3, rel=1e-9)
    a, b = results[0][1], results[3][1]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_run_config_defaults_placeholders_and_errors(tmp_path):
    cfg = load_run_config(REPO / "configs/tiny.yaml", ["root=/data/x", "train.steps=9"], stage=2)
    assert cfg.init_from == "/data/x/stage1/export" and cfg.checkpoint.dir == "/data/x/stage2"
    assert cfg.optim.lr == 1e-4 and cfg.optim.betas == (0.9, 0.95) and cfg.data.ratios == {"understanding": 2, "text": 3, "generation": 5}
    assert cfg.train.steps == 9 and cfg.optim.warmup_steps == 2  # the file's warm-up wins over the stage default
    assert load_run_config(REPO / "configs/tiny.yaml", ["optim.lr=3e-4"], stage=2).optim.lr == 3e-4  # a number, not YAML 1.1's string
    with pytest.raises(ValueError, match="no stage"):
        load_run_config(REPO / "configs/tiny.yaml")
    with pytest.raises(ValueError, match="unexpected keyword|got an unexpected"):
        load_run_config(REPO / "configs/tiny.yaml", ["train.stepz=3"], stage=1)
    with pytest.raises(ValueError, match="unknown data kinds"):
        load_run_config(REPO / "configs/tiny.yaml", ["data.ratios={video: 1}"], stage=1)
    for size in ("1b", "7b"):  # their code cache is a single path: a list of one
        assert load_run_config(REPO / f"configs/janus-pro-{size}.yaml", ["root=/r"], stage=2).data.code_cache == ["/r/data/codes"]
    assert load_run_config(REPO / "configs/tiny.yaml", stage=1).data.code_cache == []
    assert load_run_config(REPO / "configs/tiny.yaml", ["data.code_cache=null"], stage=1).data.code_cache == []
    # "{root}/.." is resolved in the config, not by the file system, where it fails while {root} does not exist
    cfg = load_run_config(REPO / "configs/default/extend.yaml", ["root=/r/extend"])
    assert cfg.init_from == "/r/refit/stage3/export" and cfg.data.code_cache[0] == "/r/codes"
    assert cfg.data.sources["text"][0] == "/r/data/train/text.jsonl" and cfg.checkpoint.dir == "/r/extend/stage3"


STAGE0_CONFIGS = {"vit.yaml": ViTRunConfig, "vit_centre.yaml": ViTRunConfig, "vq.yaml": VQRunConfig, "vq_decoder.yaml": VQRunConfig}  # flat, not a run config
RUN_CONFIGS = sorted(
    p.relative_to(REPO).as_posix() for d in ("configs", "configs/default") for p in (REPO / d).glob("*.yaml") if p.name not in STAGE0_CONFIGS
)


@pytest.mark.parametrize("name", sorted(STAGE0_CONFIGS))
def test_every_stage0_config_loads_as_its_own_schema(name):
    cfg = load_flat_config(STAGE0_CONFIGS[name], REPO / "configs/default" / name)
    assert cfg.steps > 0 and cfg.out


@pytest.mark.parametrize("path", RUN_CONFIGS)
def test_every_run_config_loads_for_each_of_its_stages(path):
    with open(REPO / path) as f:
        tree = yaml.safe_load(f)
    stages = [tree["stage"]] if "stage" in tree else sorted(tree.get("stages") or (1, 2, 3))
    for stage in stages:
        cfg = load_run_config(REPO / path, ["root=/r/run"], stage=stage)
        assert cfg.stage == stage and sum(cfg.data.ratios.values()) > 0 and cfg.train.steps > 0


def test_per_stage_sections_merge_under_command_line_overrides(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "init_from: x\ntrain: {steps: 5, micro_batch_size: 2}\n"
        "stages: {2: {train: {steps: 50}, optim: {lr: 0.002}}, 3: {data: {ratios: {understanding: 1, text: 0, generation: 1}}}}\n"
    )
    two = load_run_config(config, [], stage=2)
    assert (two.train.steps, two.train.micro_batch_size, two.optim.lr) == (50, 2, 0.002)
    assert load_run_config(config, ["train.steps=7"], stage=2).train.steps == 7
    one = load_run_config(config, [], stage=1)
    assert (one.train.steps, one.optim.lr) == (5, 1e-3)  # no section: the file's values and the stage's defaults
    assert load_run_config(config, [], stage=3).data.ratios == {"understanding": 1, "text": 0, "generation": 1}
    config.write_text("init_from: x\nstages: [1, 2]\n")
    with pytest.raises(ValueError, match="`stages` must map"):
        load_run_config(config, [], stage=1)
    cfg = load_run_config(REPO / "configs/default/run.yaml", [], stage=2)
    assert cfg.train.cpu_autocast and cfg.train.steps > load_run_config(REPO / "configs/default/run.yaml", [], stage=1).train.steps


def test_cpu_bf16_autocast_trains_and_keeps_fp32_weights(tmp_path):
    root = make_tiny_run(tmp_path / "run")
    run(command(2, root, "init_from={root}/stage0/export", "train.steps=30", "optim.lr=0.003", "optim.warmup_steps=2",
                "train.cpu_autocast=true", "checkpoint.every=1000"))
    record = losses(root / "stage2")
    assert record[30]["loss"] < 0.7 * record[1]["loss"], (record[1]["loss"], record[30]["loss"])
    after = weights(root / "stage2" / "export")
    assert all(v.dtype == torch.float32 for v in after.values())
    assert changed(weights(root / "stage0" / "export"), after, "decoder.")


@pytest.mark.parametrize("zero", [0, 3])
def test_bf16_training_exports_fp32_masters_and_frozen_weights_untouched(tmp_path, zero):
    """What a GPU run does (DeepSpeed trains a bf16 copy of the module, fp32 masters in the optimiser),
    forced here on CPU: the export holds the masters, and the frozen encoders as they were loaded."""
    root = make_tiny_run(tmp_path / "run")
    run(command(2, root, "init_from={root}/stage0/export", "train.steps=4", "checkpoint.every=1000",
                "deepspeed.bf16.enabled=true", f"deepspeed.zero_optimization.stage={zero}"))
    assert_export_holds_masters_and_frozen_encoders(root)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_stage2_trains_on_cuda_in_bf16_with_an_mfu_estimate(tmp_path):
    """The GPU default (bf16, no override): the loss falls, MFU is estimated, and the export holds the
    fp32 masters and the frozen encoders as they were loaded."""
    root = make_tiny_run(tmp_path / "run")
    run(command(2, root, "init_from={root}/stage0/export", "train.steps=30", "optim.lr=0.003", "optim.warmup_steps=2",
                "train.peak_tflops=100", "checkpoint.every=1000"))
    record = losses(root / "stage2")
    assert record[30]["loss"] < 0.7 * record[1]["loss"], (record[1]["loss"], record[30]["loss"])
    assert record[30]["mfu"] is not None and record[30]["mfu"] > 0
    assert_export_holds_masters_and_frozen_encoders(root)


def test_stage_freezing_policy():
    from janus.models.config import JanusConfig
    from janus.models.unified import JanusModel

    model = JanusModel(JanusConfig.preset("tiny"))
    expected = {1: {"und_adaptor", "gen_embed", "gen_adaptor", "gen_head"}, 2: {"und_adaptor", "gen_embed", "gen_adaptor", "gen_head", "decoder"}}
    expected[3] = expected[2] | {"vision"}
    for stage, trains in expected.items():
        apply_stage(model, stage)
        trainable = {name for name, m in model.named_children() if all(p.requires_grad for p in m.parameters())}
        assert trainable == trains
        assert not any(p.requires_grad for p in model.vq.parameters())


def test_trains_override_moves_only_the_named_modules(tmp_path):
    """`trains: [vision, und_adaptor]` (configs/default/und_encoder.yaml): the understanding path learns and
    every other weight, the decoder and the generation path included, comes out bit-identical."""
    from janus.models.config import JanusConfig
    from janus.models.unified import JanusModel

    root = make_tiny_run(tmp_path / "run")
    run(command(3, root, "init_from={root}/stage0/export", "train.steps=4", "optim.lr=0.003", "optim.warmup_steps=0",
                "checkpoint.every=1000", "trains=[vision, und_adaptor]"))
    before, after = weights(root / "stage0" / "export"), weights(root / "stage3" / "export")
    assert changed(before, after, "vision.") and changed(before, after, "und_adaptor.")
    for prefix in ("decoder.", "gen_embed.", "gen_adaptor.", "gen_head.", "vq."):
        assert not changed(before, after, prefix), prefix
    model = JanusModel(JanusConfig.preset("tiny"))
    with pytest.raises(ValueError, match="has no modules \\['encoder'\\]"):
        apply_stage(model, 3, ["encoder"])
    with pytest.raises(ValueError, match="stage 0"):
        apply_stage(model, 3, ["vq"])
    with pytest.raises(ValueError, match="non-empty list"):
        load_run_config(REPO / "configs/tiny.yaml", ["trains=[]"], stage=3)


def test_learning_rate_warms_up_stays_constant_and_optionally_decays(tmp_path):
    root = make_tiny_run(tmp_path / "run")
    run(command(1, root, "train.steps=5", "optim.warmup_steps=4", "optim.lr=0.002", "checkpoint.every=100"))
    lrs = [r["lr"] for r in losses(root / "stage1").values()]
    assert lrs == pytest.approx([0.0005, 0.001, 0.0015, 0.002, 0.002])
    run(command(2, root, "train.steps=6", "optim.warmup_steps=2", "optim.decay_steps=3", "optim.lr=0.003", "checkpoint.every=100"))
    lrs = [r["lr"] for r in losses(root / "stage2").values()]
    assert lrs == pytest.approx([0.0015, 0.003, 0.003, 0.003, 0.002, 0.001])


def test_grow_depth_doubles_the_layers_and_keeps_every_output(tmp_path):
    from janus.testing import save_tiny_checkpoint
    from janus.train.grow import grow_depth

    model = load_model(save_tiny_checkpoint(tmp_path / "tiny"), "cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grown = grow_depth(model)
    assert grown.cfg.decoder.n_layers == 2 * model.cfg.decoder.n_layers == len(grown.decoder.layers)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the source is untouched

    tokens = torch.randint(0, model.cfg.decoder.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden, grown_hidden = model(tokens), grown(tokens)
    assert torch.equal(hidden, grown_hidden)
    assert torch.equal(model.image_logits(hidden), grown.image_logits(grown_hidden))

    # the inserted blocks are silent but not dead: their zeroed projections get gradients at once
    grown.train()
    grown.text_logits(grown(tokens)).logsumexp(-1).sum().backward()
    inserted = grown.decoder.layers[1]
    assert inserted.self_attn.o_proj.weight.grad.abs().sum() > 0
    assert inserted.mlp.down_proj.weight.grad.abs().sum() > 0


def test_interpolated_model_averages_every_weight_and_refuses_another_architecture(tmp_path):
    start, tuned = save_tiny_checkpoint(tmp_path / "start", seed=0), save_tiny_checkpoint(tmp_path / "tuned", seed=1)
    a, b = load_model(start, "cpu").state_dict(), load_model(tuned, "cpu").state_dict()
    quarter = load_model(interpolate_models(start, tuned, 0.25, tmp_path / "quarter"), "cpu").state_dict()
    assert quarter.keys() == a.keys()
    for name, weight in a.items():
        torch.testing.assert_close(quarter[name], 0.75 * weight + 0.25 * b[name])
    assert not torch.equal(quarter["gen_head.fc2.weight"], a["gen_head.fc2.weight"])
    ends = [load_model(interpolate_models(start, tuned, w, tmp_path / f"end{w}"), "cpu").state_dict() for w in (0.0, 1.0)]
    assert all(torch.equal(ends[0][k], a[k]) and torch.equal(ends[1][k], b[k]) for k in a)

    deeper = save_tiny_checkpoint(tmp_path / "deeper", n_layers=3)
    with pytest.raises(ConfigError, match="another config"):
        interpolate_models(start, deeper, 0.5, tmp_path / "refused")
    with pytest.raises(ValueError, match=r"weight must lie in \[0, 1\]"):
        interpolate_models(start, tuned, 1.5, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
