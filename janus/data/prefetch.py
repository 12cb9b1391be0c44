"""Packed rows built in a background thread, ahead of the training step that consumes them."""

from __future__ import annotations

import queue
import threading

from .packing import Batch, PackedStream


class Prefetcher:
    """Reads up to `depth` rows ahead of the consumer, so reading, decoding and tokenising data
    overlaps the training step instead of running between steps.

    Only the thread advances the stream, in order, so the rows are exactly the stream's. Each row
    comes with the stream's state and skipped-record counts after it: `state_dict()` and `skipped`
    describe the rows consumed so far (what a checkpoint must record), not the thread's read-ahead.
    """

    def __init__(self, stream: PackedStream, depth: int) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth must be at least 1, got {depth}")
        self.stream = stream
        self._state, self.skipped = stream.state_dict(), stream.skipped
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="janus-data", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        try:
            while not self._stop.is_set():
                row = next(self.stream)
                self._put((row, self.stream.state_dict(), self.stream.skipped))
        except BaseException as error:  # re-raised in the consumer, which owns the run
            self._put(error)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> Batch:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        row, self._state, self.skipped = item
        return row

    def state_dict(self) -> dict:
        return self._state

    def close(self) -> None:
        """Stop the thread (rows read ahead are dropped; the stream itself has moved past them)."""
        self._stop.set()
        self._thread.join()
