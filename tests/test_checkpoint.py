"""Checkpoint layouts, configs, and clear errors for bad checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest
import timm
import torch
import transformers
from safetensors.torch import load_file, save_file

from janus.checkpoint import CheckpointError, load_model, save_model
from janus.models.config import LLAMA_DEFAULTS, ConfigError, JanusConfig
from janus.models.siglip import build_siglip
from janus.testing import save_tiny_checkpoint


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ck") / "native")


@pytest.fixture
def official(native, tmp_path):
    return save_model(load_model(native, "cpu"), tmp_path / "official", "official", extra_files_from=native)


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_sharded_and_bin_checkpoints_load_identically(native, tmp_path):
    model = load_model(native, "cpu")
    sharded = save_model(model, tmp_path / "sharded", "official", max_shard_bytes=200_000)
    assert len(list(sharded.glob("*.safetensors"))) > 2 and (sharded / "model.safetensors.index.json").is_file()
    assert same_weights(load_model(sharded, "cpu"), model)

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(sharded / "config.json", bin_dir)
    state = {}
    for f in sharded.glob("*.safetensors"):
        state.update(load_file(f))
    torch.save({k: v.to(torch.bfloat16) for k, v in state.items()}, bin_dir / "pytorch_model.bin")
    loaded = load_model(bin_dir, "cpu", dtype="bfloat16")
    assert loaded.decoder.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.decoder.lm_head.weight, model.decoder.lm_head.weight.to(torch.bfloat16))


def test_saved_checkpoint_has_the_modes_of_a_plain_directory(native, tmp_path):
    umask = os.umask(0o022)
    try:
        out = save_model(load_model(native, "cpu"), tmp_path / "shared", "native", extra_files_from=native)
    finally:
        os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755  # not mkdtemp's private 0700
    assert {stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()} == {0o644}


def test_bookkeeping_keys_are_ignored(official):
    state = load_file(official / "model.safetensors")
    state["vision_model.vision_tower.attn_pool.latent"] = torch.zeros(1, 1, 32)
    state["gen_vision_model.quantize.codebook_used"] = torch.zeros(64)
    save_file(state, str(official / "model.safetensors"))
    load_model(official, "cpu")


def test_missing_and_unexpected_weights_are_named(official):
    state = load_file(official / "model.safetensors")
    del state["gen_head.vision_head.weight"]
    state["language_model.model.layers.7.mlp.up_proj.weight"] = torch.zeros(2, 2)
    save_file(state, str(official / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 missing: gen_head\.vision_head\.weight; 1 unexpected: language_model\.model\.layers\.7"):
        load_model(official, "cpu")


def test_config_that_disagrees_with_weights(official):
    config = json.loads((official / "config.json").read_text())
    config["language_config"]["intermediate_size"] = 200
    (official / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"mlp\.gate_proj\.weight has shape \[160, 64\].*implies \[200, 64\]"):
        load_model(official, "cpu")
    config["language_config"]["num_hidden_layers"] = 3
    config["language_config"]["intermediate_size"] = 160
    (official / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"missing: language_model\.model\.layers\.2\."):
        load_model(official, "cpu")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_or_truncated_safetensors(official, damage):
    f = official / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"garbage": b"\x07not a safetensors file" * 10, "truncated": data[: len(data) // 2], "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(official, "cpu")


def test_pickled_code_is_refused(official, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (official / "model.safetensors").unlink()
    torch.save({"x": Payload()}, official / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin cannot be read as plain tensors"):
        load_model(official, "cpu")
    assert not marker.exists()


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda d: d.pop("model_type"), "model_type None"),
        (lambda d: d.update(model_type="llama"), "model_type 'llama'"),
        (lambda d: d["vision_config"].update(params={"model_name": "siglip_giant"}), "unsupported vision model_name"),
        (lambda d: d["language_config"].update(num_attention_heads=5), "not divisible"),
    ],
)
def test_bad_config_json(official, edit, message):
    config = json.loads((official / "config.json").read_text())
    edit(config)
    (official / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        load_model(official, "cpu")
    (official / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(official, "cpu")


def test_no_weights_or_dangling_index(official):
    (official / "model.safetensors").rename(official / "elsewhere.bak")
    with pytest.raises(CheckpointError, match="has no weights"):
        load_model(official, "cpu")
    (official / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="missing.*model-00001-of-00002"):
        load_model(official, "cpu")


def test_official_config_missing_llama_fields_take_llamaconfig_defaults():
    defaults = transformers.LlamaConfig()
    expected = {k: getattr(defaults, k) for k in LLAMA_DEFAULTS if k != "rope_theta"}
    expected["rope_theta"] = defaults.rope_parameters["rope_theta"]  # transformers 5 keeps it there
    assert LLAMA_DEFAULTS == expected
    seven_b = JanusConfig.preset("janus-pro-7b").to_official()
    lang = seven_b["language_config"]
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "rope_theta"):
        del lang[key]  # as the Janus-Pro-7B config.json omits them
    cfg = JanusConfig.from_official(seven_b)
    assert (cfg.decoder.dim, cfg.decoder.n_heads, cfg.decoder.n_kv_heads, cfg.decoder.intermediate_size) == (4096, 32, 32, 11008)
    assert cfg == JanusConfig.preset("janus-pro-7b")


def test_presets_round_trip_through_every_layout_config():
    for name in ("tiny", "janus-1.3b", "janus-pro-1b", "janus-pro-7b"):
        cfg = JanusConfig.preset(name)
        assert JanusConfig.from_official(cfg.to_official()) == cfg
        assert JanusConfig.from_transformers(cfg.to_transformers(100581)) == cfg
        assert JanusConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="no model preset named 'huge'"):
        JanusConfig.preset("huge")


def test_siglip_equals_timms_own_model():
    cfg = JanusConfig.preset("tiny").vision
    ours = build_siglip(cfg).eval()
    reference = timm.create_model(
        "vit_large_patch16_siglip_384", pretrained=False, img_size=cfg.image_size, patch_size=cfg.patch_size,
        embed_dim=cfg.width, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
    ).eval()
    torch.manual_seed(0)
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.2)
    result = reference.load_state_dict(ours.state_dict(), strict=False)
    assert not result.unexpected_keys and all(k.startswith("attn_pool.") for k in result.missing_keys)
    pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        assert torch.equal(ours.forward_features(pixels), reference.forward_features(pixels))
