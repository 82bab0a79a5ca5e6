"""Reservations in SQLite: rules, changes, and no double booking under real races."""

import datetime as dt
import multiprocessing
import sqlite3
import threading

import pytest

from agent.dispatch.types import ToolError
from tests.tool_fixtures import FRIDAY, NEXT_MONDAY, NOW, TUESDAY, fixed_now
from tools.booking import BookingBook
from tools.booking_config import BookingConfig

ONE_TABLE = BookingConfig(tables={"Window": 4})


@pytest.fixture
def book(tmp_path):
    return BookingBook(tmp_path / "booking.sqlite3", now=fixed_now)


def _create(book, time="19:00", party=2, name="Ann Lee", phone="+44 7700 900123", day=TUESDAY):
    return book.create(day, time, party, name, phone)


def _code(call) -> str:
    with pytest.raises(ToolError) as caught:
        call()
    return caught.value.code


def test_a_booking_gets_a_reference_the_smallest_fitting_table_and_can_be_found(book):
    made = book.create(TUESDAY, "19:00", 3, "Ann Lee", "07700 900 123", "window seat")
    assert made["reference"].startswith("R-") and made["status"] == "confirmed"
    assert made["table"] == "T5"  # the 2-seat tables are too small, T5 is the first 4-seat
    assert (made["time"], made["end_time"], made["weekday"]) == ("19:00", "20:30", "Tuesday")
    assert book.find(reference=made["reference"].lower())[0]["notes"] == "window seat"
    assert book.find(phone="07700900123")[0]["reference"] == made["reference"]
    assert book.find(name="ann lee", day=TUESDAY)[0]["reference"] == made["reference"]
    assert book.find(phone="+1 555 0100") == []


def test_the_same_booking_asked_twice_is_one_booking(book):
    first = _create(book)
    again = _create(book)
    assert again["reference"] == first["reference"] and again["already_booked"]
    assert len(book.find(phone="+447700900123")) == 1


@pytest.mark.parametrize(("day", "time", "party", "code"), [
    ((NOW.date() - dt.timedelta(days=1)).isoformat(), "19:00", 2, "invalid_date"),
    ((NOW.date() + dt.timedelta(days=120)).isoformat(), "19:00", 2, "invalid_date"),
    (NEXT_MONDAY, "19:00", 2, "closed"),
    (TUESDAY, "16:00", 2, "outside_opening_hours"),
    (TUESDAY, "21:30", 2, "outside_opening_hours"),   # would run past closing
    (TUESDAY, "19:10", 2, "invalid_time"),            # not on the quarter hour
    (TUESDAY, "19:00", 9, "party_too_large"),
    (TUESDAY, "19:00", 0, "invalid_party_size"),
    ("2031-13-01", "19:00", 2, "invalid_date"),
])
def test_bad_dates_times_and_party_sizes_are_refused_clearly(book, day, time, party, code):
    assert _code(lambda: book.create(day, time, party, "Ann", "+44 7700 900123")) == code
    assert book.find(name="Ann", include_past=True) == []


def test_today_a_time_that_has_passed_is_refused(tmp_path):
    sunday_evening = dt.datetime(2031, 3, 2, 19, 5, tzinfo=NOW.tzinfo)
    book = BookingBook(tmp_path / "b.sqlite3", now=lambda: sunday_evening)
    assert _code(lambda: book.create("2031-03-02", "19:00", 2, "A", "+4412345678")) == \
        "invalid_time"
    times = book.availability("2031-03-02", 2)["available_times"]
    assert times[0] == "19:15" and "19:00" not in times


def test_availability_lists_free_times_and_offers_alternatives(tmp_path):
    book = BookingBook(tmp_path / "b.sqlite3", ONE_TABLE, now=fixed_now)
    free = book.availability(TUESDAY, 4)["available_times"]
    assert free[0] == "12:00" and free[-1] == "21:00" and "13:30" in free
    assert "13:45" not in free and "15:00" not in free  # lunch must end by 15:00
    book.create(TUESDAY, "19:00", 4, "Ann", "+441111111111")
    answer = book.availability(TUESDAY, 2, "19:30")
    assert answer["available"] is False
    assert answer["alternatives"] and all(
        t <= "17:30" or t >= "20:30" for t in answer["alternatives"])
    assert book.availability(TUESDAY, 2, "20:30")["available"] is True
    assert _code(lambda: book.availability(TUESDAY, 5)) == "party_too_large"


def test_a_taken_slot_is_refused_with_the_nearest_free_times(tmp_path):
    book = BookingBook(tmp_path / "b.sqlite3", ONE_TABLE, now=fixed_now)
    book.create(TUESDAY, "19:00", 2, "Ann", "+441111111111")
    with pytest.raises(ToolError) as caught:
        book.create(TUESDAY, "19:45", 2, "Bob", "+442222222222")  # overlaps 19:00–20:30
    assert caught.value.code == "slot_unavailable"
    assert "20:30" in caught.value.details["alternatives"]
    assert book.create(TUESDAY, "20:30", 2, "Bob", "+442222222222")["table"] == "Window"


def test_reschedule_moves_the_booking_and_frees_the_old_time(tmp_path):
    book = BookingBook(tmp_path / "b.sqlite3", ONE_TABLE, now=fixed_now)
    made = book.create(TUESDAY, "19:00", 2, "Ann", "+441111111111")
    moved = book.reschedule(made["reference"], FRIDAY, "12:30", party_size=4)
    assert (moved["date"], moved["time"], moved["party_size"]) == (FRIDAY, "12:30", 4)
    assert moved["reference"] == made["reference"]
    assert book.availability(TUESDAY, 4, "19:00")["available"] is True
    assert book.availability(FRIDAY, 4, "12:30")["available"] is False


def test_a_failed_reschedule_keeps_the_original_slot(tmp_path):
    book = BookingBook(tmp_path / "b.sqlite3", ONE_TABLE, now=fixed_now)
    mine = book.create(TUESDAY, "19:00", 2, "Ann", "+441111111111")
    book.create(FRIDAY, "19:00", 2, "Bob", "+442222222222")
    assert _code(lambda: book.reschedule(mine["reference"], FRIDAY, "19:30")) == \
        "slot_unavailable"
    assert book.find(reference=mine["reference"])[0]["date"] == TUESDAY
    assert _code(lambda: book.create(TUESDAY, "19:00", 2, "Cy", "+443333333333")) == \
        "slot_unavailable"


def test_cancel_frees_the_table_and_is_idempotent(tmp_path):
    book = BookingBook(tmp_path / "b.sqlite3", ONE_TABLE, now=fixed_now)
    made = book.create(TUESDAY, "19:00", 2, "Ann", "+441111111111")
    assert book.cancel(made["reference"])["status"] == "cancelled"
    assert book.cancel(made["reference"])["already_cancelled"] is True
    assert book.availability(TUESDAY, 2, "19:00")["available"] is True
    assert _code(lambda: book.reschedule(made["reference"], FRIDAY, "19:00")) == "cancelled"
    assert _code(lambda: book.cancel("R-ZZZZZZ")) == "not_found"


def _race(db_path, config, count: int) -> list[dict | str]:
    """`count` threads, each with its own book and connection, book one slot at once."""
    barrier = threading.Barrier(count, timeout=60)
    outcomes: list[dict | str] = [""] * count

    def attempt(i: int) -> None:
        try:
            book = BookingBook(db_path, config, now=fixed_now)  # all open the new file at once
            barrier.wait()
            outcomes[i] = book.create(TUESDAY, "19:00", 4, f"Guest {i}", f"+4470000000{i:02d}")
        except ToolError as exc:
            outcomes[i] = exc.code
        except Exception as exc:  # anything else fails the test instead of hanging it
            barrier.abort()
            outcomes[i] = repr(exc)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def _overlaps(db_path) -> int:
    db = sqlite3.connect(db_path)
    (count,) = db.execute(
        "SELECT COUNT(*) FROM reservations a JOIN reservations b ON a.reference < b.reference "
        "AND a.table_name = b.table_name AND a.day = b.day AND a.status = 'confirmed' "
        "AND b.status = 'confirmed' AND a.start_min < b.end_min AND b.start_min < a.end_min"
    ).fetchone()
    return count


def test_a_race_of_threads_for_the_last_table_books_it_exactly_once(tmp_path):
    outcomes = _race(tmp_path / "race.sqlite3", ONE_TABLE, count=12)
    winners = [o for o in outcomes if isinstance(o, dict)]
    assert len(winners) == 1, outcomes
    assert sorted(o for o in outcomes if isinstance(o, str)) == ["slot_unavailable"] * 11
    assert _overlaps(tmp_path / "race.sqlite3") == 0


def test_a_race_for_four_tables_fills_each_once(tmp_path):
    config = BookingConfig(tables={"A": 4, "B": 4, "C": 6, "D": 8})
    outcomes = _race(tmp_path / "race.sqlite3", config, count=10)
    tables = sorted(o["table"] for o in outcomes if isinstance(o, dict))
    assert tables == ["A", "B", "C", "D"]
    assert _overlaps(tmp_path / "race.sqlite3") == 0


def _book_in_process(db_path: str, i: int, start, results) -> None:
    book = BookingBook(db_path, ONE_TABLE, now=fixed_now)
    start.wait()
    try:
        book.create(TUESDAY, "19:00", 2, f"Proc {i}", f"+4471000000{i:02d}")
        results.put("won")
    except ToolError as exc:
        results.put(exc.code)


def test_a_race_of_processes_books_the_slot_once(tmp_path):
    context = multiprocessing.get_context("spawn")
    db_path = str(tmp_path / "race.sqlite3")
    BookingBook(db_path, ONE_TABLE, now=fixed_now)  # create the schema before the race
    start, results = context.Event(), context.Queue()
    workers = [context.Process(target=_book_in_process, args=(db_path, i, start, results))
               for i in range(4)]
    for worker in workers:
        worker.start()
    start.set()
    outcomes = sorted(results.get(timeout=60) for _ in workers)
    for worker in workers:
        worker.join(timeout=30)
    assert outcomes == ["slot_unavailable"] * 3 + ["won"]
    assert _overlaps(db_path) == 0
