"""DeepSeek-LLM decoder (Llama architecture): RMSNorm, RoPE, SwiGLU, optional grouped KV heads.

Parameter names follow transformers' Llama so checkpoint layouts differ only by a prefix. The decoder
works on embeddings, not token ids: the unified model mixes text, image features and image codes.
Two modes share one code path (as in gpt-fast):
- no cache: attend within the given sequence (training, scoring); `mask=None` means plain causal,
  `Documents` packed training rows;
- cached: `setup_cache` allocates key/value buffers once (image generation and chat each have their
  own); each call writes its keys and values at `cache_pos` and attends over the first
  `mask.shape[-1]` cache slots, so the caller picks how much of the cache a step reads and a padded
  batch needs no special code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention import Documents, attention
from .config import DecoderConfig
from .linear import Linear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 as the reference does, then cast back before the scale.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_tables(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin [B, 1, T, head_dim] for the given positions [B, T] (half-split layout, as Llama)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class KVCache(nn.Module):
    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, cache_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write at `cache_pos` of the first k.shape[0] rows (a call may use fewer rows than allocated)."""
        b = k.shape[0]
        self.k[:b, :, cache_pos] = k
        self.v[:b, :, cache_pos] = v
        return self.k[:b], self.v[:b]


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | Documents | None, cache_pos: Tensor | None) -> Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache_pos is not None:
            k, v = self.cache.update(cache_pos, k, v)
            k, v = k[:, :, : mask.shape[-1]], v[:, :, : mask.shape[-1]]
        y = attention(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | Documents | None, cache_pos: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.checkpoint_layers = False  # training: recompute each layer in the backward pass to save memory
        self.caches: dict[str, list[KVCache]] = {}  # by name; see setup_cache

    def setup_cache(self, batch: int, max_len: int, name: str = "image") -> None:
        """Make the key/value cache called `name`, at least `batch` rows of `max_len` slots, the one
        the layers use. Caches are kept by name, and one with as many rows or more (calls may use fewer
        rows than allocated) and the same length is reused, so a compiled (CUDA-graph) step keeps
        seeing the same buffers, also for a smaller last chunk; chat uses its own name."""
        p = self.embed_tokens.weight
        caches = self.caches.get(name)
        k = caches[0].k if caches else None
        if k is None or k.shape[0] < batch or (k.shape[2], k.dtype, k.device) != (max_len, p.dtype, p.device):
            caches = [
                KVCache(batch, layer.self_attn.n_kv_heads, max_len, layer.self_attn.head_dim, p.dtype, p.device)
                for layer in self.layers
            ]
            self.caches[name] = caches
        for layer, cache in zip(self.layers, caches):
            layer.self_attn.cache = cache

    def share_prefix(self, rows: Tensor, length: int) -> None:
        """Make the first `length` slots of cache row i a copy of row `rows[i]`: a prefix computed
        once (in the first rows) serves every row that shares it."""
        for layer in self.layers:
            cache = layer.self_attn.cache
            for buf in (cache.k, cache.v):
                buf[: len(rows), :, :length] = buf[rows, :, :length]

    def drop_cache(self, name: str) -> None:
        """Free the cache called `name` (a no-op when there is none)."""
        caches = self.caches.pop(name, None)
        for layer in self.layers:
            if caches is not None and layer.self_attn.cache in caches:
                layer.self_attn.cache = None

    def forward(
        self,
        x: Tensor,
        positions: Tensor,
        mask: Tensor | Documents | None = None,
        cache_pos: Tensor | None = None,
    ) -> Tensor:
        """Hidden states after the final norm.

        x: [B, T, dim] input embeddings; positions: [B, T] RoPE positions (per row, so left-padded rows
        start at 0 on their first real token); mask: bool [B, 1, T, S], True where attention is allowed
        (S = T without cache, else the number of cache slots read), or the `Documents` of packed rows;
        cache_pos: [T] cache slots to write.
        """
        if cache_pos is not None and (mask is None or self.layers[0].self_attn.cache is None):
            raise ValueError("cached decoding needs setup_cache() and an explicit mask")
        cos, sin = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        for layer in self.layers:
            if self.checkpoint_layers and self.training:
                x = checkpoint(layer, x, cos, sin, mask, cache_pos, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache_pos)
        return self.norm(x)
