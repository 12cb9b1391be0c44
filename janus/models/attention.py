"""Attention kernels and masks.

flash-attn is used on CUDA (Ampere or newer) in half precision when it is installed: its causal
kernel for unmasked attention and its varlen kernel for packed training rows. Everything else goes
through PyTorch SDPA (which picks its own fused kernel) with an explicit mask. Both compute the same
function; the masks here make padded batches, packed documents and cached decoding exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, cached_property

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except ImportError:  # optional extra: pip install janus-unified[flash]
    flash_attn_func = flash_attn_varlen_func = None


@dataclass(eq=False)
class Documents:
    """The document layout of packed rows: what attention may see in packed training.

    doc_ids [B, T]: 0, 1, ... per document within a row, -1 on padding. Each position attends
    causally within its own document only, so a packed row computes what its documents would compute
    one by one. flash-attn's varlen kernel takes this as runs of positions (`runs`); SDPA takes `mask`.
    """

    doc_ids: Tensor

    @cached_property
    def mask(self) -> Tensor:
        """bool [B, 1, T, T]. A padding position sees only itself, so its softmax stays finite; its
        output takes no loss."""
        length = self.doc_ids.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=self.doc_ids.device).tril()
        same = self.doc_ids[:, :, None] == self.doc_ids[:, None, :]
        own = torch.eye(length, dtype=torch.bool, device=self.doc_ids.device)
        return ((same & causal & (self.doc_ids >= 0)[:, :, None]) | own)[:, None]

    @cached_property
    def runs(self) -> tuple[Tensor, int]:
        """(cu_seqlens int32 [R + 1], longest run) over the rows flattened to [B * T]: a run is a
        document, or a row's padding (which then attends within the padding, harmlessly)."""
        flat = self.doc_ids.flatten()
        index = torch.arange(flat.numel(), device=flat.device)
        starts = (index % self.doc_ids.shape[1] == 0) | (flat != flat.roll(1))
        bounds = torch.cat([index[starts], index.new_tensor([flat.numel()])])
        return bounds.to(torch.int32), int((bounds[1:] - bounds[:-1]).max())


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, docs: Documents, kernel=None) -> Tensor:
    """Causal attention within each run of `docs` through a flash-attn-style varlen kernel
    (q [N, H, D], k/v [N, Hkv, D], cu_seqlens, max lengths); shapes as `attention`."""
    kernel = kernel or flash_attn_varlen_func
    b, h, t, d = q.shape
    cu_seqlens, longest = docs.runs

    def flat(x: Tensor) -> Tensor:
        return x.transpose(1, 2).reshape(b * t, x.shape[1], d)

    out = kernel(flat(q), flat(k), flat(v), cu_seqlens, cu_seqlens, longest, longest, causal=True)
    return out.view(b, t, h, d).transpose(1, 2)


@cache
def _flash_supports(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 8  # flash-attn 2 needs Ampere or newer


def _flash_applies(q: Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _flash_supports(q.device.index)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | Documents | None) -> Tensor:
    """q [B, H, T, D], k/v [B, Hkv, S, D] (Hkv divides H); mask bool [B, 1, T, S], packed `Documents`
    (S == T), or None for causal (S == T)."""
    if isinstance(mask, Documents):
        if flash_attn_varlen_func is not None and _flash_applies(q):
            return varlen_attention(q, k, v, mask)
        mask = mask.mask
    if mask is None and flash_attn_func is not None and _flash_applies(q):
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
