"""A fresh model to train from scratch: new weights around a trained VQ tokenizer and a text tokenizer;
refitting a trained model with a pretrained understanding encoder or a refitted VQ decoder; a
weighted average of a model and one fine-tuned from it.

This is the "stage 0 export" that stage 1 starts from when no pretrained checkpoint is used, as for
the built-in default model (stages/build_default_model.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..checkpoint import load_model, save_model
from ..models.config import ConfigError, JanusConfig
from ..models.unified import JanusModel
from ..processing.tokenizer import Tokenizer


def init_weights(model: JanusModel, std: float = 0.02) -> None:
    """GPT-style initialisation of the decoder, adaptors and image head: N(0, std) weights, zero biases.

    The SigLIP tower keeps timm's own initialisation, and the VQ tokenizer is loaded from stage 0.
    """
    for part in (model.decoder, model.und_adaptor, model.gen_embed, model.gen_adaptor, model.gen_head):
        for module in part.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)


def assemble_model(cfg: JanusConfig, vq_weights: str | Path, tokenizer_dir: str | Path, out: str | Path, seed: int = 0) -> Path:
    """Write a native checkpoint to `out`: freshly initialised weights, the VQ from `vq_weights`
    (a stage-0 `vq.safetensors`) and the tokenizer files of `tokenizer_dir`."""
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    if tokenizer.vocab_size > cfg.decoder.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but the decoder's vocab_size is {cfg.decoder.vocab_size}")
    torch.manual_seed(seed)
    model = JanusModel(cfg)
    init_weights(model)
    try:
        model.vq.load_state_dict(load_file(str(vq_weights)))
    except RuntimeError as e:  # names or shapes that do not match the config's VQ
        raise ConfigError(f"{vq_weights} does not fit the model's VQ config {cfg.vq}: {e}") from None
    return save_model(model, out, "native", extra_files_from=tokenizer_dir, image_token_id=tokenizer.image_id)


def load_encoder(model: JanusModel, vit_weights: str | Path) -> None:
    """Put a stage-0 `vit.safetensors` into the model's understanding encoder."""
    try:
        model.vision.load_state_dict(load_file(str(vit_weights)))
    except RuntimeError as e:  # names or shapes that do not match the config's vision encoder
        raise ConfigError(f"{vit_weights} does not fit the model's vision config {model.cfg.vision}: {e}") from None


def refit_encoder(src: str | Path, vit_weights: str | Path, out: str | Path) -> Path:
    """Write the checkpoint `src` to `out` with its understanding encoder replaced by `vit_weights` (a
    stage-0 `vit.safetensors`); the adaptor then needs realigning (a stage-1 run) before use."""
    model = load_model(src, "cpu")
    load_encoder(model, vit_weights)
    return save_model(model, out, "native", extra_files_from=src, image_token_id=Tokenizer.from_dir(src).image_id)


def refit_vq_decoder(src: str | Path, vq_weights: str | Path, out: str | Path) -> Path:
    """Write the checkpoint `src` to `out` with its VQ replaced by `vq_weights` (a stage-0
    `vq.safetensors` made with `train: decoder` from this model's VQ). Only the decoder may differ:
    a changed encoder or codebook would give images other codes than the ones the model learnt."""
    model = load_model(src, "cpu")
    new = load_file(str(vq_weights))
    old = model.vq.state_dict()
    if set(new) != set(old) or any(new[k].shape != old[k].shape for k in old):
        raise ConfigError(f"{vq_weights} does not fit the VQ of {src}")
    frozen = [k for k in old if k.startswith(("encoder.", "quant_conv.", "quantize.")) and not torch.equal(new[k], old[k].to(new[k].dtype))]
    if frozen:
        raise ConfigError(f"{vq_weights} changes the encoder or codebook of {src}'s VQ ({', '.join(frozen[:3])} ...): "
                          "only a decoder refit (stage 0 with train: decoder) keeps the model's image codes")
    model.vq.load_state_dict(new)
    return save_model(model, out, "native", extra_files_from=src, image_token_id=Tokenizer.from_dir(src).image_id)


def interpolate_models(start: str | Path, tuned: str | Path, weight: float, out: str | Path) -> Path:
    """Write `start + weight * (tuned - start)`, tensor by tensor, to `out`.

    `tuned` must be fine-tuned from `start` (the same config): between two models of one basin lie
    ones that keep much of what the fine-tuning taught and win back much of what it cost (WiSE-FT,
    Wortsman et al. 2022). Weights the two share (a frozen VQ) stay exactly equal.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must lie in [0, 1], got {weight}")
    base, other = load_model(start, "cpu"), load_model(tuned, "cpu")
    if base.cfg != other.cfg:
        raise ConfigError(f"{tuned} has another config than {start}: only a model fine-tuned from the other can be averaged with it")
    tuned_state = other.state_dict()
    with torch.no_grad():
        for name, tensor in base.state_dict().items():
            if tensor.is_floating_point():
                tensor.lerp_(tuned_state[name], weight)
    return save_model(base, out, "native", extra_files_from=tuned, image_token_id=Tokenizer.from_dir(tuned).image_id)
