"""Records to token sequences with next-token targets (DESIGN.md §3, §6).

`targets[t]` is what position t predicts (token t + 1) or IGNORE: understanding data takes loss on the
assistant answers only, text data on every token, generation data on the image codes only.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor

from janus.models.config import JanusConfig
from janus.models.unified import IGNORE
from janus.processing import DEFAULT_SYSTEM_PROMPT, Tokenizer, expand_image_tokens, generation_prompt
from janus.processing import preprocess_understanding, render_chat
from janus.sampling import unconditional

from .records import KINDS, Record

ImageCodesFn = Callable[[Image.Image], Tensor]  # a PIL image -> its VQ codes, LongTensor [num_tokens]


@dataclass
class Sample:
    """One document: 1-D tensors of equal length."""

    tokens: Tensor  # long: text ids, VQ codes where code_mask
    code_mask: Tensor  # bool: position holds a VQ code
    image_mask: Tensor  # bool: understanding placeholder, filled with image features
    targets: Tensor  # long: the token this position predicts, IGNORE for no loss
    target_is_code: Tensor  # bool: the target is a VQ code (image head)
    kind: int  # index in KINDS: 0 understanding, 1 text, 2 generation
    pixels: Tensor | None  # understanding images [N, 3, S, S], in placeholder order

    def __len__(self) -> int:
        return len(self.tokens)


def build_sample(
    record: Record,
    tokenizer: Tokenizer,
    roles: tuple[str, str],
    cfg: JanusConfig,
    image_codes_fn: ImageCodesFn,
    rng: random.Random,
    max_len: int | None = None,
    uncond_prob: float = 0.1,
) -> Sample | None:
    """The training sequence of `record`; None when it is longer than `max_len`."""
    if record.kind == "understanding":
        sample = _understanding(record, tokenizer, roles, cfg)
    elif record.kind == "text":
        sample = _text(record.data["text"], tokenizer)
    else:
        sample = _generation(record, tokenizer, roles, image_codes_fn, rng.random() < uncond_prob)
    return None if max_len is not None and len(sample) > max_len else sample


def chat_segments(conversation: list[dict], roles: tuple[str, str], system: str) -> list[tuple[str, bool]]:
    """(text, is_answer) pieces that concatenate to `render_chat(conversation, roles, system)`.

    An answer is " " + content + EOS: what the model writes after the `role + ":"` cue that ends an
    inference prompt. Each cut is taken from render_chat itself, so the pieces follow the template.
    """
    segments, done = [], ""
    for i, message in enumerate(conversation):
        if message["role"] == "assistant":
            cue = render_chat(conversation[:i] + [{"role": "assistant", "content": ""}], roles, system)
            full = render_chat(conversation[: i + 1], roles, system)
            segments += [(cue[len(done) :], False), (full[len(cue) :], True)]
            done = full
    rest = render_chat(conversation, roles, system)[len(done) :]
    return segments + ([(rest, False)] if rest else [])


def _understanding(record: Record, tokenizer: Tokenizer, roles: tuple[str, str], cfg: JanusConfig) -> Sample:
    ids, is_answer = [tokenizer.bos_id], [False]
    for text, answer in chat_segments(record.data["conversation"], roles, DEFAULT_SYSTEM_PROMPT):
        piece = tokenizer.encode(text, bos=False)
        if not answer:  # answers hold no images (checked when the record was read)
            piece = expand_image_tokens(piece, tokenizer, cfg.vision.num_patches)
        ids += piece
        is_answer += [answer] * len(piece)
    tokens = torch.tensor(ids)
    targets = torch.full_like(tokens, IGNORE)
    answer = torch.tensor(is_answer)
    targets[:-1][answer[1:]] = tokens[1:][answer[1:]]
    pixels = preprocess_understanding(record.images, cfg.vision.image_size) if record.images else None
    n = len(tokens)
    return Sample(tokens, _no(n), tokens == tokenizer.image_id, targets, _no(n), KINDS.index("understanding"), pixels)


def _text(text: str, tokenizer: Tokenizer) -> Sample:
    tokens = torch.tensor([*tokenizer.encode(text), tokenizer.eos_id])
    targets = torch.cat([tokens[1:], torch.tensor([IGNORE])])
    n = len(tokens)
    return Sample(tokens, _no(n), _no(n), targets, _no(n), KINDS.index("text"), None)


def _generation(
    record: Record, tokenizer: Tokenizer, roles: tuple[str, str], image_codes_fn: ImageCodesFn, uncond: bool
) -> Sample:
    prompt = tokenizer.encode(generation_prompt(record.data["caption"], roles))
    if uncond:  # the classifier-free-guidance twin, so the model learns the unconditional branch
        prompt = unconditional(prompt, tokenizer.pad_id)
    codes = image_codes_fn(record.images[0]).long().cpu()
    tokens = torch.cat([torch.tensor(prompt), codes])
    code_mask = torch.arange(len(tokens)) >= len(prompt)
    targets = torch.full_like(tokens, IGNORE)
    targets[len(prompt) - 1 : -1] = codes  # <begin_of_image> predicts code 0, code i predicts code i + 1
    return Sample(tokens, code_mask, _no(len(tokens)), targets, targets != IGNORE, KINDS.index("generation"), None)


def _no(n: int) -> Tensor:
    return torch.zeros(n, dtype=torch.bool)


class SampleBuilder:
    """`build_sample` with its settings and its own seeded rng, whose state is saved for exact resumption."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        cfg: JanusConfig,
        image_codes_fn: ImageCodesFn,
        max_len: int,
        uncond_prob: float = 0.1,
        seed: int = 0,
    ) -> None:
        self.tokenizer, self.cfg, self.image_codes_fn = tokenizer, cfg, image_codes_fn
        self.max_len, self.uncond_prob = max_len, uncond_prob
        self.rng = random.Random(seed)

    def __call__(self, record: Record) -> Sample | None:
        return build_sample(
            record, self.tokenizer, self.cfg.roles, self.cfg, self.image_codes_fn, self.rng, self.max_len,
            self.uncond_prob,
        )

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))  # tuple(): the state may have been through JSON

