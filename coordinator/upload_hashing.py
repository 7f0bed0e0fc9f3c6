"""Hashing and writing an upload while it arrives, off the thread that receives it.

An upload is hashed three ways: the whole file and each download chunk (:class:`ChunkHasher`, for
the manifest; a thread each) and, for a canonical version file, its state-dict hash
(:class:`~grpo_swarm.protocol.version_file.StreamingStateHash`, which spares the coordinator a
second read of the file). Each hasher, and the file's writer, gets its own thread, fed through a
short queue, so hashing (hashlib releases the GIL) and writing run beside the receiving of the
chunks instead of after it; the queue bounds what is held in memory to a few chunks.
"""

from __future__ import annotations

import queue
import threading

QUEUE_CHUNKS = 4


class BackgroundFeed:
    """Calls ``sink.update(data)`` (or another ``method``: a file's ``write``) for every piece given
    to :meth:`update`, in order, in a thread of its own. :meth:`close` waits for the last piece and
    re-raises what the sink raised."""

    def __init__(self, sink, depth: int = QUEUE_CHUNKS, method: str = "update"):
        self.sink = getattr(sink, method)
        self._queue: queue.Queue = queue.Queue(depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"feed-{type(sink).__name__}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (data := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self.sink(data)
                except BaseException as e:  # noqa: BLE001 - handed to the caller at close()
                    self._error = e

    def update(self, data: bytes) -> None:
        self._queue.put(data)

    def close(self, check: bool = True) -> None:
        """Wait for the thread to finish the pieces given; then (``check``) raise what the sink raised."""
        self._queue.put(None)
        self._thread.join()
        if check and self._error is not None:
            raise self._error
