"""The data mixture: records of the three kinds drawn in fixed ratios (DESIGN.md §6), resumable.

Each kind walks its data in a shuffled order that changes every epoch. Manifest lines are shuffled
one by one; a tar shard is one item of that order and is streamed whole, so its records keep their
order inside the shard. All randomness comes from the seed, and `state_dict()` holds the kind rng
and each kind's epoch and position, so a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .records import KINDS, Manifest, Record, is_tar, parse_tar_sample, tar_samples


class KindStream:
    """One kind's records, epoch after epoch, each epoch in a new seeded order."""

    def __init__(self, kind: str, paths: list[str | Path], seed: int, skipped: Counter) -> None:
        self.kind, self.seed, self.skipped = kind, seed, skipped
        for path in paths:
            if not Path(path).is_file():
                raise FileNotFoundError(f"{kind} data file not found: {path}")
        self.sources = [str(p) if is_tar(p) else Manifest(p) for p in paths]
        sizes = [1 if isinstance(s, str) else len(s) for s in self.sources]  # a tar shard is one item
        self.starts = np.cumsum([0, *sizes])
        if self.starts[-1] == 0:
            raise ValueError(f"no {kind} data: {len(paths)} file(s) with no records; give data or set its ratio to 0")
        self.epoch, self.position, self.in_shard = 0, 0, 0  # in_shard: samples consumed in the current tar
        self._order = self._shuffled(0)
        self._shard: Iterator | None = None
        self._shard_gave = False  # the current shard has given a record
        self._fruitless = 0  # items in a row that gave no record: a whole epoch of them means no usable data

    def _shuffled(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, KINDS.index(self.kind), epoch]).permutation(int(self.starts[-1]))

    def __next__(self) -> Record:
        while True:
            if self._fruitless > self.starts[-1]:
                raise RuntimeError(f"no usable {self.kind} record in a whole epoch (skipped: {dict(self.skipped)})")
            if self.position == self.starts[-1]:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffled(self.epoch)
            item = int(self._order[self.position])
            index = int(np.searchsorted(self.starts, item, side="right")) - 1
            source = self.sources[index]
            if isinstance(source, str):
                record = self._next_in_shard(source)
            else:
                record = self._next_line(source, item - int(self.starts[index]))
            if record is not None:
                self._fruitless = 0
                return record

    def _next_line(self, manifest: Manifest, line: int) -> Record | None:
        self.position += 1
        record = manifest.record(line, self.skipped)
        self._fruitless += record is None
        return record

    def _next_in_shard(self, path: str) -> Record | None:
        if self._shard is None:  # opening, or reopening after a resume: skip what was already consumed
            self._shard = itertools.islice(tar_samples(path, self.skipped), self.in_shard, None)
            self._shard_gave = False
        sample = next(self._shard, None)
        if sample is None:
            self.position, self.in_shard, self._shard = self.position + 1, 0, None
            self._fruitless = 0 if self._shard_gave else self._fruitless + 1
            return None
        self.in_shard += 1
        record = parse_tar_sample(path, *sample, self.skipped)
        self._shard_gave |= record is not None
        return record

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "in_shard": self.in_shard}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.epoch = state["seed"], state["epoch"]
        self.position, self.in_shard = state["position"], state["in_shard"]
        self._order = self._shuffled(self.epoch)
        self._shard = None


class Mixture:
    """An endless iterator of records whose kinds are drawn with `ratios` (e.g. und : text : gen = 2 : 3 : 5).

    sources: kind -> manifest (.jsonl) and tar shard (.tar) paths. Bad records are skipped, counted in
    `self.skipped` (reason -> count) and warned about.
    """

    def __init__(self, sources: dict[str, list[str | Path]], ratios: dict[str, float], seed: int = 0) -> None:
        unknown = (set(sources) | set(ratios)) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown data kinds {sorted(unknown)}; expected some of {KINDS}")
        if any(not r >= 0 for r in ratios.values()) or not any(r > 0 for r in ratios.values()):
            raise ValueError(f"ratios must be >= 0 with at least one > 0, got {ratios}")
        self.kinds = [k for k in KINDS if ratios.get(k, 0) > 0]  # a kind with ratio 0 is never drawn nor opened
        self.weights = [ratios[k] for k in self.kinds]
        missing = [k for k in self.kinds if not sources.get(k)]
        if missing:
            raise ValueError(f"ratio > 0 but no data files for {missing}")
        self.skipped: Counter = Counter()
        self.streams = {k: KindStream(k, list(sources[k]), seed, self.skipped) for k in self.kinds}
        self.rng = random.Random(seed)

    def __iter__(self) -> "Mixture":
        return self

    def __next__(self) -> Record:
        kind = self.rng.choices(self.kinds, self.weights)[0]
        return next(self.streams[kind])

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "streams": {k: s.state_dict() for k, s in self.streams.items()}}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))  # tuple(): the state may have been through JSON
        for kind, stream in self.streams.items():
            stream.load_state_dict(state["streams"][kind])
