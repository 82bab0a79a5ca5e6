"""Who actually moves the money: the `PaymentProvider` interface and the local ledger.

Parley's payment service (tools/payments.py) owns the rules — validation, limits,
idempotency, confirmation — and keeps its own record of every payment. It asks a provider
only to charge and to refund. A provider must be idempotent on the ids it is given
(`payment_id` for a charge, `refund_id` for a refund): the service may repeat a request
after a crash or a timeout, and the same id must never move money twice. Hosted
processors support exactly this (an idempotency-key header), so plugging one in means:

    class ProcessorProvider:
        name = "processor"
        def charge(self, charge: Charge) -> str:
            # POST /charges with Idempotency-Key: charge.payment_id, the customer's saved
            # payment method (looked up from charge.customer), amount in minor units.
            return processor_charge_id
        def refund(self, refund: Refund) -> str:
            # POST /refunds with Idempotency-Key: refund.refund_id.
            return processor_refund_id

and building `Payments(db_path, provider=ProcessorProvider(...))`. Raise ProviderError
for a declined charge (its message is shown to the model); any other exception leaves the
payment pending, and a retry with the same idempotency key asks the provider again.
Calls are blocking; the service runs them in a worker thread.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tools.sqlite_db import connection, prepare, transaction


@dataclass(frozen=True)
class Charge:
    payment_id: str     # the provider's idempotency key for this charge
    amount_minor: int
    currency: str
    description: str
    customer: str       # who pays: the session's customer reference


@dataclass(frozen=True)
class Refund:
    refund_id: str      # the provider's idempotency key for this refund
    payment_id: str
    provider_ref: str   # what charge() returned for the payment
    amount_minor: int
    currency: str


class ProviderError(Exception):
    """The provider refused (card declined, account closed): a final, explained failure."""


class PaymentProvider(Protocol):
    name: str

    def charge(self, charge: Charge) -> str:
        """Take the money; return the provider's reference. Idempotent on payment_id."""
        ...

    def refund(self, refund: Refund) -> str:
        """Give money back; return the provider's reference. Idempotent on refund_id."""
        ...


LEDGER_SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger_entries (
    entry_id TEXT PRIMARY KEY,          -- a payment_id or refund_id: one entry each, ever
    kind TEXT NOT NULL CHECK (kind IN ('charge', 'refund')),
    payment_id TEXT NOT NULL,
    customer TEXT NOT NULL,
    amount_minor INTEGER NOT NULL,      -- positive for charges, negative for refunds
    currency TEXT NOT NULL,
    description TEXT NOT NULL,
    created_at TEXT NOT NULL
);
"""


class LocalLedgerProvider:
    """The default: money moves only in a local ledger (a SQLite table), so a fresh
    install can run the whole payment flow without an account anywhere."""

    name = "local_ledger"

    def __init__(self, db_path: Path):
        self.db_path = Path(db_path)
        prepare(self.db_path, LEDGER_SCHEMA)

    def charge(self, charge: Charge) -> str:
        self._enter(charge.payment_id, "charge", charge.payment_id, charge.customer,
                    charge.amount_minor, charge.currency, charge.description)
        return f"ledger:{charge.payment_id}"

    def refund(self, refund: Refund) -> str:
        self._enter(refund.refund_id, "refund", refund.payment_id, "",
                    -refund.amount_minor, refund.currency, f"refund of {refund.payment_id}")
        return f"ledger:{refund.refund_id}"

    def _enter(self, entry_id: str, kind: str, payment_id: str, customer: str,
               amount_minor: int, currency: str, description: str) -> None:
        # INSERT OR IGNORE on the entry id: repeating a request books nothing new.
        with transaction(self.db_path) as db:
            db.execute("INSERT OR IGNORE INTO ledger_entries VALUES (?,?,?,?,?,?,?,?)",
                       (entry_id, kind, payment_id, customer, amount_minor, currency,
                        description, dt.datetime.now(dt.UTC).isoformat()))

    def balance(self, currency: str) -> int:
        """Net money taken in `currency` (charges minus refunds), in minor units."""
        with connection(self.db_path) as db:
            (total,) = db.execute("SELECT COALESCE(SUM(amount_minor), 0) FROM ledger_entries "
                                  "WHERE currency = ?", (currency,)).fetchone()
        return int(total)

    def entries(self) -> int:
        with connection(self.db_path) as db:
            (count,) = db.execute("SELECT COUNT(*) FROM ledger_entries").fetchone()
        return int(count)
