"""Table reservations in SQLite: availability, create, reschedule, cancel, look up.

No double booking, even across processes: every write runs in a `BEGIN IMMEDIATE`
transaction (one writer at a time, the check and the insert see the same state), and each
reservation also claims its tables' time slots in `occupancy`, whose primary key
(table, day, slot) makes an overlapping booking impossible at the database level.

Methods are blocking; the tool handlers run them in a thread.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
import sqlite3
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from agent.dispatch.spec import ToolSpec, load_tool_schema
from agent.dispatch.types import CallContext, SideEffect, ToolError
from tools.booking_config import BookingConfig, clock, parse_clock
from tools.sqlite_db import connection, prepare, transaction

REFERENCE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I: read out on a call

SCHEMA = """
CREATE TABLE IF NOT EXISTS reservations (
    reference TEXT PRIMARY KEY,
    table_name TEXT NOT NULL,
    day TEXT NOT NULL,
    start_min INTEGER NOT NULL,
    end_min INTEGER NOT NULL,
    party_size INTEGER NOT NULL CHECK (party_size > 0),
    name TEXT NOT NULL,
    phone TEXT NOT NULL,
    notes TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL CHECK (status IN ('confirmed', 'cancelled')),
    session_id TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS reservations_by_phone ON reservations (phone);
CREATE INDEX IF NOT EXISTS reservations_by_day ON reservations (day);
CREATE TABLE IF NOT EXISTS occupancy (
    table_name TEXT NOT NULL,
    day TEXT NOT NULL,
    slot INTEGER NOT NULL,
    reference TEXT NOT NULL REFERENCES reservations (reference),
    PRIMARY KEY (table_name, day, slot)
);
"""


class BookingBook:
    def __init__(self, db_path: Path, config: BookingConfig | None = None,
                 now: Callable[[], dt.datetime] | None = None):
        self.db_path = Path(db_path)
        self.config = config or BookingConfig()
        self._now = now or (lambda: dt.datetime.now(self.config.zone))
        prepare(self.db_path, SCHEMA)

    # -- reading ------------------------------------------------------------------------

    def availability(self, day: str, party_size: int, time: str | None = None,
                     ) -> dict[str, Any]:
        """Free start times that day for the party, or whether one given time is free."""
        date = self._check_day(day)
        self._check_party(party_size)
        with self._connection() as db:
            free = [start for start in self.config.start_times(date)
                    if self._start_is_future(date, start)
                    and self._free_table(db, date, start, party_size) is not None]
        out: dict[str, Any] = {"date": day, "weekday": _weekday(date),
                               "party_size": party_size,
                               "opening_hours": self.config.describe_hours(date)}
        if time is None:
            return out | {"available_times": [clock(s) for s in free]}
        start = self._check_time(date, time)
        nearest = sorted(free, key=lambda s: (abs(s - start), s))[:4]
        return out | {"time": time, "available": start in free,
                      "alternatives": [] if start in free
                      else sorted(clock(s) for s in nearest)}

    def find(self, reference: str | None = None, phone: str | None = None,
             name: str | None = None, day: str | None = None,
             include_past: bool = False) -> list[dict[str, Any]]:
        if not (reference or phone or name):
            raise ToolError("give a booking reference, a phone number or a name to look up",
                            code="missing_lookup")
        clauses, params = [], []
        for column, value in (("reference", reference and reference.strip().upper()),
                              ("phone", phone and _digits(phone)), ("day", day)):
            if value:
                clauses.append(f"{column} = ?")
                params.append(value)
        if name:
            clauses.append("lower(name) = lower(?)")
            params.append(name.strip())
        if not include_past and not reference:
            clauses.append("day >= ?")
            params.append(self._today().isoformat())
        sql = f"SELECT * FROM reservations WHERE {' AND '.join(clauses)} " \
              "ORDER BY day, start_min LIMIT 20"
        with self._connection() as db:
            return [_public(row) for row in db.execute(sql, params)]

    # -- writing ------------------------------------------------------------------------

    def create(self, day: str, time: str, party_size: int, name: str, phone: str,
               notes: str = "", session_id: str = "") -> dict[str, Any]:
        date = self._check_day(day)
        start = self._check_start(date, time, party_size)
        with self._transaction() as db:
            twin = db.execute(
                "SELECT * FROM reservations WHERE status = 'confirmed' AND day = ? "
                "AND start_min = ? AND party_size = ? AND phone = ? AND lower(name) = lower(?)",
                (day, start, party_size, _digits(phone), name.strip())).fetchone()
            if twin is not None:  # the same booking asked again: it already exists
                return _public(twin) | {"already_booked": True}
            table = self._free_table(db, date, start, party_size)
            if table is None:
                raise self._taken(db, date, start, party_size)
            reference = _new_reference(db)
            stamp = self._now().isoformat(timespec="seconds")
            db.execute("INSERT INTO reservations VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                       (reference, table, day, start, start + self.config.duration_minutes,
                        party_size, name.strip(), _digits(phone), notes.strip(), "confirmed",
                        session_id, stamp, stamp))
            self._occupy(db, reference, table, date, start)
            row = db.execute("SELECT * FROM reservations WHERE reference = ?",
                             (reference,)).fetchone()
        return _public(row)

    def reschedule(self, reference: str, day: str, time: str,
                   party_size: int | None = None) -> dict[str, Any]:
        date = self._check_day(day)
        with self._transaction() as db:
            row = self._upcoming(db, reference)
            party = party_size or row["party_size"]
            start = self._check_start(date, time, party)
            db.execute("DELETE FROM occupancy WHERE reference = ?", (row["reference"],))
            table = self._free_table(db, date, start, party)
            if table is None:  # leaving the transaction by raising restores the old slots
                raise self._taken(db, date, start, party)
            db.execute("UPDATE reservations SET table_name = ?, day = ?, start_min = ?, "
                       "end_min = ?, party_size = ?, updated_at = ? WHERE reference = ?",
                       (table, day, start, start + self.config.duration_minutes, party,
                        self._now().isoformat(timespec="seconds"), row["reference"]))
            self._occupy(db, row["reference"], table, date, start)
            updated = db.execute("SELECT * FROM reservations WHERE reference = ?",
                                 (row["reference"],)).fetchone()
        return _public(updated)

    def cancel(self, reference: str) -> dict[str, Any]:
        with self._transaction() as db:
            row = db.execute("SELECT * FROM reservations WHERE reference = ?",
                             (reference.strip().upper(),)).fetchone()
            if row is None:
                raise ToolError(f"no booking has the reference {reference!r}", code="not_found")
            if row["status"] == "cancelled":
                return _public(row) | {"already_cancelled": True}
            self._upcoming(db, reference)
            db.execute("DELETE FROM occupancy WHERE reference = ?", (row["reference"],))
            db.execute("UPDATE reservations SET status = 'cancelled', updated_at = ? "
                       "WHERE reference = ?",
                       (self._now().isoformat(timespec="seconds"), row["reference"]))
            cancelled = db.execute("SELECT * FROM reservations WHERE reference = ?",
                                   (row["reference"],)).fetchone()
        return _public(cancelled)

    # -- rules --------------------------------------------------------------------------

    def _today(self) -> dt.date:
        return self._now().astimezone(self.config.zone).date()

    def _check_day(self, day: str) -> dt.date:
        try:
            date = dt.date.fromisoformat(day)
        except ValueError as exc:
            raise ToolError(f"{day!r} is not a date (use YYYY-MM-DD)",
                            code="invalid_date") from exc
        today = self._today()
        if date < today:
            raise ToolError(f"{day} is in the past; today is {today.isoformat()}",
                            code="invalid_date", details={"today": today.isoformat()})
        if date > today + dt.timedelta(days=self.config.max_days_ahead):
            raise ToolError(f"bookings open {self.config.max_days_ahead} days ahead; "
                            f"{day} is too far away", code="invalid_date")
        if not self.config.ranges_on(date):
            raise ToolError(f"the restaurant is closed on {_weekday(date)}s", code="closed",
                            details={"date": day, "weekday": _weekday(date)})
        return date

    def _check_party(self, party_size: int) -> None:
        if party_size < 1:
            raise ToolError("a booking needs at least one guest", code="invalid_party_size")
        if party_size > self.config.max_party:
            raise ToolError(f"tables seat at most {self.config.max_party}; larger groups "
                            "must contact the restaurant", code="party_too_large", details={
                                "max_party_size": self.config.max_party})

    def _check_time(self, date: dt.date, time: str) -> int:
        try:
            start = parse_clock(time)
        except ValueError as exc:
            raise ToolError(f"{time!r} is not a time (use HH:MM, 24-hour)",
                            code="invalid_time") from exc
        if start % self.config.interval_minutes:
            raise ToolError(f"bookings start every {self.config.interval_minutes} minutes; "
                            f"{time} is not one of those times", code="invalid_time")
        if start not in self.config.start_times(date):
            raise ToolError(
                f"{time} is outside the booking times on {_weekday(date)} (open "
                f"{self.config.describe_hours(date)}; a table is kept "
                f"{self.config.duration_minutes} minutes, so the last start is that long "
                "before closing)", code="outside_opening_hours",
                details={"opening_hours": self.config.describe_hours(date)})
        if not self._start_is_future(date, start):
            raise ToolError(f"{time} on {date.isoformat()} has already passed",
                            code="invalid_time")
        return start

    def _check_start(self, date: dt.date, time: str, party_size: int) -> int:
        self._check_party(party_size)
        return self._check_time(date, time)

    def _start_is_future(self, date: dt.date, start: int) -> bool:
        at = dt.datetime.combine(date, dt.time(start // 60, start % 60), self.config.zone)
        return at > self._now()

    def _slots(self, start: int) -> range:
        step = self.config.interval_minutes
        return range(start // step, (start + self.config.duration_minutes) // step)

    def _free_table(self, db: sqlite3.Connection, date: dt.date, start: int,
                    party_size: int) -> str | None:
        """The smallest table that seats the party and is free for the whole sitting."""
        slots = list(self._slots(start))
        busy = {row[0] for row in db.execute(
            f"SELECT DISTINCT table_name FROM occupancy WHERE day = ? "
            f"AND slot IN ({','.join('?' * len(slots))})", (date.isoformat(), *slots))}
        fitting = sorted((seats, name) for name, seats in self.config.tables.items()
                         if seats >= party_size and name not in busy)
        return fitting[0][1] if fitting else None

    def _occupy(self, db: sqlite3.Connection, reference: str, table: str,
                date: dt.date, start: int) -> None:
        db.executemany("INSERT INTO occupancy VALUES (?, ?, ?, ?)",
                       [(table, date.isoformat(), slot, reference)
                        for slot in self._slots(start)])

    def _taken(self, db: sqlite3.Connection, date: dt.date, start: int,
               party_size: int) -> ToolError:
        free = [s for s in self.config.start_times(date) if self._start_is_future(date, s)
                and self._free_table(db, date, start=s, party_size=party_size) is not None]
        nearest = sorted(sorted(free, key=lambda s: (abs(s - start), s))[:4])
        return ToolError(f"no table for {party_size} is free at {clock(start)} on "
                         f"{date.isoformat()}", code="slot_unavailable",
                         details={"alternatives": [clock(s) for s in nearest]})

    def _upcoming(self, db: sqlite3.Connection, reference: str) -> sqlite3.Row:
        row = db.execute("SELECT * FROM reservations WHERE reference = ?",
                         (reference.strip().upper(),)).fetchone()
        if row is None:
            raise ToolError(f"no booking has the reference {reference!r}", code="not_found")
        if row["status"] != "confirmed":
            raise ToolError(f"booking {row['reference']} was cancelled", code="cancelled")
        if not self._start_is_future(dt.date.fromisoformat(row["day"]), row["start_min"]):
            raise ToolError(f"booking {row['reference']} has already started or passed",
                            code="in_the_past")
        return row

    def _connection(self) -> AbstractContextManager[sqlite3.Connection]:
        return connection(self.db_path)

    def _transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        return transaction(self.db_path)


def _new_reference(db: sqlite3.Connection) -> str:
    while True:
        reference = "R-" + "".join(secrets.choice(REFERENCE_ALPHABET) for _ in range(6))
        if db.execute("SELECT 1 FROM reservations WHERE reference = ?",
                      (reference,)).fetchone() is None:
            return reference


def _digits(phone: str) -> str:
    """Phone numbers compared by their digits (and a leading +), however they were said."""
    phone = phone.strip()
    return ("+" if phone.startswith("+") else "") + "".join(c for c in phone if c.isdigit())


def _weekday(date: dt.date) -> str:
    return date.strftime("%A")


def _public(row: sqlite3.Row) -> dict[str, Any]:
    date = dt.date.fromisoformat(row["day"])
    return {"reference": row["reference"], "status": row["status"], "date": row["day"],
            "weekday": _weekday(date), "time": clock(row["start_min"]),
            "end_time": clock(row["end_min"]), "party_size": row["party_size"],
            "table": row["table_name"], "name": row["name"], "phone": row["phone"],
            "notes": row["notes"]}


def booking_tools(book: BookingBook, timeout_s: float = 5.0) -> list[ToolSpec]:
    """The five reservation tools, each a thin async wrapper running the book in a thread."""
    hours = f"Times are local ({book.config.timezone}); a table is kept " \
            f"{book.config.duration_minutes} minutes."

    async def check(args: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        return await asyncio.to_thread(book.availability, args["date"], args["party_size"],
                                       args.get("time"))

    async def create(args: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        return await asyncio.to_thread(book.create, args["date"], args["time"],
                                       args["party_size"], args["name"], args["phone"],
                                       args.get("notes", ""), ctx.session_id)

    async def reschedule(args: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        return await asyncio.to_thread(book.reschedule, args["reference"], args["date"],
                                       args["time"], args.get("party_size"))

    async def cancel(args: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        return await asyncio.to_thread(book.cancel, args["reference"])

    async def find(args: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        found = await asyncio.to_thread(book.find, args.get("reference"), args.get("phone"),
                                        args.get("name"), args.get("date"))
        return {"bookings": found, "count": len(found)}

    def spec(name: str, text: str, handler: Any, effect: SideEffect) -> ToolSpec:
        return ToolSpec(name, f"{text} {hours}", load_tool_schema(name), handler, effect,
                        timeout_s)

    return [
        spec("check_availability", "Find free table times for a party on a day, or check "
             "one time (with nearby alternatives when it is taken).", check,
             SideEffect.READ_ONLY),
        spec("create_booking", "Book a table once the guest has agreed on day, time, party "
             "size, name and phone number. Returns the booking reference to read back.",
             create, SideEffect.IDEMPOTENT_WRITE),
        spec("reschedule_booking", "Move an existing booking to a new day and time (and "
             "optionally a new party size).", reschedule, SideEffect.IDEMPOTENT_WRITE),
        spec("cancel_booking", "Cancel a booking by its reference.", cancel,
             SideEffect.IDEMPOTENT_WRITE),
        spec("find_bookings", "Look up upcoming bookings by reference, phone number or "
             "name (optionally on one day).", find, SideEffect.READ_ONLY),
    ]
