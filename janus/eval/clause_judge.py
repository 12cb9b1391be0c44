"""Best of N for the shapes world, judged by the model's own understanding path.

Each candidate image is asked the questions that check its prompt's clauses (`clause_questions`: how
many objects of each shape and colour, which colour each shape has, where one object is relative to
the other), as TIFA and DSG check a generated image by visual question answering. The questions are
worded as the model's training questions, and each is scored by the model's probability of the
expected answer among the answers of its type, so no detector and no other model is involved.
"""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

from janus.data.shapes import ANSWER_OPTIONS, clause_questions, parse_description
from janus.pipeline import RANKINGS, Janus, Judge

# `--rank-by` choices of the CLI and the evaluation: the pipeline's own rankings, and "questions".
RANK_CHOICES = (*RANKINGS, "questions")


def clause_scores(model: Janus, prompt: str, images: Sequence[Image.Image]) -> torch.Tensor:
    """Per image, the sum over the prompt's clause questions of log P(expected answer), normalised
    over the answers of the question's type: 0 when the model is sure every clause holds. float32
    [len(images)]. The prompt must be in the shapes world's grammar (`parse_description`)."""
    total = torch.zeros(len(images))
    for qa in clause_questions(parse_description(prompt)):
        options = ANSWER_OPTIONS[qa.type]
        logp = model.answer_logprobs(qa.question, options, images)
        total += logp[:, options.index(qa.answer)] - logp.logsumexp(1)
    return total


def clause_judge(model: Janus) -> Judge:
    """`clause_scores` of `model`, as a `rank_by` judge for `Janus.generate_image_tokens`."""
    return lambda prompt, images: clause_scores(model, prompt, images)


def check_prompt(rank_by: str, prompt: str) -> None:
    """Raise now, before any sampling, the ValueError that ranking `prompt`'s candidates by `rank_by`
    would raise afterwards: "questions" needs a prompt in the shapes world's grammar."""
    if rank_by == "questions":
        parse_description(prompt)


def ranking(model: Janus, name: str) -> str | Judge:
    """The `rank_by` argument that a RANK_CHOICES name stands for."""
    if name not in RANK_CHOICES:
        raise ValueError(f"rank_by must be one of {RANK_CHOICES}, got {name!r}")
    return clause_judge(model) if name == "questions" else name
