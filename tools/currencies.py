"""ISO 4217 currencies Parley takes payments in, and amounts in their minor units.

Amounts are kept as integers of the currency's minor unit (pence, cents; yen have none,
dinars have three decimals), never as floats. `max_payment` is a default cap on one
payment, in major units, of roughly the same value across currencies; operators change it.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from agent.dispatch.types import ToolError


@dataclass(frozen=True)
class Currency:
    code: str
    exponent: int       # digits after the decimal point
    name: str
    max_payment: int    # default cap on one payment, in major units


CURRENCIES: dict[str, Currency] = {c.code: c for c in (
    Currency("GBP", 2, "pound sterling", 1_000),
    Currency("EUR", 2, "euro", 1_000),
    Currency("USD", 2, "US dollar", 1_000),
    Currency("CHF", 2, "Swiss franc", 1_000),
    Currency("CAD", 2, "Canadian dollar", 1_500),
    Currency("AUD", 2, "Australian dollar", 1_500),
    Currency("NZD", 2, "New Zealand dollar", 1_500),
    Currency("SGD", 2, "Singapore dollar", 1_500),
    Currency("HKD", 2, "Hong Kong dollar", 8_000),
    Currency("SEK", 2, "Swedish krona", 10_000),
    Currency("NOK", 2, "Norwegian krone", 10_000),
    Currency("DKK", 2, "Danish krone", 7_500),
    Currency("PLN", 2, "Polish złoty", 4_000),
    Currency("CZK", 2, "Czech koruna", 25_000),
    Currency("MXN", 2, "Mexican peso", 20_000),
    Currency("INR", 2, "Indian rupee", 80_000),
    Currency("CNY", 2, "renminbi", 7_000),
    Currency("JPY", 0, "Japanese yen", 150_000),
    Currency("KRW", 0, "South Korean won", 1_300_000),
    Currency("KWD", 3, "Kuwaiti dinar", 300),
    Currency("BHD", 3, "Bahraini dinar", 400),
)}


def currency(code: str, enabled: frozenset[str] | None = None) -> Currency:
    """The currency for an ISO code (any case), or a ToolError naming what is supported."""
    found = CURRENCIES.get(code.strip().upper())
    if found is None or (enabled is not None and found.code not in enabled):
        supported = sorted(enabled if enabled is not None else CURRENCIES)
        raise ToolError(f"{code!r} is not a supported currency; use one of "
                        f"{', '.join(supported)}", code="invalid_currency")
    return found


def to_minor(amount: float | int | str, cur: Currency) -> int:
    """25.5 EUR -> 2550. Too many decimals for the currency, zero or less -> ToolError."""
    try:
        # repr() of a float is the shortest text that reads back the same: the JSON text.
        value = Decimal(repr(amount) if isinstance(amount, float) else str(amount))
    except InvalidOperation as exc:
        raise ToolError(f"{amount!r} is not an amount", code="invalid_amount") from exc
    if not value.is_finite() or value <= 0:
        raise ToolError("the amount must be more than zero", code="invalid_amount")
    minor = value.scaleb(cur.exponent)
    if minor != minor.to_integral_value():
        raise ToolError(f"{cur.code} amounts have at most {cur.exponent} decimal places; "
                        f"{value} has more", code="invalid_amount")
    return int(minor)


def to_major(minor: int, cur: Currency) -> str:
    """2550 EUR -> "25.50"; 1200 JPY -> "1200"."""
    return f"{Decimal(minor).scaleb(-cur.exponent):.{cur.exponent}f}"


def spoken(minor: int, cur: Currency) -> str:
    return f"{to_major(minor, cur)} {cur.code}"
