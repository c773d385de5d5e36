"""Micro-batching across concurrent requests.

A model embeds 64 texts in far less than 64 times the time of one (one forward pass, better use of
the matrix units), so the service collects the texts of concurrent requests for up to
``max_wait_ms`` (or until ``max_batch_size`` texts are waiting), runs the encoder once in a worker
thread, and hands each request its rows. `DirectRunner` is the unbatched reference: one encoder
call per request, with the same thread and the same interface.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

__all__ = ["DirectRunner", "MicroBatcher", "RunnerStopped"]

EncodeFn = Callable[[Sequence[str]], np.ndarray]  # texts -> [B, D]


class RunnerStopped(RuntimeError):
    """The runner was stopped: `submit` after `stop`, or a request still waiting at `stop`."""


def _check_rows(emb: object, n: int) -> np.ndarray:
    """The encoder's answer for ``n`` texts, which must be [n, D]: a wrong row count would hand
    every request of the batch someone else's rows (or none)."""
    shape = getattr(emb, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] != n:
        got = type(emb).__name__ if shape is None else f"shape {tuple(shape)}"
        raise RuntimeError(f"the encoder returned {got} for {n} texts; expected [{n}, D]")
    return emb  # type: ignore[return-value]


@dataclass
class _Pending:
    texts: list[str]
    future: asyncio.Future = field(repr=False)


class DirectRunner:
    """No batching: each request runs the encoder on its own texts (in one worker thread).

    `stop` answers every request not yet answered (running or waiting for the thread) with
    `RunnerStopped`, as `MicroBatcher` does."""

    def __init__(self, encode: EncodeFn) -> None:
        self._encode = encode
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mrl-encode")
        self._stopped = False
        self._waiting: set[asyncio.Future] = set()  # one per request not yet answered
        self.batches = 0

    async def start(self) -> None:  # same lifecycle as MicroBatcher
        return None

    async def stop(self) -> None:
        self._stopped = True
        for f in list(self._waiting):
            if not f.done():
                f.set_exception(RunnerStopped(
                    "the encoder runner was stopped before this request was served"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, texts: Sequence[str]) -> np.ndarray:
        if self._stopped:
            raise RunnerStopped("the encoder runner was stopped; the request was not served")
        texts = list(texts)
        self.batches += 1
        loop = asyncio.get_running_loop()
        answer = loop.create_future()  # ours, not the executor's: stop() can answer it
        self._waiting.add(answer)

        def deliver(job) -> None:  # in the worker thread (or at shutdown): hand over to the loop
            if job.cancelled():
                return  # cancelled by stop(), which answered already
            exc = job.exception()
            try:
                loop.call_soon_threadsafe(_settle, answer, exc, None if exc else job.result())
            except RuntimeError:  # the loop closed meanwhile: nobody is waiting any more
                pass

        job = self._executor.submit(_run_encoder, self._encode, texts)
        job.add_done_callback(deliver)
        try:
            return _check_rows(await answer, len(texts))
        except asyncio.CancelledError:
            job.cancel()  # the caller went away: do not encode its texts if not started yet
            raise
        finally:
            self._waiting.discard(answer)


def _run_encoder(encode: EncodeFn, texts: list[str]) -> np.ndarray:
    """``encode(texts)`` in the worker thread. A future cannot hold StopIteration (asyncio
    raises a TypeError inside the loop's callback and the request waited for ever): it is
    raised as a RuntimeError."""
    try:
        return encode(texts)
    except StopIteration as exc:
        raise RuntimeError(f"the encoder raised StopIteration: {exc!r}") from exc


def _settle(future: asyncio.Future, exc: BaseException | None, result: object) -> None:
    if future.done():  # answered by stop(), or the caller was cancelled
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


class MicroBatcher:
    """Collect texts from concurrent `submit` calls into one encoder call.

    Args:
        encode: the batch function, texts -> float32 [B, D].
        max_batch_size: most texts per encoder call; a single larger request runs alone.
        max_wait_ms: how long the first waiting request may wait for company.

    One batch runs at a time: the encoder already uses every core, and requests that arrive while
    it runs form the next batch, so under load batches fill up without any waiting at all.
    Requests are served first come, first served.

    A failed encoder call does not fail the requests that merely shared the batch: a batch of
    several requests that raises is run again one request at a time, so only the request that
    breaks the model gets the error (and the others get exactly what they get alone). `stop`
    answers every request still waiting (queued or in the running batch) with `RunnerStopped`,
    and so does `submit` afterwards: nobody waits for ever.
    """

    def __init__(self, encode: EncodeFn, max_batch_size: int = 64, max_wait_ms: float = 2.0):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if not 0 <= max_wait_ms < float("inf"):  # NaN or inf: a request would wait for ever
            raise ValueError(f"max_wait_ms must be finite and >= 0, got {max_wait_ms}")
        self._encode = encode
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self._pending: deque[_Pending] = deque()
        self._queued = 0  # texts waiting in _pending
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._running: list[_Pending] = []  # the batch the encoder is working on
        self._stopped = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mrl-batch")
        self.batches = 0  # encoder calls made, for tests and metrics
        self.batch_sizes: deque[int] = deque(maxlen=10_000)  # texts per encoder call

    async def start(self) -> None:
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = asyncio.create_task(self._run(), name="mrl-micro-batcher")

    async def stop(self) -> None:
        """Stop batching; every request not yet answered gets `RunnerStopped`."""
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        waiting = [*self._running, *self._pending]
        self._running, self._queued = [], 0
        self._pending.clear()
        for p in waiting:  # queued, or in the batch the cancelled loop was waiting on
            if not p.future.done():
                p.future.set_exception(RunnerStopped(
                    "the micro-batcher was stopped before this request was served"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` (float32 [len(texts), D]) as part of whatever batch forms."""
        if self._stopped:
            raise RunnerStopped("the micro-batcher was stopped; the request was not served")
        if self._wakeup is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(list(texts), future))
        self._queued += len(texts)
        self._wakeup.set()
        return await future

    async def _wait(self, timeout: float | None) -> bool:
        """Wait for a new submission; False when ``timeout`` seconds pass first."""
        assert self._wakeup is not None
        self._wakeup.clear()
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def _collect(self) -> list[_Pending]:
        """Wait for a request, give it up to max_wait_s to gain company, take a batch."""
        while not self._pending:
            await self._wait(None)
        deadline = time.monotonic() + self.max_wait_s
        while self._queued < self.max_batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not await self._wait(remaining):
                break
        batch = [self._pending.popleft()]  # always at least one, however large
        size = len(batch[0].texts)
        while self._pending and size + len(self._pending[0].texts) <= self.max_batch_size:
            batch.append(self._pending.popleft())
            size += len(batch[-1].texts)
        self._queued -= size
        return batch

    async def _run(self) -> None:
        while True:
            batch = [p for p in await self._collect() if not p.future.done()]  # drop cancelled
            if not batch:
                continue
            self._running = batch  # kept when stop() cancels us: it answers these
            await self._serve(batch)
            self._running = []

    async def _serve(self, batch: list[_Pending]) -> None:
        """One encoder call for ``batch``; each request gets its rows, in submission order."""
        texts = [t for p in batch for t in p.texts]
        try:
            emb = await self._call(texts)  # [B, D]
        except Exception as exc:
            if len(batch) == 1:  # the model failed on this request's texts: its caller's error
                if not batch[0].future.done():
                    batch[0].future.set_exception(exc)
                return
            # one request may have broken the batch: run each alone, so that only it fails
            for p in batch:
                if not p.future.done():
                    await self._serve([p])
            return
        start = 0
        for p in batch:  # split rows back in submission order
            rows = emb[start : start + len(p.texts)]
            start += len(p.texts)
            if not p.future.done():
                p.future.set_result(rows)

    async def _call(self, texts: list[str]) -> np.ndarray:
        loop = asyncio.get_running_loop()
        self.batches += 1
        self.batch_sizes.append(len(texts))
        emb = await loop.run_in_executor(self._executor, _run_encoder, self._encode, texts)
        return _check_rows(emb, len(texts))
