"""Packing documents into fixed-length rows, and the batch the training step consumes.

Samples are packed in arrival order (next-fit): one that does not fit closes the row, which is padded,
and opens the next. Each document keeps its own RoPE positions (from 0) and, through
`janus.models.attention.Documents(batch.doc_ids)`, attends only to itself, so a packed row computes
exactly what the documents would compute one by one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from janus.models.unified import IGNORE

from .mixture import Mixture
from .records import skip
from .sequences import Sample, SampleBuilder


@dataclass
class Batch:
    """Packed rows: [B, T] tensors; a single row from the Packer has B = 1."""

    tokens: Tensor  # long: text ids, VQ codes where code_mask; pad id on padding
    code_mask: Tensor  # bool
    image_mask: Tensor  # bool: understanding placeholders, filled in row-major order from `pixels`
    pixels: Tensor | None  # [N, 3, S, S] understanding images in placeholder order, or None
    targets: Tensor  # long: IGNORE where no loss (padding included)
    target_is_code: Tensor  # bool: the target is a VQ code (image head)
    kinds: Tensor  # long: the document's kind (0 understanding, 1 text, 2 generation), -1 on padding
    doc_ids: Tensor  # long: 0, 1, ... per document in a row, -1 on padding
    positions: Tensor  # long: RoPE position within the document

    def to(self, device: torch.device | str) -> "Batch":
        tensors = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return Batch(**{name: t if t is None else t.to(device, non_blocking=True) for name, t in tensors.items()})


def collate(rows: list[Batch]) -> Batch:
    """Stack rows of equal length into one batch."""
    if len({row.tokens.shape[1] for row in rows}) != 1:
        raise ValueError("rows must all have the same length")
    names = [f.name for f in dataclasses.fields(Batch) if f.name != "pixels"]
    fields = {name: torch.cat([getattr(row, name) for row in rows]) for name in names}
    pixels = [row.pixels for row in rows if row.pixels is not None]
    return Batch(**fields, pixels=torch.cat(pixels) if pixels else None)


class Packer:
    """Fills rows of exactly `seq_len` positions with samples, in order."""

    def __init__(self, seq_len: int, pad_id: int) -> None:
        self.seq_len, self.pad_id = seq_len, pad_id
        self.samples: list[Sample] = []  # the open row

    @property
    def length(self) -> int:
        return sum(len(s) for s in self.samples)

    def add(self, sample: Sample) -> Batch | None:
        """Append `sample` to the open row; when it does not fit, return the closed previous row and
        open the next one with it."""
        if len(sample) > self.seq_len:
            raise ValueError(f"a sample of {len(sample)} tokens cannot fit a row of {self.seq_len}")
        closed = None
        if self.length + len(sample) > self.seq_len:
            closed, self.samples = self.row(), []
        self.samples.append(sample)
        return closed

    def row(self) -> Batch:
        """The open row, padded to `seq_len`, as a batch of one."""
        pad = self.seq_len - self.length

        def join(values: list[Tensor], fill, dtype: torch.dtype) -> Tensor:
            return torch.cat([*values, torch.full((pad,), fill, dtype=dtype)])[None]

        pixels = [s.pixels for s in self.samples if s.pixels is not None]
        return Batch(
            tokens=join([s.tokens for s in self.samples], self.pad_id, torch.long),
            code_mask=join([s.code_mask for s in self.samples], False, torch.bool),
            image_mask=join([s.image_mask for s in self.samples], False, torch.bool),
            pixels=torch.cat(pixels) if pixels else None,
            targets=join([s.targets for s in self.samples], IGNORE, torch.long),
            target_is_code=join([s.target_is_code for s in self.samples], False, torch.bool),
            kinds=join([torch.full((len(s),), s.kind) for s in self.samples], -1, torch.long),
            doc_ids=join([torch.full((len(s),), i) for i, s in enumerate(self.samples)], -1, torch.long),
            positions=join([torch.arange(len(s)) for s in self.samples], 0, torch.long),
        )


class PackedStream:
    """Packed rows from a mixture: records -> samples -> rows; resumable at any row boundary.

    The resume point of the open row is where its first sample's record was read: loading it
    rebuilds that row from the same records, with the same random draws.
    """

    def __init__(self, mixture: Mixture, builder: SampleBuilder, packer: Packer) -> None:
        if builder.max_len > packer.seq_len:
            raise ValueError(f"samples may be {builder.max_len} tokens long but rows are {packer.seq_len}")
        self.mixture, self.builder, self.packer = mixture, builder, packer
        self._row_start: dict | None = None

    def __iter__(self) -> "PackedStream":
        return self

    def __next__(self) -> Batch:
        while True:
            state = self._now()
            record = next(self.mixture)
            sample = self.builder(record)
            if sample is None:
                skip(self.mixture.skipped, "over-long", record.source, f"longer than {self.builder.max_len} tokens")
                continue
            if not self.packer.samples:
                self._row_start = state
            row = self.packer.add(sample)
            if row is not None:
                self._row_start = state  # this sample opens the next row
                return row

    def _now(self) -> dict:
        return {"mixture": self.mixture.state_dict(), "builder": self.builder.state_dict()}

    @property
    def skipped(self) -> dict[str, int]:
        """Records skipped so far, by reason."""
        return dict(self.mixture.skipped)

    def state_dict(self) -> dict:
        return self._row_start if self.packer.samples else self._now()

    def load_state_dict(self, state: dict) -> None:
        self.mixture.load_state_dict(state["mixture"])
        self.builder.load_state_dict(state["builder"])
        self.packer.samples = []
