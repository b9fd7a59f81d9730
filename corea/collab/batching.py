"""Micro-batching of concurrent calls: requests arriving together run as one batch (one engine call)."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class MicroBatcher(Generic[T, R]):
    """``await submit(item)`` joins the open batch; a batch runs when ``max_size`` items have joined or
    ``wait_s`` has passed since the worker looked, one batch at a time. ``run_batch(items)`` returns one result
    per item, in order; if it raises, every caller of that batch gets the exception."""

    def __init__(self, run_batch: Callable[[list[T]], Awaitable[list[R]]], max_size: int, wait_s: float) -> None:
        if max_size < 1 or wait_s < 0:
            raise ValueError("max_size must be >= 1 and wait_s >= 0")
        self.run_batch, self.max_size, self.wait_s = run_batch, max_size, wait_s
        self._pending: list[tuple[T, asyncio.Future]] = []
        self._full = asyncio.Event()
        self._worker: asyncio.Task | None = None

    async def submit(self, item: T) -> R:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if len(self._pending) >= self.max_size:
            self._full.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work())
        return await future

    async def _work(self) -> None:
        while self._pending:
            if len(self._pending) < self.max_size and self.wait_s > 0:
                try:
                    await asyncio.wait_for(self._full.wait(), self.wait_s)
                except asyncio.TimeoutError:
                    pass
            self._full.clear()
            batch = [(item, f) for item, f in self._pending[: self.max_size] if not f.done()]
            del self._pending[: self.max_size]
            if not batch:
                continue
            try:
                results: list[Any] = await self.run_batch([item for item, _ in batch])
            except Exception as exc:  # handed to the callers
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
