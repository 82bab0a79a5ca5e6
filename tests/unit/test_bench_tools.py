"""The tool-call benchmark's cases stay answerable, and its scoring means what it says."""

from __future__ import annotations

from collections import Counter

import pytest

from agent.bench.tools import offered_tools
from agent.bench.tools_cases import CASES, HARMLESS, Case, Words, arguments_match, score
from agent.json_schema import make_validator


@pytest.fixture(scope="module")
def tools() -> dict[str, dict]:
    return {t["function"]["name"]: t["function"]["parameters"] for t in offered_tools()}


def test_cases_have_unique_ids_and_cover_every_tool_twice(tools):
    assert len({c.id for c in CASES}) == len(CASES)
    per_tool = Counter(c.tool for c in CASES)
    assert set(tools) <= set(per_tool), f"tools without a case: {set(tools) - set(per_tool)}"
    assert all(per_tool[name] >= 2 for name in tools), per_tool
    assert per_tool[None] >= 3, "a few requests must need no tool"


@pytest.mark.parametrize("case", [c for c in CASES if c.tool], ids=lambda c: c.id)
def test_expected_call_is_a_valid_call_of_a_real_tool(case, tools):
    assert case.tool in tools
    schema = tools[case.tool]
    errors = [e.message for e in make_validator(schema).iter_errors(case.example_arguments())]
    assert not errors, errors
    # The call the case expects must be one the model can be scored right for: the
    # required arguments are all expected, so a right call is also a complete one.
    assert set(schema.get("required", ())) <= set(case.args)
    assert arguments_match(case.args, case.example_arguments())


def test_text_cases_expect_no_arguments():
    assert all(not c.args for c in CASES if c.tool is None)


BOOKING = Case("b", "…", "create_booking", {"date": "2026-12-05", "time": "19:30",
                                            "party_size": 4, "name": "Ana Ruiz",
                                            "phone": "555 0101"})


def _booking(**changes) -> dict:
    return {**BOOKING.args, **changes}


def test_names_match_whatever_their_case_and_spacing():
    assert score(BOOKING, [("create_booking", _booking(name="  ana   RUIZ "))]).exact


def test_phone_numbers_match_by_their_digits():
    for phone in ("5550101", "555-0101", "(555) 0101"):
        assert score(BOOKING, [("create_booking", _booking(phone=phone))]).exact
    assert not score(BOOKING, [("create_booking", _booking(phone="555 0102"))]).exact
    plus = Case("p", "…", "find_bookings", {"phone": "+44 20 7946 0958"})
    assert not arguments_match(plus.args, {"phone": "44 20 7946 0958"})


def test_dates_times_and_numbers_must_be_exact():
    assert not score(BOOKING, [("create_booking", _booking(date="2026-12-5"))]).exact
    assert not score(BOOKING, [("create_booking", _booking(time="19:31"))]).exact
    assert not score(BOOKING, [("create_booking", _booking(party_size=5))]).exact
    assert score(BOOKING, [("create_booking", _booking(party_size=4.0))]).exact
    assert not score(BOOKING, [("create_booking", _booking(party_size=True))]).exact
    payment = Case("m", "…", "create_payment", {"amount": 45.5, "currency": "GBP",
                                                 "description": Words("deposit")})
    assert arguments_match(payment.args, {"amount": 45.50, "currency": "gbp",
                                          "description": "Christmas DEPOSIT"})
    assert not arguments_match(payment.args, {"amount": 4550, "currency": "GBP",
                                              "description": "deposit"})
    assert not arguments_match(payment.args, {"amount": 45.5, "currency": "GBP",
                                              "description": "dinner"})


def test_references_match_case_insensitively_as_the_backend_stores_them():
    cancel = Case("c", "…", "cancel_booking", {"reference": "R-8LM3XC"})
    assert score(cancel, [("cancel_booking", {"reference": "r-8lm3xc"})]).exact
    assert not score(cancel, [("cancel_booking", {"reference": "R-8LM3XD"})]).exact


def test_a_missing_or_invented_argument_is_wrong_but_a_harmless_extra_is_not():
    assert not score(BOOKING, [("create_booking", {k: v for k, v in BOOKING.args.items()
                                                   if k != "phone"})]).exact
    refund = Case("r", "…", "refund_payment", {"payment_id": "pay_3f2a9c1d4e5b6a7f8091"})
    assert not score(refund, [("refund_payment", {**refund.args, "amount": 10})]).exact
    assert "notes" in HARMLESS
    assert score(BOOKING, [("create_booking", _booking(notes="window seat"))]).exact


def test_one_call_to_the_right_tool_is_needed():
    right = ("create_booking", BOOKING.args)
    verdict = score(BOOKING, [right, right])
    assert verdict.decided_right and not verdict.right_function and not verdict.exact
    verdict = score(BOOKING, [("check_availability", {"date": "2026-12-05", "party_size": 4})])
    assert verdict.decided_right and not verdict.right_function
    verdict = score(BOOKING, [])
    assert not verdict.decided_right and not verdict.exact


def test_a_text_case_is_right_only_without_a_call():
    hello = Case("t", "Hi there!", None)
    assert score(hello, []).exact
    verdict = score(hello, [("search_knowledge_base", {"query": "hi"})])
    assert not verdict.decided_right and not verdict.exact
