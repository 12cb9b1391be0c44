"""One thread owns the model; the HTTP API and the Gradio demo reach it only through this queue.

The model is not thread-safe (its decoder holds the KV caches), so every request becomes a job that
the model thread runs one at a time, in arrival order. A semaphore admits at most `concurrency`
requests into the queue; the others wait their turn in the event loop. Image requests without a seed
that share their sampling settings are merged into one `generate_image` call, which shares each
step's fixed cost (the tiny model on CPU: 16 images take about 3 times as long as one). A request
with a seed always runs alone, so it gets exactly the images of `Janus.generate_image(prompt, n=n,
seed=seed, ...)` with the same settings.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
from collections import deque
from contextlib import closing
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Callable, Sequence

from PIL import Image

from ..eval.clause_judge import check_prompt, ranking
from ..pipeline import ChatStream, ImageInput, Janus

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageSettings:
    """Sampling settings of an image request; only requests with equal settings share a batch."""

    cfg_weight: float | None = None  # None: the model's default
    temperature: float | None = None  # None: the model's default
    top_k: int | None = None
    top_p: float | None = None
    candidates: int = 1  # images drawn per image returned; the best by rank_by is kept (Janus.generate_image)
    rank_by: str = "likelihood"  # one of janus.eval.clause_judge.RANK_CHOICES


@dataclass(kw_only=True)
class _Job:
    loop: asyncio.AbstractEventLoop  # the caller's loop, where results are delivered
    cancelled: threading.Event = field(default_factory=threading.Event)  # the caller went away

    def deliver(self, fn, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the caller's loop is closed: the server is shutting down
            pass


@dataclass(kw_only=True)
class _ImageJob(_Job):
    prompt: str
    n: int
    settings: ImageSettings
    seed: int | None
    progress: bool  # report progress through tqdm, in the caller's context (Gradio tracks it there)
    context: contextvars.Context
    result: asyncio.Future


@dataclass(frozen=True)
class _End:
    """The end of a chat job's pieces, with the exhausted stream (None when the job was cut off)."""

    stream: ChatStream | None


@dataclass(kw_only=True)
class _ChatJob(_Job):
    arguments: dict
    pieces: asyncio.Queue  # text pieces, then an exception or an _End


def _settle(future: asyncio.Future, value: object) -> None:
    if future.done():  # cancelled by its caller meanwhile
        return
    if isinstance(value, BaseException):
        future.set_exception(value)
    else:
        future.set_result(value)


class ModelWorker:
    """Runs all model calls on one thread; async methods submit jobs and await their results.

    Queued seedless image requests with equal settings run as one batch of at most `max_batch_images`
    images drawn (returned images times candidates).
    """

    def __init__(self, model: Janus, concurrency: int = 4, max_batch_images: int = 16):
        if concurrency < 1 or max_batch_images < 1:
            raise ValueError("concurrency and max_batch_images must be positive")
        self.model = model
        self.max_batch_images = max_batch_images
        self._admission = asyncio.Semaphore(concurrency)
        self._pending: deque[_Job] = deque()
        self._wakeup = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="janus-model", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        """Jobs waiting for the model (not counting the one it is running)."""
        return len(self._pending)

    def close(self) -> None:
        """Stop the model thread after its current job; jobs still queued are not run."""
        with self._wakeup:
            self._closed = True
            self._wakeup.notify()
        self._thread.join()

    async def generate_images(
        self, prompt: str, n: int = 1, settings: ImageSettings = ImageSettings(), seed: int | None = None,
        progress: bool = False,
    ) -> list[Image.Image]:
        """n images for `prompt`; raises what `Janus.generate_image` raises (ValueError for bad input)."""
        # A prompt the ranking cannot read is refused here, alone, not after sampling in a merged batch,
        # where its error would fail the other requests too.
        check_prompt(settings.rank_by, prompt)
        # Resolved now, so that a request naming the model's default batches with one that names none.
        cfg_weight, temperature = self.model.image_settings(settings.cfg_weight, settings.temperature)
        settings = replace(settings, cfg_weight=cfg_weight, temperature=temperature)
        async with self._admission:
            loop = asyncio.get_running_loop()
            job = _ImageJob(
                loop=loop, prompt=prompt, n=n, settings=settings, seed=seed, progress=progress,
                context=contextvars.copy_context(), result=loop.create_future(),
            )
            self._submit(job)
            try:
                return await job.result
            finally:
                job.cancelled.set()  # no effect once it ran; otherwise the model skips it

    async def chat(
        self,
        message: str,
        images: Sequence[ImageInput] = (),
        history: Sequence[dict] = (),
        on_finish: Callable[[ChatStream], None] | None = None,
        **options,
    ) -> AsyncIterator[str]:
        """The answer's text pieces as the model produces them; `options` are `Janus.chat`'s sampling ones.
        `on_finish` gets the exhausted `ChatStream` (finish reason, token counts) after the last piece."""
        async with self._admission:
            job = _ChatJob(
                loop=asyncio.get_running_loop(), pieces=asyncio.Queue(),
                arguments=dict(message=message, images=list(images), history=list(history), **options),
            )
            self._submit(job)
            try:
                while not isinstance(item := await job.pieces.get(), _End):
                    if isinstance(item, BaseException):
                        raise item
                    yield item
                if on_finish is not None and item.stream is not None:
                    on_finish(item.stream)
            finally:
                job.cancelled.set()  # stops the model mid-answer when the caller went away

    # ------------------------------------------------------------ the model thread

    def _submit(self, job: _Job) -> None:
        with self._wakeup:
            self._pending.append(job)
            self._wakeup.notify()

    def _serve(self) -> None:
        while (job := self._next_job()) is not None:
            if isinstance(job, _ChatJob):
                self._run_chat(job)
            else:
                self._run_images([job, *self._batch_mates(job)])

    def _next_job(self) -> _Job | None:
        with self._wakeup:
            while not self._pending and not self._closed:
                self._wakeup.wait()
            return None if self._closed else self._pending.popleft()

    def _batch_mates(self, first: _ImageJob) -> list[_ImageJob]:
        """Queued seedless image jobs with `first`'s settings, up to max_batch_images images drawn in all."""
        if first.seed is not None:
            return []
        drawn = first.settings.candidates
        mates, room = [], self.max_batch_images - first.n * drawn
        with self._wakeup:
            for job in list(self._pending):
                if (
                    isinstance(job, _ImageJob) and job.seed is None and job.settings == first.settings
                    and job.n * drawn <= room
                ):
                    self._pending.remove(job)
                    mates.append(job)
                    room -= job.n * drawn
        return mates

    def _run_images(self, jobs: list[_ImageJob]) -> None:
        jobs = [job for job in jobs if not job.cancelled.is_set()]
        if not jobs:
            return
        s = jobs[0].settings
        # Each prompt repeated n times with n=1 gives the same rows, in the same order, as (prompt, n).
        prompts = [job.prompt for job in jobs for _ in range(job.n)]
        watcher = next((job for job in jobs if job.progress), None)
        try:
            images = (watcher or jobs[0]).context.run(
                self.model.generate_image, prompts, n=1, cfg_weight=s.cfg_weight, temperature=s.temperature,
                top_k=s.top_k, top_p=s.top_p, seed=jobs[0].seed, progress=watcher is not None,
                candidates=s.candidates, rank_by=ranking(self.model, s.rank_by),
            )
        except Exception as error:  # noqa: BLE001 - the caller decides; the thread keeps serving
            log.debug("image job failed", exc_info=True)
            for job in jobs:
                job.deliver(_settle, job.result, error)
            return
        start = 0
        for job in jobs:
            job.deliver(_settle, job.result, images[start : start + job.n])
            start += job.n

    def _run_chat(self, job: _ChatJob) -> None:
        if job.cancelled.is_set():
            return
        ended = None
        try:
            with closing(self.model.chat(**job.arguments, stream=True)) as pieces:  # closing frees the cache
                for piece in pieces:
                    if job.cancelled.is_set():
                        break
                    job.deliver(job.pieces.put_nowait, piece)
                else:
                    ended = pieces
        except Exception as error:  # noqa: BLE001 - the caller decides; the thread keeps serving
            log.debug("chat job failed", exc_info=True)
            job.deliver(job.pieces.put_nowait, error)
        job.deliver(job.pieces.put_nowait, _End(ended))
