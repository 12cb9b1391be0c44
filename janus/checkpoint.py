"""Checkpoint layouts (native, official, transformers): detection, strict lazy loading, writing, conversion.

A layout is an ordered list of rename rules from our parameter names to the file's names. Two rules
are more than renames in the transformers layout: SigLIP's fused `qkv` is stored as three
projections, and its position embedding has no leading batch dimension.
Loading reads one tensor at a time from memory-mapped files into a model built on the meta device,
so it never holds two copies of the weights.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .models.config import ConfigError, JanusConfig
from .models.unified import JanusModel

LAYOUTS = ("native", "official", "transformers")
NATIVE_TYPE = "janus_native"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# Stored by the reference code but not part of the model: the unused SigLIP pooling head, the VQ's
# codebook usage counter and RoPE tables saved by old transformers versions.
IGNORED_KEYS = re.compile(r"(^|\.)attn_pool\.|quantize\.codebook_used$|rotary_emb\.inv_freq$")
WEIGHT_SUFFIXES = (".safetensors", ".bin")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked: the message names the file or weights at fault."""


@dataclass(frozen=True)
class Rule:
    ours: str  # prefix template of our names; {i} matches a layer index
    theirs: str  # the file's prefix; {part} expands to q/k/v for a fused projection
    kind: str = "rename"  # "rename" | "qkv" (one of ours = three of theirs) | "pos" (ours has a leading 1)

    def match(self, key: str) -> str | None:
        pattern = re.escape(self.ours).replace(r"\{i\}", r"(?P<i>\d+)")
        m = re.match(pattern, key)
        if m is None:
            return None
        return self.theirs.replace("{i}", m.group("i") if "{i}" in self.ours else "") + key[m.end():]


_VIT = "model.vision_model."
_VQ = "model.vqmodel."
RULES = {
    "native": [Rule("", "")],
    "official": [
        Rule("decoder.lm_head.", "language_model.lm_head."),
        Rule("decoder.", "language_model.model."),
        Rule("vision.", "vision_model.vision_tower."),
        Rule("und_adaptor.fc1.", "aligner.layers.0."),
        Rule("und_adaptor.fc2.", "aligner.layers.2."),
        Rule("gen_adaptor.fc1.", "gen_aligner.layers.0."),
        Rule("gen_adaptor.fc2.", "gen_aligner.layers.2."),
        Rule("gen_head.fc1.", "gen_head.output_mlp_projector."),
        Rule("gen_head.fc2.", "gen_head.vision_head."),
        Rule("gen_embed.", "gen_embed."),
        Rule("vq.", "gen_vision_model."),
    ],
    "transformers": [
        Rule("decoder.lm_head.", "lm_head."),
        Rule("decoder.", "model.language_model."),
        Rule("vision.pos_embed", _VIT + "embeddings.position_embedding.weight", "pos"),
        Rule("vision.patch_embed.proj.", _VIT + "embeddings.patch_embedding."),
        Rule("vision.blocks.{i}.norm1.", _VIT + "encoder.layers.{i}.layer_norm1."),
        Rule("vision.blocks.{i}.norm2.", _VIT + "encoder.layers.{i}.layer_norm2."),
        Rule("vision.blocks.{i}.attn.qkv.", _VIT + "encoder.layers.{i}.self_attn.{part}_proj.", "qkv"),
        Rule("vision.blocks.{i}.attn.proj.", _VIT + "encoder.layers.{i}.self_attn.projection_layer."),
        Rule("vision.blocks.{i}.mlp.", _VIT + "encoder.layers.{i}.mlp."),
        Rule("vision.norm.", _VIT + "post_layernorm."),
        Rule("und_adaptor.fc1.", "model.aligner.fc1."),
        Rule("und_adaptor.fc2.", "model.aligner.hidden_layers.0."),
        Rule("gen_adaptor.fc1.", "model.generation_aligner.fc1."),
        Rule("gen_adaptor.fc2.", "model.generation_aligner.hidden_layers.0."),
        Rule("gen_head.fc1.", "model.generation_head.proj_out."),
        Rule("gen_head.fc2.", "model.generation_head.vision_head."),
        Rule("gen_embed.", "model.generation_embeddings."),
        Rule("vq.encoder.conv_blocks.{i}.res.", _VQ + "encoder.down.{i}.block."),
        Rule("vq.encoder.conv_blocks.{i}.", _VQ + "encoder.down.{i}."),
        Rule("vq.decoder.conv_blocks.{i}.res.", _VQ + "decoder.up.{i}.block."),
        Rule("vq.decoder.conv_blocks.{i}.", _VQ + "decoder.up.{i}."),
        *(
            Rule(f"vq.{part}.mid.{n}.", f"{_VQ}{part}.mid.{name}.")
            for part in ("encoder", "decoder")
            for n, name in enumerate(("block_1", "attn_1", "block_2"))
        ),
        Rule("vq.", _VQ),
    ],
}


def file_names(key: str, layout: str) -> tuple[list[str], str]:
    """The file's names for one of our weights, and how they combine."""
    for rule in RULES[layout]:
        name = rule.match(key)
        if name is not None:
            if rule.kind == "qkv":
                return [name.replace("{part}", p) for p in "qkv"], rule.kind
            return [name], rule.kind
    raise CheckpointError(f"no {layout} name for weight {key}")


def join(kind: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    if kind == "qkv":
        return torch.cat(tensors, dim=0)
    return tensors[0].unsqueeze(0) if kind == "pos" else tensors[0]


def split(kind: str, tensor: torch.Tensor) -> list[torch.Tensor]:
    if kind == "qkv":
        return list(tensor.chunk(3, dim=0))
    return [tensor.squeeze(0)] if kind == "pos" else [tensor]


# ---------------------------------------------------------------- reading


def read_config(path: str | Path) -> tuple[JanusConfig, str]:
    """The model config and layout name of a checkpoint directory."""
    path = Path(path)
    config_file = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory")
    if not config_file.is_file():
        raise CheckpointError(f"{path} has no config.json")
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_file} is not valid JSON: {e}") from None
    model_type = raw.get("model_type")
    try:
        if model_type == "multi_modality":
            return JanusConfig.from_official(raw), "official"
        if model_type == "janus":
            return JanusConfig.from_transformers(raw), "transformers"
        if model_type == NATIVE_TYPE:
            return JanusConfig.from_dict(raw), "native"
    except (ConfigError, KeyError, TypeError) as e:
        raise CheckpointError(f"{config_file}: {e}") from None
    raise CheckpointError(
        f"{config_file} has model_type {model_type!r}; expected 'multi_modality' (official), "
        f"'janus' (transformers) or '{NATIVE_TYPE}' (native)"
    )


class WeightFiles:
    """Every tensor of a checkpoint directory by name, read lazily (safetensors first, then .bin)."""

    def __init__(self, path: Path):
        self.path = path
        self.sources: dict[str, Path] = {}
        self._open: dict[Path, object] = {}
        files = self._weight_files()
        for file in files:
            for name in self._names(file):
                self.sources[name] = file

    def _weight_files(self) -> list[Path]:
        for suffix in (".safetensors", ".bin"):
            index = next(iter(sorted(self.path.glob(f"*{suffix}.index.json"))), None)
            if index is not None:
                try:
                    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                except (json.JSONDecodeError, KeyError, AttributeError) as e:
                    raise CheckpointError(f"{index} is not a valid weight index: {e!r}") from None
                missing = [s for s in shards if not (self.path / s).is_file()]
                if missing:
                    raise CheckpointError(f"{index.name} lists shard files that are missing: {missing}")
                return [self.path / s for s in shards]
            files = sorted(p for p in self.path.glob(f"*{suffix}") if p.is_file())
            if files:
                return files
        raise CheckpointError(f"{self.path} has no weights (*.safetensors or *.bin)")

    def _handle(self, file: Path):
        if file not in self._open:
            try:
                if file.suffix == ".safetensors":
                    self._open[file] = safe_open(str(file), framework="pt", device="cpu")
                else:
                    # Plain tensors only: a pickle from the internet must not run code.
                    self._open[file] = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except (SafetensorError, OSError, RuntimeError, EOFError, ValueError) as e:
                raise CheckpointError(f"{file.name} is corrupt or truncated: {e}") from None
            except Exception as e:  # unpickling errors come in many classes
                raise CheckpointError(f"{file.name} cannot be read as plain tensors: {e}") from None
            if file.suffix == ".bin" and not isinstance(self._open[file], dict):
                raise CheckpointError(f"{file.name} does not hold a state dict")
        return self._open[file]

    def _names(self, file: Path) -> list[str]:
        handle = self._handle(file)
        return list(handle.keys())

    def get(self, name: str) -> torch.Tensor:
        file = self.sources[name]
        handle = self._handle(file)
        try:
            return handle.get_tensor(name) if file.suffix == ".safetensors" else handle[name]
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{file.name}: weight {name} cannot be read ({e})") from None


def _resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use 'auto' or one of {sorted(names)}")
    return names[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(path: str | Path, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto") -> JanusModel:
    """Build the model of a checkpoint directory in any layout and load its weights strictly."""
    path = Path(path)
    cfg, layout = read_config(path)
    device = resolve_device(device)
    dtype = _resolve_dtype(dtype, device)
    files = WeightFiles(path)
    with torch.device("meta"):
        model = JanusModel(cfg)
    expected = model.state_dict()

    plan = {key: file_names(key, layout) for key in expected}
    missing = [n for names, _ in plan.values() for n in names if n not in files.sources]
    consumed = {n for names, _ in plan.values() for n in names}
    unexpected = [n for n in files.sources if n not in consumed and not IGNORED_KEYS.search(n)]
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match its config.json ({layout} layout): "
            + "; ".join(
                f"{len(names)} {what}: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"
                for what, names in (("missing", missing), ("unexpected", unexpected))
                if names
            )
        )
    state = {}
    for key, (names, kind) in plan.items():
        tensor = join(kind, [files.get(n) for n in names])
        if tensor.shape != expected[key].shape:
            raise CheckpointError(
                f"weight {names[0]} has shape {list(tensor.shape)} in {files.sources[names[0]].name}, "
                f"but config.json implies {list(expected[key].shape)}"
            )
        state[key] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


# ---------------------------------------------------------------- writing


def layout_state(model: JanusModel, layout: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's weights under a layout's names."""
    for key, tensor in model.state_dict().items():
        names, kind = file_names(key, layout)
        yield from zip(names, split(kind, tensor))


def layout_config(cfg: JanusConfig, layout: str, image_token_id: int | None) -> dict:
    if layout == "official":
        return cfg.to_official()
    if layout == "transformers":
        if image_token_id is None:
            raise CheckpointError("the transformers layout records the image token id: the checkpoint needs its tokenizer")
        return cfg.to_transformers(image_token_id)
    return {"model_type": NATIVE_TYPE, **cfg.to_dict()}


def save_model(
    model: JanusModel,
    dst: str | Path,
    layout: str = "native",
    extra_files_from: str | Path | None = None,
    image_token_id: int | None = None,
    max_shard_bytes: int = 4 << 30,
) -> Path:
    """Write a checkpoint directory atomically: it appears complete under `dst` or not at all.

    Weights go to safetensors shards of at most `max_shard_bytes` (with an index when there are
    several); other files of `extra_files_from` (tokenizer, processor configs) are copied along.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise CheckpointError(f"{dst} exists and is not empty; choose a new directory")
    config = layout_config(model.cfg, layout, image_token_id)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        if extra_files_from is not None:
            for f in Path(extra_files_from).iterdir():
                if f.is_file() and f.name != "config.json" and not _is_weight_file(f):
                    shutil.copy2(f, tmp / f.name)
        _write_shards(layout_state(model, layout), tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _set_public_modes(tmp)
        if dst.exists():
            dst.rmdir()
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _set_public_modes(directory: Path) -> None:
    """Give a directory made by mkdtemp (0700) and the files in it the modes a plain mkdir/open would
    (under the umask), so a checkpoint can be shared like any other directory."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for f in directory.iterdir():
        f.chmod(0o666 & ~umask)


def _is_weight_file(f: Path) -> bool:
    return f.name.endswith(WEIGHT_SUFFIXES) or f.name.endswith(".index.json")


def _write_shards(tensors: Iterator[tuple[str, torch.Tensor]], out: Path, max_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.detach().to("cpu").contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / WEIGHTS_NAME), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    (out / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2) + "\n")


def convert(src: str | Path, dst: str | Path, to: str) -> Path:
    """Rewrite a checkpoint in another layout, keeping its dtype, tokenizer and processor files."""
    from .processing.tokenizer import Tokenizer

    model = load_model(src, device="cpu", dtype=_file_dtype(Path(src)))
    image_token_id = None
    if to == "transformers":
        try:
            image_token_id = Tokenizer.from_dir(src).image_id
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read the tokenizer of {src}: {e}") from None
    return save_model(model, dst, to, extra_files_from=src, image_token_id=image_token_id)


def _file_dtype(path: Path) -> torch.dtype:
    """The floating dtype the checkpoint stores (its first floating tensor's)."""
    files = WeightFiles(path)
    for name in files.sources:
        tensor = files.get(name)
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32
