"""SQLite as the tool backends use it: WAL, a busy timeout, short immediate transactions.

Every operation opens its own connection (cheap for a local file) so that backends can
run in any worker thread or process; writers serialise on `BEGIN IMMEDIATE`.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BUSY_TIMEOUT_S = 5.0


def connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    db.row_factory = sqlite3.Row
    return db


@contextmanager
def connection(path: Path) -> Iterator[sqlite3.Connection]:
    db = connect(path)
    try:
        yield db
    finally:
        db.close()


@contextmanager
def transaction(path: Path) -> Iterator[sqlite3.Connection]:
    """One writer at a time: BEGIN IMMEDIATE takes the write lock before anything is read,
    so what a transaction checks is still true when it writes."""
    with connection(path) as db:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")


def prepare(path: Path, schema: str) -> None:
    """Create the file and its tables in WAL mode; safe when many openers race."""
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            with connection(path) as db:
                # Switching to WAL needs a moment alone with the file, and SQLite does not
                # wait for it on a busy file: skip it when done, and retry when contended.
                if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    db.execute("PRAGMA journal_mode=WAL")
                db.executescript(schema)
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
