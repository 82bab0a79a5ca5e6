"""The customer-support requests `parley bench tools` asks, and how a reply is scored.

Each case is one user turn to Harbour Kitchen's assistant (a restaurant with an online
shop: the bundled knowledge base, booking and payment tools) with the one call it should
produce, or none when the right reply is plain text. Every request spells out what its
call needs (dates as YYYY-MM-DD, 24-hour times, references, payment ids), so the expected
call is unambiguous and a miss is the model's, not the case's.

Scoring a reply's calls against a case:
- `args` are the arguments that must be there and match: dates, times, references, ids,
  numbers and currencies exactly (references and currencies case-insensitively, as the
  backends store them upper-case); phone numbers by their digits (the booking backend keeps
  only those); names case- and whitespace-insensitively. Free text (a search query, what a
  payment is for) matches `Words`: each word must appear in it, ignoring case.
- Any other argument the model adds is wrong (an invented refund amount, a time nobody
  asked for), except the harmless optional ones in `HARMLESS`.
- Exactly one call: a second call would run a second backend action.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Optional arguments a model may add without changing what the call does.
HARMLESS = frozenset({"limit", "notes", "reason", "idempotency_key"})


@dataclass(frozen=True, init=False)
class Words:
    """Free text that must contain each of these words (case-insensitive)."""

    words: tuple[str, ...]

    def __init__(self, *words: str):
        object.__setattr__(self, "words", tuple(words))

    def matches(self, value: Any) -> bool:
        return isinstance(value, str) and all(w.casefold() in value.casefold()
                                              for w in self.words)

    def example(self) -> str:
        """A value that matches, for checking the case against the tool's schema."""
        return " ".join(self.words)


@dataclass(frozen=True)
class Case:
    id: str
    request: str
    tool: str | None  # None: the right reply is text
    args: Mapping[str, Any] = field(default_factory=dict)

    def example_arguments(self) -> dict[str, Any]:
        """The expected arguments as one concrete value (Words as their words)."""
        return {k: v.example() if isinstance(v, Words) else v for k, v in self.args.items()}


@dataclass(frozen=True)
class Score:
    decided_right: bool  # text when text was expected, a call when a call was
    right_function: bool  # exactly one call, to the expected tool
    exact: bool  # ... with the expected arguments and nothing invented


def normalise(key: str, value: Any) -> Any:
    """A value as the backends would treat it, for comparing expected and produced."""
    if not isinstance(value, str):
        return value
    if key == "phone":
        text = value.strip()
        return ("+" if text.startswith("+") else "") + re.sub(r"\D", "", text)
    if key in ("date", "time", "payment_id"):
        return value.strip()
    return " ".join(value.split()).casefold()


def _same(key: str, expected: Any, produced: Any) -> bool:
    if isinstance(expected, Words):
        return expected.matches(produced)
    if isinstance(expected, bool) or isinstance(produced, bool):
        return expected is produced
    if isinstance(expected, int | float) and isinstance(produced, int | float):
        return float(expected) == float(produced)
    return normalise(key, expected) == normalise(key, produced)


def arguments_match(expected: Mapping[str, Any], produced: Mapping[str, Any]) -> bool:
    if any(k not in produced or not _same(k, v, produced[k]) for k, v in expected.items()):
        return False
    return all(k in expected or k in HARMLESS for k in produced)


def score(case: Case, calls: Sequence[tuple[str, Mapping[str, Any]]]) -> Score:
    """Score a reply given as its (name, parsed arguments) calls, in order."""
    if case.tool is None:
        return Score(decided_right=not calls, right_function=not calls, exact=not calls)
    one = len(calls) == 1 and calls[0][0] == case.tool
    return Score(decided_right=bool(calls), right_function=one,
                 exact=one and arguments_match(case.args, calls[0][1]))


def _case(case_id: str, request: str, tool: str | None = None, /, **args: Any) -> Case:
    return Case(case_id, request, tool, args)


CASES: tuple[Case, ...] = (
    # search_knowledge_base: questions the knowledge base answers
    _case("kb-refunds", "What is your refund policy for damaged items?",
          "search_knowledge_base", query=Words("refund")),
    _case("kb-hours", "What are your opening hours on Sundays?",
          "search_knowledge_base", query=Words("hours")),
    _case("kb-password", "How do I reset the password of my online account?",
          "search_knowledge_base", query=Words("password")),
    _case("kb-gift-cards", "How long is a gift card valid for?",
          "search_knowledge_base", query=Words("gift card")),
    # check_availability
    _case("avail-day", "Do you have a free table for 2 on 2026-12-12?",
          "check_availability", date="2026-12-12", party_size=2),
    _case("avail-time", "Is there a table for 6 people at 20:00 on 2026-12-24?",
          "check_availability", date="2026-12-24", party_size=6, time="20:00"),
    _case("avail-lunch", "Can 3 of us get a table on 2027-01-08 at 13:15?",
          "check_availability", date="2027-01-08", party_size=3, time="13:15"),
    # create_booking: everything the booking needs is given
    _case("book-ana", "Book a table for 4 on 2026-12-05 at 19:30 under the name Ana Ruiz, "
          "phone 555 0101.", "create_booking", date="2026-12-05", time="19:30",
          party_size=4, name="Ana Ruiz", phone="555 0101"),
    _case("book-tom", "Please reserve a table for 2 people on 2026-12-18 at 20:00 for Tom "
          "Baker, my number is 07700 900123.", "create_booking", date="2026-12-18",
          time="20:00", party_size=2, name="Tom Baker", phone="07700 900123"),
    _case("book-priya", "I'd like to book a table for 8 on 2027-01-15 at 18:45, name Priya "
          "Shah, phone +44 20 7946 0958. We need a high chair.", "create_booking",
          date="2027-01-15", time="18:45", party_size=8, name="Priya Shah",
          phone="+44 20 7946 0958"),
    # reschedule_booking
    _case("move-date", "Please move booking R-7KQ2MX to 2026-12-06 at 20:15.",
          "reschedule_booking", reference="R-7KQ2MX", date="2026-12-06", time="20:15"),
    _case("move-party", "Can you change reservation R-4HT9ZP to 2026-12-20 at 19:00 and make "
          "it 5 people?", "reschedule_booking", reference="R-4HT9ZP", date="2026-12-20",
          time="19:00", party_size=5),
    _case("move-valentine", "Reschedule my booking R-2BN6WQ to 2027-02-14 at 21:00, please.",
          "reschedule_booking", reference="R-2BN6WQ", date="2027-02-14", time="21:00"),
    # cancel_booking
    _case("cancel-plain", "Cancel my booking R-8LM3XC, please.",
          "cancel_booking", reference="R-8LM3XC"),
    _case("cancel-need", "I need to cancel reservation R-5DK7TY.",
          "cancel_booking", reference="R-5DK7TY"),
    _case("cancel-cant-make", "We can't make it tonight, please cancel R-3PW8QN.",
          "cancel_booking", reference="R-3PW8QN"),
    # find_bookings
    _case("find-ref", "Can you look up my booking? The reference is R-6GV2HJ.",
          "find_bookings", reference="R-6GV2HJ"),
    _case("find-phone", "Which bookings do you have for the phone number 555 0199?",
          "find_bookings", phone="555 0199"),
    _case("find-name-day", "Do I have a reservation under the name Maria Lopez on "
          "2026-12-31?", "find_bookings", name="Maria Lopez", date="2026-12-31"),
    # create_payment: the customer has said yes to the amount
    _case("pay-deposit", "Yes, please charge 45.50 GBP for the Christmas dinner deposit.",
          "create_payment", amount=45.5, currency="GBP", description=Words("deposit")),
    _case("pay-room", "Go ahead and take the 120 EUR payment for the private room hire.",
          "create_payment", amount=120, currency="EUR", description=Words("room")),
    _case("pay-voucher", "Yes, I agree: charge me 30 USD for the gift voucher.",
          "create_payment", amount=30, currency="USD", description=Words("voucher")),
    # refund_payment: the customer has confirmed the amount
    _case("refund-full", "Please refund payment pay_3f2a9c1d4e5b6a7f8091 in full.",
          "refund_payment", payment_id="pay_3f2a9c1d4e5b6a7f8091"),
    _case("refund-part", "Refund 15 GBP of payment pay_0a1b2c3d4e5f60718293, the soup was "
          "cold.", "refund_payment", payment_id="pay_0a1b2c3d4e5f60718293", amount=15),
    _case("refund-double", "I confirm: refund 40 on pay_9e8d7c6b5a4f3e2d1c0b because the "
          "room was double booked.", "refund_payment",
          payment_id="pay_9e8d7c6b5a4f3e2d1c0b", amount=40),
    # get_payment
    _case("status-plain", "What is the status of payment pay_1234567890abcdef1234?",
          "get_payment", payment_id="pay_1234567890abcdef1234"),
    _case("status-through", "Has my payment pay_abcdefabcdef12345678 gone through?",
          "get_payment", payment_id="pay_abcdefabcdef12345678"),
    _case("status-check", "Can you check payment pay_00ff00ff00ff00ff00ff for me?",
          "get_payment", payment_id="pay_00ff00ff00ff00ff00ff"),
    # no tool: the right reply is text
    _case("text-hello", "Hi there!"),
    _case("text-thanks", "Thank you, that's all I needed."),
    _case("text-bye", "Goodbye!"),
    _case("text-slower", "Could you speak a bit more slowly, please?"),
    _case("text-wait", "Hold on a moment, let me find my diary."),
    _case("text-who", "Who am I speaking to?"),
)
