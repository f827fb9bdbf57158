"""Running several async streams as one."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterable
from typing import TypeVar

T = TypeVar("T")

_END = object()


async def merge(streams: Iterable[AsyncIterator[T]], limit: int | None = None) -> AsyncIterator[tuple[int, T]]:
    """``(stream number, item)`` from every stream as the items come, the streams running at once.

    With ``limit``, at most that many run at a time: the next stream is taken from ``streams``
    as one ends. The first error of a stream is raised here. When the consumer stops early
    (closing this), or on an error, the streams still running are cancelled and closed.
    """
    queue: asyncio.Queue = asyncio.Queue()
    live: dict[int, tuple[asyncio.Future, AsyncIterator[T]]] = {}
    numbered = enumerate(streams)

    async def pump(i: int, stream: AsyncIterator[T]) -> None:
        async for item in stream:
            queue.put_nowait((i, item))

    def start(count: int | None) -> None:
        for i, stream in itertools.islice(numbered, count):
            task = asyncio.ensure_future(pump(i, stream))
            task.add_done_callback(lambda _, i=i: queue.put_nowait((i, _END)))
            live[i] = (task, stream)

    start(limit)
    try:
        while live:
            i, item = await queue.get()
            if item is not _END:
                yield i, item
                continue
            task, _ = live.pop(i)
            task.result()
            start(1)
    finally:
        for task, _ in live.values():
            task.cancel()
        await asyncio.gather(*(task for task, _ in live.values()), return_exceptions=True)
        for _, stream in live.values():
            await stream.aclose()
