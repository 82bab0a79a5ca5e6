"""Payments on the local ledger: validation, idempotency, refunds and limits."""

import threading

import pytest

from agent.dispatch.types import ToolError
from tools.currencies import CURRENCIES, to_major, to_minor
from tools.payment_providers import LocalLedgerProvider, ProviderError
from tools.payments import Payer, PaymentLimits, Payments

ANN = Payer("sess_ann", "key_frontdesk")


@pytest.fixture
def payments(tmp_path):
    return Payments(tmp_path / "payments.sqlite3")


def _code(call) -> str:
    with pytest.raises(ToolError) as caught:
        call()
    return caught.value.code


def test_a_payment_is_charged_to_the_ledger_and_reported(payments):
    paid = payments.create(25.5, "gbp", "Deposit for R-7KQ2MX", ANN, "k1", "R-7KQ2MX")
    assert paid["status"] == "succeeded" and paid["payment_id"].startswith("pay_")
    assert (paid["amount"], paid["currency"], paid["refunded"]) == ("25.50", "GBP", "0.00")
    assert payments.provider.balance("GBP") == 2550
    assert payments.get(paid["payment_id"], ANN) == paid


def test_retries_with_the_same_key_charge_once(payments):
    first = payments.create(40, "EUR", "Gift card", ANN, "retry-1")
    for _ in range(3):
        again = payments.create(40.0, "eur", "Gift card", ANN, "retry-1")
        assert again["payment_id"] == first["payment_id"] and again["replayed"] is True
    assert payments.provider.entries() == 1
    assert payments.provider.balance("EUR") == 4000


def test_concurrent_retries_with_the_same_key_charge_once(payments):
    barrier = threading.Barrier(8, timeout=60)
    ids: list[str] = []

    def pay() -> None:
        try:
            mine = Payments(payments.db_path)
            barrier.wait()
            ids.append(mine.create(12.34, "USD", "Late fee", ANN, "same-key")["payment_id"])
        except Exception as exc:
            barrier.abort()
            ids.append(repr(exc))

    threads = [threading.Thread(target=pay) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(ids) == 8 and len(set(ids)) == 1
    assert payments.provider.entries() == 1 and payments.provider.balance("USD") == 1234


def test_the_same_key_for_a_different_request_is_refused(payments):
    payments.create(10, "GBP", "Deposit", ANN, "k-conflict")
    assert _code(lambda: payments.create(11, "GBP", "Deposit", ANN, "k-conflict")) == \
        "idempotency_conflict"
    assert _code(lambda: payments.create(10, "GBP", "Other", ANN, "k-conflict")) == \
        "idempotency_conflict"
    # Keys belong to an API key: another key may use the same string for its own payment.
    other = payments.create(11, "GBP", "Deposit", Payer("s2", "key_other"), "k-conflict")
    assert other["amount"] == "11.00" and payments.provider.entries() == 2


@pytest.mark.parametrize(("amount", "currency", "code"), [
    (10, "XYZ", "invalid_currency"),
    (10, "usd1", "invalid_currency"),
    (0, "GBP", "invalid_amount"),
    (-5, "GBP", "invalid_amount"),
    (10.005, "GBP", "invalid_amount"),     # pence have two digits
    (1500.5, "JPY", "invalid_amount"),     # yen have none
    (5000, "GBP", "amount_over_limit"),    # one payment is capped at 1000 GBP by default
])
def test_amounts_and_currencies_are_validated(payments, amount, currency, code):
    assert _code(lambda: payments.create(amount, currency, "x", ANN, "v")) == code
    assert payments.provider.entries() == 0


def test_minor_units_follow_the_currency():
    assert to_minor(1.005, CURRENCIES["KWD"]) == 1005
    assert to_minor(1500, CURRENCIES["JPY"]) == 1500
    assert to_minor(0.1, CURRENCIES["EUR"]) == 10
    assert to_major(1005, CURRENCIES["KWD"]) == "1.005"
    assert to_major(1500, CURRENCIES["JPY"]) == "1500"


def test_refunds_partial_then_the_rest_never_more_than_paid(payments):
    paid = payments.create(60, "GBP", "Dinner", ANN, "dinner")
    part = payments.refund(paid["payment_id"], 20, ANN, "r1", "cold soup")
    assert (part["status"], part["refunded"], part["refund_amount"]) == \
        ("partially_refunded", "20.00", "20.00")
    with pytest.raises(ToolError) as caught:
        payments.refund(paid["payment_id"], 40.01, ANN, "r2")
    assert caught.value.code == "refund_exceeds_payment"
    assert caught.value.details["refundable"] == "40.00"
    rest = payments.refund(paid["payment_id"], None, ANN, "r3")
    assert (rest["status"], rest["refunded"], rest["refund_amount"]) == \
        ("refunded", "60.00", "40.00")
    assert payments.refund(paid["payment_id"], None, ANN, "r3")["replayed"] is True
    assert _code(lambda: payments.refund(paid["payment_id"], 1, ANN, "r4")) == \
        "refund_exceeds_payment"
    assert payments.provider.balance("GBP") == 0
    assert [r["amount"] for r in payments.get(paid["payment_id"], ANN)["refunds"]] == \
        ["20.00", "40.00"]


def test_another_keys_payment_cannot_be_seen_or_refunded(payments):
    paid = payments.create(5, "GBP", "Coffee", ANN, "coffee")
    stranger = Payer("sess_x", "key_stranger")
    assert _code(lambda: payments.get(paid["payment_id"], stranger)) == "not_found"
    assert _code(lambda: payments.refund(paid["payment_id"], None, stranger, "r")) == \
        "not_found"


def test_session_and_key_limits_over_a_day(tmp_path):
    clock = [1_000_000.0]
    limits = PaymentLimits(session_daily={"GBP": 100}, key_daily={"GBP": 250})
    payments = Payments(tmp_path / "p.sqlite3", limits=limits, clock=lambda: clock[0])
    payments.create(60, "GBP", "a", ANN, "a")
    with pytest.raises(ToolError) as caught:
        payments.create(50, "GBP", "b", ANN, "b")
    assert caught.value.code == "limit_exceeded"
    assert "conversation" in caught.value.message
    assert caught.value.details["remaining"] == "40.00"
    payments.create(40, "GBP", "b", ANN, "b2")           # exactly up to the limit
    # A refund does not give the headroom back.
    payments.refund(payments.create(0.01, "GBP", "c", Payer("s2", ANN.key_id), "c")
                    ["payment_id"], None, Payer("s2", ANN.key_id), "rc")
    payments.create(99.99, "GBP", "d", Payer("s2", ANN.key_id), "d")
    payments.create(50, "GBP", "e", Payer("s3", ANN.key_id), "e")
    with pytest.raises(ToolError) as caught:                # the key has 250 a day
        payments.create(0.01, "GBP", "f", Payer("s4", ANN.key_id), "f")
    assert "API key" in caught.value.message
    # Other currencies have their own limits; and after 24 hours the window has moved on.
    payments.create(10, "EUR", "g", ANN, "g")
    clock[0] += 24 * 3600 + 1
    payments.create(100, "GBP", "h", ANN, "h")


def test_a_quote_checks_everything_and_charges_nothing(payments):
    quote = payments.quote(19.99, "usd", "Shipping upgrade", ANN, "HK1234")
    assert quote["summary"] == "charge 19.99 USD for 'Shipping upgrade'"
    assert _code(lambda: payments.quote(19.99, "ABC", "x", ANN)) == "invalid_currency"
    assert payments.provider.entries() == 0


class Declining(LocalLedgerProvider):
    name = "declining"

    def charge(self, charge):
        raise ProviderError("insufficient funds")


class Flaky(LocalLedgerProvider):
    """Takes the money, then loses the connection before answering: the worst case."""

    name = "flaky"
    fail_next = True

    def charge(self, charge):
        ref = super().charge(charge)
        if self.fail_next:
            self.fail_next = False
            raise ConnectionError("reset by peer")
        return ref


def test_a_declined_payment_is_recorded_as_failed_and_stays_failed(tmp_path):
    payments = Payments(tmp_path / "p.sqlite3", provider=Declining(tmp_path / "ledger.db"))
    assert _code(lambda: payments.create(10, "GBP", "x", ANN, "d")) == "payment_declined"
    assert _code(lambda: payments.create(10, "GBP", "x", ANN, "d")) == "payment_declined"
    assert payments.provider.entries() == 0


def test_a_provider_that_fails_after_charging_is_retried_without_a_second_charge(tmp_path):
    provider = Flaky(tmp_path / "ledger.db")
    payments = Payments(tmp_path / "p.sqlite3", provider=provider)
    with pytest.raises(ConnectionError):
        payments.create(30, "GBP", "Deposit", ANN, "flaky")
    paid = payments.create(30, "GBP", "Deposit", ANN, "flaky")
    assert paid["status"] == "succeeded"
    assert provider.entries() == 1 and provider.balance("GBP") == 3000
