"""Dataclass configs for the Janus model and its parts, and their public JSON/YAML forms.

One `JanusConfig` describes a model whatever layout it came from: the official `multi_modality`
config.json, the transformers `janus` config.json, or our YAML presets in `configs/models/`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Fields an official `language_config` may omit (Janus-Pro-7B omits its width, heads and MLP size):
# transformers' LlamaConfig defaults, which is what the reference code falls back to.
LLAMA_DEFAULTS = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 2048,
}

# SigLIP presets named by official checkpoints (vision_config.params.model_name).
SIGLIP_PRESETS = {
    "siglip_large_patch16_384": dict(patch_size=16, width=1024, depth=24, num_heads=16, mlp_ratio=4.0),
}

PRESETS_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"

# Chat role names: Janus-Pro uses the bracketed form, Janus-1.3B the plain one.
PRO_ROLES = ("<|User|>", "<|Assistant|>")
PLAIN_ROLES = ("User", "Assistant")


class ConfigError(ValueError):
    """A config file that does not describe a model we can build."""


@dataclass
class DecoderConfig:
    """DeepSeek-LLM / Llama decoder."""

    vocab_size: int = 102400
    dim: int = 2048
    n_layers: int = 24
    n_heads: int = 16
    n_kv_heads: int = 16
    intermediate_size: int = 5632
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    max_seq_len: int = 4096

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def validate(self) -> None:
        if self.dim % self.n_heads:
            raise ConfigError(f"decoder dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"decoder n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")


@dataclass
class VisionConfig:
    """SigLIP ViT (timm names), no class token; its features feed the understanding adaptor."""

    image_size: int = 384
    patch_size: int = 16
    width: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def validate(self) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")


@dataclass
class VQConfig:
    """LlamaGen VQ tokenizer. The decoder has one more res block per level than the encoder."""

    image_size: int = 384
    codebook_size: int = 16384
    codebook_dim: int = 8
    z_channels: int = 256
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    commit_beta: float = 0.25

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.downsample

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2

    def validate(self) -> None:
        if self.image_size % self.downsample:
            raise ConfigError(f"vq image_size {self.image_size} is not a multiple of its downsampling {self.downsample}")
        for mult in self.channel_mult:
            if (self.base_channels * mult) % 32:
                raise ConfigError("vq channels must be multiples of 32 (GroupNorm with 32 groups)")


@dataclass
class JanusConfig:
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    vq: VQConfig = field(default_factory=VQConfig)
    roles: tuple[str, str] = PRO_ROLES

    def __post_init__(self) -> None:
        self.vq.channel_mult = tuple(self.vq.channel_mult)
        self.roles = tuple(self.roles)
        self.decoder.validate()
        self.vision.validate()
        self.vq.validate()

    # ---- native form (our YAML presets and native checkpoints) ----
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["vq"]["channel_mult"] = list(self.vq.channel_mult)
        d["roles"] = list(self.roles)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "JanusConfig":
        known = {"decoder", "vision", "vq", "roles"}
        unknown = set(d) - known - {"model_type"}
        if unknown:
            raise ConfigError(f"unknown config sections: {sorted(unknown)}")
        try:
            return cls(
                decoder=DecoderConfig(**d.get("decoder", {})),
                vision=VisionConfig(**d.get("vision", {})),
                vq=VQConfig(**d.get("vq", {})),
                roles=tuple(d.get("roles", PRO_ROLES)),
            )
        except TypeError as e:  # unknown field inside a section
            raise ConfigError(f"bad config field: {e}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> "JanusConfig":
        with open(path) as f:
            return cls.from_dict(yaml.safe_load(f) or {})

    @classmethod
    def preset(cls, name: str) -> "JanusConfig":
        path = PRESETS_DIR / f"{name}.yaml"
        if not path.is_file():
            available = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
            raise ConfigError(f"no model preset named {name!r}; available: {available}")
        return cls.from_yaml(path)

    # ---- official `multi_modality` config.json ----
    @classmethod
    def from_official(cls, d: dict[str, Any]) -> "JanusConfig":
        lang = {**LLAMA_DEFAULTS, **d["language_config"]}
        decoder = DecoderConfig(
            vocab_size=lang["vocab_size"],
            dim=lang["hidden_size"],
            n_layers=lang["num_hidden_layers"],
            n_heads=lang["num_attention_heads"],
            n_kv_heads=lang.get("num_key_value_heads") or lang["num_attention_heads"],
            intermediate_size=lang["intermediate_size"],
            rope_theta=lang["rope_theta"],
            norm_eps=lang["rms_norm_eps"],
            max_seq_len=lang["max_position_embeddings"],
        )
        vp = d["vision_config"]["params"]
        # Our converter writes explicit sizes beside model_name (the reference ignores extra params),
        # so tiny models round-trip; real checkpoints name a preset.
        sizes = {k: vp[k] for k in ("patch_size", "width", "depth", "num_heads", "mlp_ratio") if k in vp}
        if len(sizes) < 5:
            name = vp.get("model_name")
            if name not in SIGLIP_PRESETS:
                raise ConfigError(f"unsupported vision model_name {name!r}; known: {sorted(SIGLIP_PRESETS)}")
            sizes = {**SIGLIP_PRESETS[name], **sizes}
        vision = VisionConfig(image_size=vp.get("image_size", 384), **sizes)
        if vp.get("select_layer", -1) != -1 or vp.get("select_feature", "same") != "same":
            raise ConfigError("only select_layer=-1 and select_feature='same' vision towers are supported")

        gp = d["gen_vision_config"]["params"]
        vq = VQConfig(
            image_size=gp.get("image_size", 384),
            codebook_size=gp.get("image_token_size", 16384),
            codebook_dim=gp.get("n_embed", 8),
            z_channels=gp.get("z_channels", 256),
            base_channels=gp.get("base_channels", 128),
            channel_mult=tuple(gp.get("encoder_ch_mult", (1, 1, 2, 2, 4))),
            num_res_blocks=gp.get("num_res_blocks", 2),
        )
        _check_official_heads(d, decoder, vision, vq)
        return cls(decoder=decoder, vision=vision, vq=vq, roles=tuple(d.get("janus_roles", PRO_ROLES)))

    def to_official(self) -> dict[str, Any]:
        dec, vis, vq = self.decoder, self.vision, self.vq

        def mlp(name: str, input_dim: int) -> dict[str, Any]:
            params = {"depth": 2, "input_dim": input_dim, "n_embed": dec.dim, "projector_type": "mlp_gelu"}
            return {"cls": "MlpProjector", "model_type": name, "params": params}

        return {
            "model_type": "multi_modality",
            "architectures": ["MultiModalityCausalLM"],
            "language_config": {
                "model_type": "llama",
                "vocab_size": dec.vocab_size,
                "hidden_size": dec.dim,
                "intermediate_size": dec.intermediate_size,
                "num_hidden_layers": dec.n_layers,
                "num_attention_heads": dec.n_heads,
                "num_key_value_heads": dec.n_kv_heads,
                "rms_norm_eps": dec.norm_eps,
                "rope_theta": dec.rope_theta,
                "max_position_embeddings": dec.max_seq_len,
            },
            "vision_config": {
                "cls": "CLIPVisionTower",
                "model_type": "vision",
                "params": {
                    "image_size": vis.image_size,
                    "model_name": "siglip_large_patch16_384",
                    "select_feature": "same",
                    "select_layer": -1,
                    "patch_size": vis.patch_size,
                    "width": vis.width,
                    "depth": vis.depth,
                    "num_heads": vis.num_heads,
                    "mlp_ratio": vis.mlp_ratio,
                },
            },
            "aligner_config": mlp("aligner", vis.width),
            "gen_vision_config": {
                "cls": "VQ-16",
                "model_type": "gen_vision",
                "params": {
                    "image_token_size": vq.codebook_size,
                    "n_embed": vq.codebook_dim,
                    "image_size": vq.image_size,
                    "z_channels": vq.z_channels,
                    "base_channels": vq.base_channels,
                    "encoder_ch_mult": list(vq.channel_mult),
                    "decoder_ch_mult": list(vq.channel_mult),
                    "num_res_blocks": vq.num_res_blocks,
                },
            },
            "gen_aligner_config": mlp("gen_aligner", vq.codebook_dim),
            "gen_head_config": {
                "cls": "vision_head",
                "model_type": "gen_head",
                "params": {"n_embed": dec.dim, "image_token_embed": dec.dim, "image_token_size": vq.codebook_size},
            },
            "janus_roles": list(self.roles),
        }

    # ---- transformers `janus` config.json ----
    @classmethod
    def from_transformers(cls, d: dict[str, Any]) -> "JanusConfig":
        text, vis, vq = d.get("text_config", {}), d.get("vision_config", {}), d.get("vq_config", {})
        text = {**LLAMA_DEFAULTS, **text}
        rope_theta = text.get("rope_theta") or (text.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        decoder = DecoderConfig(
            vocab_size=text["vocab_size"],
            dim=text["hidden_size"],
            n_layers=text["num_hidden_layers"],
            n_heads=text["num_attention_heads"],
            n_kv_heads=text.get("num_key_value_heads") or text["num_attention_heads"],
            intermediate_size=text["intermediate_size"],
            rope_theta=rope_theta,
            norm_eps=text["rms_norm_eps"],
            max_seq_len=text["max_position_embeddings"],
        )
        vision = VisionConfig(
            image_size=vis.get("image_size", 384),
            patch_size=vis.get("patch_size", 16),
            width=vis.get("hidden_size", 1024),
            depth=vis.get("num_hidden_layers", 24),
            num_heads=vis.get("num_attention_heads", 16),
            mlp_ratio=vis.get("mlp_ratio", 4.0),
        )
        if vis.get("use_qk_norm") or vis.get("depth", 2) != 2 or vq.get("num_hidden_layers", 2) != 2:
            raise ConfigError("only 2-layer adaptors and vision towers without qk-norm are supported")
        grid = vision.image_size // vision.patch_size  # transformers ties the VQ grid to the vision grid
        channel_mult = tuple(vq.get("channel_multiplier", (1, 1, 2, 2, 4)))
        vqc = VQConfig(
            image_size=grid * 2 ** (len(channel_mult) - 1),
            codebook_size=vq.get("num_embeddings", 16384),
            codebook_dim=vq.get("embed_dim", 8),
            z_channels=vq.get("latent_channels", 256),
            base_channels=vq.get("base_channels", 128),
            channel_mult=channel_mult,
            num_res_blocks=vq.get("num_res_blocks", 2),
        )
        widths = {
            "vision_config.projection_dim": vis.get("projection_dim"),
            "vq_config.projection_dim": vq.get("projection_dim"),
            "vq_config.image_token_embed_dim": vq.get("image_token_embed_dim"),
        }
        for name, value in widths.items():
            if value not in (None, decoder.dim):
                raise ConfigError(f"{name} is {value}; it must equal the decoder width {decoder.dim}")
        return cls(decoder=decoder, vision=vision, vq=vqc, roles=tuple(d.get("janus_roles", PRO_ROLES)))

    def to_transformers(self, image_token_id: int) -> dict[str, Any]:
        dec, vis, vq = self.decoder, self.vision, self.vq
        if vq.grid_size != vis.image_size // vis.patch_size:
            raise ConfigError(
                "the transformers layout ties the VQ grid to the vision grid: "
                f"{vq.grid_size} != {vis.image_size // vis.patch_size}"
            )
        return {
            "model_type": "janus",
            "architectures": ["JanusForConditionalGeneration"],
            "image_token_id": image_token_id,
            "tie_word_embeddings": False,
            "text_config": {
                "model_type": "llama",
                "vocab_size": dec.vocab_size,
                "hidden_size": dec.dim,
                "intermediate_size": dec.intermediate_size,
                "num_hidden_layers": dec.n_layers,
                "num_attention_heads": dec.n_heads,
                "num_key_value_heads": dec.n_kv_heads,
                "rms_norm_eps": dec.norm_eps,
                "rope_theta": dec.rope_theta,
                "max_position_embeddings": dec.max_seq_len,
                "tie_word_embeddings": False,
            },
            "vision_config": {
                "image_size": vis.image_size,
                "patch_size": vis.patch_size,
                "hidden_size": vis.width,
                "num_hidden_layers": vis.depth,
                "num_attention_heads": vis.num_heads,
                "mlp_ratio": vis.mlp_ratio,
                "projection_dim": dec.dim,
                "num_image_tokens": vis.num_patches,
            },
            "vq_config": {
                "num_embeddings": vq.codebook_size,
                "embed_dim": vq.codebook_dim,
                "latent_channels": vq.z_channels,
                "base_channels": vq.base_channels,
                "channel_multiplier": list(vq.channel_mult),
                "num_res_blocks": vq.num_res_blocks,
                "projection_dim": dec.dim,
                "image_token_embed_dim": dec.dim,
            },
            "janus_roles": list(self.roles),
        }


def _check_official_heads(d: dict[str, Any], dec: DecoderConfig, vis: VisionConfig, vq: VQConfig) -> None:
    """The adaptors and the image head have fixed shapes; refuse configs that say otherwise."""
    expect = {
        "aligner_config": {"input_dim": vis.width, "n_embed": dec.dim, "depth": 2},
        "gen_aligner_config": {"input_dim": vq.codebook_dim, "n_embed": dec.dim, "depth": 2},
        "gen_head_config": {"n_embed": dec.dim, "image_token_embed": dec.dim, "image_token_size": vq.codebook_size},
    }
    for section, fields in expect.items():
        params = d.get(section, {}).get("params", {})
        for key, value in fields.items():
            if key in params and params[key] != value:
                raise ConfigError(f"{section}.params.{key} is {params[key]}, expected {value}")
