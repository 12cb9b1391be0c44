"""The sampler: batched prefill, one-token cached steps, classifier-free guidance, logits processing.

Image generation runs every image of a call in one batch (or in memory-sized chunks) of conditional
rows followed by their unconditional twins. Identical prefixes (the twins of prompts of one length,
the n copies of a prompt) are prefilled once and their keys/values copied to every row that shares
them. The loop has no host synchronisation: tokens stay on the device until the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor

from .models.attention import padded_causal_mask
from .models.unified import JanusModel

# Janus's image sampling settings; a checkpoint may name its own (generation_config.json).
DEFAULT_CFG_WEIGHT = 5.0
DEFAULT_TEMPERATURE = 1.0


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # 0 means greedy
    top_k: int | None = None
    top_p: float | None = None

    def validate(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be a positive integer, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample(logits: Tensor, s: Sampling, generator: torch.Generator | None = None) -> Tensor:
    """One token per row of float logits [B, V]."""
    if s.temperature == 0:
        return logits.argmax(-1)
    if s.temperature != 1:
        logits = logits / s.temperature
    if s.top_k is not None and s.top_k < logits.shape[-1]:
        kth = logits.topk(s.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p is not None and s.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token once the tokens ranked above it already hold top_p of the mass.
        drop_sorted = probs.cumsum(-1) - probs >= s.top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    # Inverse-CDF draw: one uniform per row, no host sync (unlike torch.multinomial) and far cheaper
    # than per-token noise. right=True never lands on a zero-probability token.
    cdf = logits.softmax(-1).cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, device=cdf.device, generator=generator) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)


def cfg_mix(logits: Tensor, weight: float) -> Tensor:
    """[2B, V] conditional rows then unconditional rows -> guided [B, V]: l_u + s (l_c - l_u)."""
    cond, uncond = logits.chunk(2)
    return uncond + weight * (cond - uncond)


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """tokens [B, L], valid [B, L] and RoPE positions [B, L] (each row counts from its first real token)."""
    length = max(len(r) for r in rows)
    tokens = torch.full((len(rows), length), pad_id, dtype=torch.long)
    valid = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, length - len(r):] = torch.tensor(r)
        valid[i, length - len(r):] = True
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    return tokens.to(device), valid.to(device), positions.to(device)


def unconditional(prompt: list[int], pad_id: int) -> list[int]:
    """The CFG twin: every token between BOS and the final <begin_of_image> becomes the pad token."""
    return prompt[:1] + [pad_id] * (len(prompt) - 2) + prompt[-1:]


def prefill_shared(model: JanusModel, rows: list[list[int]], pad_id: int, max_len: int):
    """Prefill each distinct row once, then copy its keys/values to every row that shares it.

    Sets up a cache of len(rows) x max_len slots. Returns the last hidden state [B, D], key validity
    [B, L] and next RoPE position [B] per row.
    """
    device = model.decoder.embed_tokens.weight.device
    distinct = {r: i for i, r in enumerate(dict.fromkeys(map(tuple, rows)))}
    row_of = torch.tensor([distinct[tuple(r)] for r in rows], device=device)
    tokens, valid, positions = left_pad([list(r) for r in distinct], pad_id, device)
    length = tokens.shape[1]
    slots = torch.arange(length, device=device)
    model.decoder.setup_cache(len(rows), max_len)
    hidden = model.decoder(model.embed(tokens), positions, padded_causal_mask(valid, slots), slots)[:, -1]
    model.decoder.share_prefix(row_of, length)
    return hidden[row_of], valid[row_of], positions[row_of, -1] + 1


def image_step(model: JanusModel, codes: Tensor, positions: Tensor, slot: Tensor, key_valid: Tensor) -> Tensor:
    """Image-head logits [B, V] after feeding `codes` [B] at cache `slot` ([1]); attends over the
    slots of `key_valid` [B, S] up to `slot` (S may be the whole cache, for static shapes)."""
    x = model.embed_image_codes(codes)[:, None]
    visible = key_valid & (torch.arange(key_valid.shape[1], device=slot.device) <= slot)
    hidden = model.decoder(x, positions[:, None], visible[:, None, None, :], slot)
    return model.image_logits(hidden[:, -1]).float()


@torch.no_grad()
def generate_image_codes(
    model: JanusModel,
    prompts: list[list[int]],
    pad_id: int,
    cfg_weight: float,
    sampling: Sampling,
    generator: torch.Generator | None = None,
    step_fn: Callable = image_step,
    static_cache_reads: bool = False,
    on_step: Callable[[], None] | None = None,
    with_loglik: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Codes [len(prompts), num_tokens] for prompts that end with <begin_of_image>, one image each;
    with `with_loglik`, also each image's log-likelihood [len(prompts)]: the sum of its codes'
    log-probabilities under the conditional logits, before guidance and temperature.

    cfg_weight == 1 is plain conditional sampling, so the unconditional rows are skipped.
    `static_cache_reads` makes every step read the whole cache, whose length is rounded up to a
    multiple of 64 so that few shapes occur (fixed shapes for CUDA graphs).
    """
    n_tokens = model.cfg.vq.num_tokens
    guided = cfg_weight != 1
    rows = prompts + [unconditional(p, pad_id) for p in prompts] if guided else prompts
    max_len = max(len(p) for p in prompts) + n_tokens
    if static_cache_reads:
        max_len = -(-max_len // 64) * 64
    hidden, valid, positions = prefill_shared(model, rows, pad_id, max_len)
    prefix = valid.shape[1]
    key_valid = torch.cat([valid, valid.new_ones(len(rows), max_len - prefix)], dim=1)
    logits = model.image_logits(hidden).float()
    codes = torch.empty(len(prompts), n_tokens, dtype=torch.long, device=hidden.device)
    loglik = torch.zeros(len(prompts), device=hidden.device)
    first_slot = torch.tensor([prefix], device=hidden.device)  # made once: a host->device copy each step would sync
    for i in range(n_tokens):
        token = sample(cfg_mix(logits, cfg_weight) if guided else logits, sampling, generator)
        codes[:, i] = token
        if with_loglik:
            loglik += logits[: len(prompts)].log_softmax(-1).gather(1, token[:, None])[:, 0]
        if on_step is not None:
            on_step()
        if i == n_tokens - 1:
            break
        reads = key_valid if static_cache_reads else key_valid[:, : prefix + i + 1]
        logits = step_fn(model, token.repeat(2) if guided else token, positions + i, first_slot + i, reads)
    return (codes, loglik) if with_loglik else codes


@torch.no_grad()
def generate_text(
    model: JanusModel,
    tokens: Tensor,
    image_mask: Tensor | None,
    pixels: Tensor | None,
    max_new_tokens: int,
    eos_id: int | None,
    sampling: Sampling,
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
) -> Iterator[int]:
    """Yield the answer's token ids one by one for a single prompt [1, T] (stops after EOS).

    `vocab_size` excludes the head's rows past the tokenizer's vocabulary (checkpoints pad the head).
    """
    device = tokens.device
    length = tokens.shape[1]
    model.decoder.setup_cache(1, length + max_new_tokens, name="text")
    slots = torch.arange(length, device=device)
    valid = torch.ones(1, length + max_new_tokens, dtype=torch.bool, device=device)
    h = model.embed(tokens, image_mask, pixels)
    hidden = model.decoder(h, slots[None], padded_causal_mask(valid[:, :length], slots), slots)[:, -1]
    for i in range(max_new_tokens):
        token = sample(model.text_logits(hidden)[:, :vocab_size].float(), sampling, generator)
        token_id = int(token)  # the caller needs it now: stop test and streaming
        yield token_id
        if token_id == eos_id:
            return
        slot = torch.tensor([length + i], device=device)
        x = model.decoder.embed_tokens(token)[:, None]
        hidden = model.decoder(x, slot[None], valid[:, None, None, : length + i + 1], slot)[:, -1]
