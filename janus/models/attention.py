"""Attention kernels and masks.

flash-attn is used for unmasked causal attention on CUDA in half precision when it is installed;
everything else goes through PyTorch SDPA (which picks its own fused kernel). Both compute the same
function; the masks here make padded batches and cached decoding exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    from flash_attn import flash_attn_func
except ImportError:  # optional extra: pip install janus-unified[flash]
    flash_attn_func = None


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """q [B, H, T, D], k/v [B, Hkv, S, D] (Hkv divides H); mask bool [B, 1, T, S] or None for causal (S == T)."""
    if mask is None and flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return out.transpose(1, 2)
    gqa = q.shape[1] != k.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def padded_causal_mask(key_valid: Tensor, query_slots: Tensor) -> Tensor:
    """Mask [B, 1, T, S] for queries at cache slots `query_slots` [T] over keys with validity [B, S].

    A key is visible when it is valid (not padding) and not after the query. A padding query sees
    itself only, so its softmax stays finite; its output is never used.
    """
    slots = torch.arange(key_valid.shape[1], device=key_valid.device)
    causal = slots[None, :] <= query_slots[:, None]
    own = slots[None, :] == query_slots[:, None]
    return ((causal[None] & key_valid[:, None, :]) | own[None])[:, None]
