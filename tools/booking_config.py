"""What a restaurant offers: its tables, opening hours and booking rules.

Defaults describe the sample business of the shipped knowledge base (Harbour Kitchen:
closed Mondays, lunch 12:00–15:00, dinner 17:30–22:30, tables of 2 to 8, 90 minutes a
table, bookable 90 days ahead). Operators override any of it in `[tools.booking]`:

    [tools.booking]
    timezone = "Europe/Berlin"
    duration_minutes = 120
    tables = { A1 = 2, A2 = 4, Terrace = 10 }
    hours = { mon = "", tue = "18:00-23:00", sat = "12:00-15:00, 18:00-23:30" }
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.errors import ConfigError

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
Ranges = tuple[tuple[int, int], ...]  # (open, close) in minutes after midnight


def _default_tables() -> dict[str, int]:
    sizes = [2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 8]
    return {f"T{i}": size for i, size in enumerate(sizes, 1)}


def _default_hours() -> dict[str, Ranges]:
    service = ((12 * 60, 15 * 60), (17 * 60 + 30, 22 * 60 + 30))
    return {day: (() if day == "mon" else service) for day in WEEKDAYS}


@dataclass(frozen=True)
class BookingConfig:
    tables: Mapping[str, int] = field(default_factory=_default_tables)
    hours: Mapping[str, Ranges] = field(default_factory=_default_hours)
    duration_minutes: int = 90
    interval_minutes: int = 15      # bookable start times: on the quarter hour
    max_days_ahead: int = 90
    timezone: str = "Europe/London"

    def __post_init__(self) -> None:
        if not self.tables or any(size < 1 for size in self.tables.values()):
            raise ConfigError("booking: tables must be a non-empty map of name -> seats >= 1")
        if self.interval_minutes < 1 or self.duration_minutes % self.interval_minutes:
            raise ConfigError("booking: duration_minutes must be a multiple of "
                              "interval_minutes")
        if set(self.hours) != set(WEEKDAYS):
            raise ConfigError(f"booking: hours must name every weekday {WEEKDAYS}")
        try:
            zoneinfo.ZoneInfo(self.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
            raise ConfigError(f"booking: unknown timezone {self.timezone!r}") from exc

    @property
    def zone(self) -> dt.tzinfo:
        return zoneinfo.ZoneInfo(self.timezone)

    @property
    def max_party(self) -> int:
        return max(self.tables.values())

    def ranges_on(self, day: dt.date) -> Ranges:
        return self.hours[WEEKDAYS[day.weekday()]]

    def start_times(self, day: dt.date) -> list[int]:
        """Every start (minutes after midnight) whose whole sitting fits in opening hours."""
        starts: list[int] = []
        for opens, closes in self.ranges_on(day):
            first = -(-opens // self.interval_minutes) * self.interval_minutes
            starts.extend(range(first, closes - self.duration_minutes + 1,
                                self.interval_minutes))
        return starts

    def describe_hours(self, day: dt.date) -> str:
        ranges = self.ranges_on(day)
        if not ranges:
            return "closed"
        return ", ".join(f"{clock(a)}–{clock(b)}" for a, b in ranges)

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> BookingConfig:
        known = {"tables", "hours", "duration_minutes", "interval_minutes",
                 "max_days_ahead", "timezone"}
        unknown = set(table) - known
        if unknown:
            raise ConfigError(f"unknown booking setting(s): {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {}
        try:
            if "tables" in table:
                values["tables"] = {str(k): int(v) for k, v in dict(table["tables"]).items()}
            if "hours" in table:
                hours = _default_hours()
                for day, text in dict(table["hours"]).items():
                    if day not in WEEKDAYS:
                        raise ConfigError(f"booking hours: unknown weekday {day!r}")
                    hours[day] = parse_ranges(str(text))
                values["hours"] = hours
            for name in ("duration_minutes", "interval_minutes", "max_days_ahead"):
                if name in table:
                    values[name] = int(table[name])
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"booking: invalid setting: {exc}") from exc
        if "timezone" in table:
            values["timezone"] = str(table["timezone"])
        return cls(**values)


def parse_ranges(text: str) -> Ranges:
    """"12:00-15:00, 17:30-22:30" -> ((720, 900), (1050, 1350)); "" or "closed" -> ()."""
    if text.strip().lower() in ("", "closed"):
        return ()
    ranges = []
    for part in text.split(","):
        try:
            opens, closes = (parse_clock(p.strip()) for p in part.split("-"))
        except ValueError as exc:
            raise ConfigError(f"booking hours: cannot read {part.strip()!r}") from exc
        if closes <= opens:
            raise ConfigError(f"booking hours: {part.strip()!r} closes before it opens")
        ranges.append((opens, closes))
    return tuple(sorted(ranges))


def parse_clock(text: str) -> int:
    """"17:30" -> 1050 minutes; "24:00" allowed as a closing time."""
    hours, _, minutes = text.partition(":")
    value = int(hours) * 60 + int(minutes or 0)
    if not 0 <= int(minutes or 0) < 60 or not 0 <= value <= 24 * 60:
        raise ValueError(text)
    return value


def clock(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"
