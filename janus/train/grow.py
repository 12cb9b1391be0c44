"""Grow a trained model's decoder in depth without changing what it computes.

Each block is followed by a copy of itself whose two output projections (attention `o_proj`, MLP
`down_proj`) are zero, so the copy adds nothing to the residual stream until training moves them
(block expansion, as in LLaMA Pro). The copy's other weights are trained ones rather than random, so
the zeroed projections get useful gradients from the first step.
"""

from __future__ import annotations

import dataclasses

import torch

from janus.models.unified import JanusModel


def grow_depth(model: JanusModel) -> JanusModel:
    """A model with twice the decoder layers that gives the same outputs as `model` (left unchanged)."""
    decoder_cfg = dataclasses.replace(model.cfg.decoder, n_layers=2 * model.cfg.decoder.n_layers)
    grown = JanusModel(dataclasses.replace(model.cfg, decoder=decoder_cfg))
    state = model.state_dict()
    grown_state = {}
    prefix = "decoder.layers."
    for key, tensor in state.items():
        if not key.startswith(prefix):
            grown_state[key] = tensor.clone()
            continue
        index, rest = key[len(prefix):].split(".", 1)
        grown_state[f"{prefix}{2 * int(index)}.{rest}"] = tensor.clone()
        silent = rest.endswith(("o_proj.weight", "down_proj.weight"))
        grown_state[f"{prefix}{2 * int(index) + 1}.{rest}"] = torch.zeros_like(tensor) if silent else tensor.clone()
    grown.load_state_dict(grown_state, strict=True)
    return grown.to(next(model.parameters()).dtype).train(model.training)
