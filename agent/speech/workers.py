"""A small thread pool that runs the most urgent model call first."""

from __future__ import annotations

import concurrent.futures
import enum
import itertools
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class Priority(enum.IntEnum):
    """Lower runs first."""

    FINAL = 0      # end of a turn: someone is waiting for the reply
    BATCH = 1      # a whole file (transcriptions endpoint, chat audio input)
    PARTIAL = 2    # progress while the user speaks; may be skipped


class PriorityPool:
    """Worker threads taking jobs lowest priority first, FIFO within a priority."""

    def __init__(self, workers: int, name: str) -> None:
        self._jobs: queue.PriorityQueue = queue.PriorityQueue()
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
        if self._closed:
            raise RuntimeError("the worker pool is shut down")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._jobs.put((priority, next(self._order), future, fn, args))
        return future

    def _run(self) -> None:
        while True:
            _, _, future, fn, args = self._jobs.get()
            if future is None:
                return
            self._run_one(future, fn, args)
            # Hold nothing between jobs: if a worker kept the last reference to a model
            # (through a bound method), the model would be destroyed on this thread, and
            # CTranslate2 aborts the process when that happens.
            del future, fn, args

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
                _, _, future, _, _ = self._jobs.get_nowait()
            except queue.Empty:
                break
            if future is not None:
                future.cancel()
        for _ in self._threads:
            self._jobs.put((-1, next(self._order), None, None, ()))
