"""A small thread pool that runs the most urgent model call first.

Skippable jobs (partial transcripts) give way under load: one taken from the queue while
`skip_backlog` or more jobs still wait behind it is answered with its `skipped` value
without running, because by the time it would finish its news is stale and every job
behind it waits for it.
"""

from __future__ import annotations

import concurrent.futures
import enum
import itertools
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
_RUN = None  # a job's skip field when it must always run


class Priority(enum.IntEnum):
    """Lower runs first."""

    FINAL = 0      # end of a turn: someone is waiting for the reply
    BATCH = 1      # a whole file (transcriptions endpoint, chat audio input)
    PARTIAL = 2    # progress while the user speaks; may be skipped


class PriorityPool:
    """Worker threads taking jobs lowest priority first, FIFO within a priority."""

    def __init__(self, workers: int, name: str, *, skip_backlog: int = 2) -> None:
        self._jobs: queue.PriorityQueue = queue.PriorityQueue()
        self._skip_backlog = skip_backlog
        self.skipped = 0  # skippable jobs answered without running, for tests and metrics
        self._order = itertools.count()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, priority: int, fn: Callable[..., T], *args: Any
               ) -> concurrent.futures.Future[T]:
        return self._put(priority, _RUN, fn, args)

    def submit_skippable(self, priority: int, skipped: T, fn: Callable[..., T], *args: Any
                         ) -> concurrent.futures.Future[T]:
        """Like `submit`, but answered with `skipped` instead of run when the queue is
        long (see the module doc)."""
        return self._put(priority, (skipped,), fn, args)

    def _put(self, priority: int, skip: tuple | None, fn: Callable[..., T], args: tuple
             ) -> concurrent.futures.Future[T]:
        if self._closed:
            raise RuntimeError("the worker pool is shut down")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._jobs.put((priority, next(self._order), future, fn, args, skip))
        return future

    def _run(self) -> None:
        while True:
            _, _, future, fn, args, skip = self._jobs.get()
            if future is None:
                return
            if skip is not _RUN and self._jobs.qsize() >= self._skip_backlog:
                if future.set_running_or_notify_cancel():
                    self.skipped += 1
                    future.set_result(skip[0])
            else:
                self._run_one(future, fn, args)
            # Hold nothing between jobs: if a worker kept the last reference to a model
            # (through a bound method), the model would be destroyed on this thread, and
            # CTranslate2 aborts the process when that happens.
            del future, fn, args, skip

    @staticmethod
    def _run_one(future: concurrent.futures.Future, fn: Callable[..., Any],
                 args: tuple) -> None:
        # A job whose caller was cancelled before it started is dropped here.
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # handed to the awaiting caller
            future.set_exception(exc)

    def shutdown(self) -> None:
        """Stop the workers after their current job; queued jobs are cancelled, so no
        caller waits forever."""
        self._closed = True
        while True:
            try:
                _, _, future, _, _, _ = self._jobs.get_nowait()
            except queue.Empty:
                break
            if future is not None:
                future.cancel()
        for _ in self._threads:
            self._jobs.put((-1, next(self._order), None, None, (), _RUN))
