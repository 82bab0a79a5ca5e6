"""Payments: create, refund, status — with the rules a voice agent needs around money.

Rules live here, whatever provider moves the money (tools/payment_providers.py):
- amounts are validated per currency (ISO 4217, minor units) and capped per payment;
- per-session and per-API-key limits over the last 24 hours (pending and succeeded
  payments count; refunds do not give headroom back);
- idempotency keys, scoped to the API key: the same key with the same request returns the
  same payment and charges once; the same key with a different request is refused;
- the dispatcher's confirmation step: creating or refunding is a non-idempotent write, so
  it runs only with `context.confirmed`; before that, `quote` says what would happen.

A payment is written as "pending" before the provider is asked and "succeeded" after, so
a crash in between leaves a record that a retry with the same key completes (the provider
is idempotent on the payment id) instead of charging again.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import secrets
import sqlite3
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.dispatch.spec import ToolSpec, load_tool_schema
from agent.dispatch.types import CallContext, SideEffect, ToolError
from agent.errors import ConfigError
from tools.currencies import CURRENCIES, Currency, currency, spoken, to_major, to_minor
from tools.payment_providers import (
    Charge,
    LocalLedgerProvider,
    PaymentProvider,
    ProviderError,
    Refund,
)
from tools.sqlite_db import connection, prepare, transaction

DAY_S = 24 * 3600

SCHEMA = """
CREATE TABLE IF NOT EXISTS payments (
    id TEXT PRIMARY KEY,
    key_id TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    session_id TEXT NOT NULL,
    amount_minor INTEGER NOT NULL CHECK (amount_minor > 0),
    currency TEXT NOT NULL,
    description TEXT NOT NULL,
    reference TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed')),
    provider TEXT NOT NULL,
    provider_ref TEXT,
    failure TEXT,
    created_at REAL NOT NULL,
    UNIQUE (key_id, idempotency_key)
);
CREATE INDEX IF NOT EXISTS payments_by_session ON payments (session_id, created_at);
CREATE INDEX IF NOT EXISTS payments_by_key ON payments (key_id, created_at);
CREATE TABLE IF NOT EXISTS refunds (
    id TEXT PRIMARY KEY,
    payment_id TEXT NOT NULL REFERENCES payments (id),
    key_id TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    amount_minor INTEGER NOT NULL CHECK (amount_minor > 0),
    reason TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed')),
    provider_ref TEXT,
    created_at REAL NOT NULL,
    UNIQUE (key_id, idempotency_key)
);
"""


@dataclass(frozen=True)
class PaymentLimits:
    """Caps in major units per currency; a currency not named gets the default from the
    currency table (one payment) and 2x / 10x that (a session / an API key per 24 h)."""

    currencies: frozenset[str] | None = None     # None: every currency in the table
    max_payment: Mapping[str, int] = field(default_factory=dict)
    session_daily: Mapping[str, int] = field(default_factory=dict)
    key_daily: Mapping[str, int] = field(default_factory=dict)

    def per_payment(self, cur: Currency) -> int:
        return self.max_payment.get(cur.code, cur.max_payment) * 10 ** cur.exponent

    def per_session(self, cur: Currency) -> int:
        default = 2 * self.max_payment.get(cur.code, cur.max_payment)
        return self.session_daily.get(cur.code, default) * 10 ** cur.exponent

    def per_key(self, cur: Currency) -> int:
        default = 10 * self.max_payment.get(cur.code, cur.max_payment)
        return self.key_daily.get(cur.code, default) * 10 ** cur.exponent

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> PaymentLimits:
        unknown = set(table) - {"currencies", "max_payment", "session_daily_limit",
                                "key_daily_limit", "provider"}
        if unknown:
            raise ConfigError(f"unknown payments setting(s): {', '.join(sorted(unknown))}")
        codes = table.get("currencies")
        if codes is not None:
            codes = frozenset(str(c).upper() for c in codes)
            if bad := sorted(codes - set(CURRENCIES)):
                raise ConfigError(f"payments: unsupported currencies {bad}")
        return cls(codes, _amounts(table, "max_payment"),
                   _amounts(table, "session_daily_limit"), _amounts(table, "key_daily_limit"))


def _amounts(table: Mapping[str, Any], name: str) -> dict[str, int]:
    try:
        values = {str(k).upper(): int(v) for k, v in dict(table.get(name, {})).items()}
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"payments: {name} must map currency codes to amounts") from exc
    if bad := sorted(set(values) - set(CURRENCIES)):
        raise ConfigError(f"payments: {name} names unsupported currencies {bad}")
    return values


@dataclass(frozen=True)
class Payer:
    """Who is paying, as the dispatcher knows it."""

    session_id: str
    key_id: str


class Payments:
    def __init__(self, db_path: Path, provider: PaymentProvider | None = None,
                 limits: PaymentLimits | None = None, clock: Callable[[], float] = time.time):
        self.db_path = Path(db_path)
        self.provider = provider or LocalLedgerProvider(self.db_path)
        self.limits = limits or PaymentLimits()
        self._clock = clock
        prepare(self.db_path, SCHEMA)

    # -- payments -----------------------------------------------------------------------

    def quote(self, amount: float, currency_code: str, description: str, payer: Payer,
              reference: str = "") -> dict[str, Any]:
        """What `create` would charge, after every check it would make; charges nothing."""
        cur, minor = self._money(amount, currency_code)
        with self._connection() as db:
            self._check_limits(db, cur, minor, payer)
        return {"action": "charge", "amount": to_major(minor, cur), "currency": cur.code,
                "description": description, "reference": reference,
                "summary": f"charge {spoken(minor, cur)} for {description!r}"}

    def create(self, amount: float, currency_code: str, description: str, payer: Payer,
               idempotency_key: str | None = None, reference: str = "") -> dict[str, Any]:
        """Charge once per idempotency key. Without a key: one per session and identical
        request, so a retry under a new call id (after a timeout) finds the first one."""
        cur, minor = self._money(amount, currency_code)
        request = _fingerprint(minor, cur.code, description, reference)
        idempotency_key = idempotency_key or f"auto:{payer.session_id}:{request}"
        with self._transaction() as db:
            row = db.execute("SELECT * FROM payments WHERE key_id = ? AND idempotency_key = ?",
                             (payer.key_id, idempotency_key)).fetchone()
            retry = row is not None
            if row is not None:
                _same_request(row, request, idempotency_key)
                if row["status"] != "pending":
                    return self._settled(row, replayed=True)
            else:
                self._check_limits(db, cur, minor, payer)
                row = self._insert_payment(db, payer, idempotency_key, request, minor, cur,
                                           description, reference)
        # A pending record found again is an attempt that never settled: finish it.
        return self._charge(row, cur, replayed=retry)

    def _insert_payment(self, db: sqlite3.Connection, payer: Payer, key: str, request: str,
                        minor: int, cur: Currency, description: str,
                        reference: str) -> sqlite3.Row:
        payment_id = "pay_" + secrets.token_hex(10)
        db.execute("INSERT INTO payments (id, key_id, idempotency_key, fingerprint, "
                   "session_id, amount_minor, currency, description, reference, status, "
                   "provider, created_at) VALUES (?,?,?,?,?,?,?,?,?,'pending',?,?)",
                   (payment_id, payer.key_id, key, request, payer.session_id, minor,
                    cur.code, description, reference, self.provider.name, self._clock()))
        return db.execute("SELECT * FROM payments WHERE id = ?", (payment_id,)).fetchone()

    def _charge(self, row: sqlite3.Row, cur: Currency, replayed: bool) -> dict[str, Any]:
        """Ask the provider (outside any lock), then settle the record either way."""
        charge = Charge(row["id"], row["amount_minor"], cur.code, row["description"],
                        f"session:{row['session_id']}")
        try:
            provider_ref = self.provider.charge(charge)
        except ProviderError as exc:
            with self._transaction() as db:
                db.execute("UPDATE payments SET status = 'failed', failure = ? WHERE id = ?",
                           (str(exc), row["id"]))
            raise ToolError(f"the payment was declined: {exc}", code="payment_declined",
                            details={"payment_id": row["id"]}) from exc
        with self._transaction() as db:
            db.execute("UPDATE payments SET status = 'succeeded', provider_ref = ? "
                       "WHERE id = ? AND status = 'pending'", (provider_ref, row["id"]))
            settled = db.execute("SELECT * FROM payments WHERE id = ?", (row["id"],)).fetchone()
        return self._settled(settled, replayed)

    def _settled(self, row: sqlite3.Row, replayed: bool) -> dict[str, Any]:
        if row["status"] == "failed":
            raise ToolError(f"this payment was declined earlier: {row['failure']}",
                            code="payment_declined", details={"payment_id": row["id"]})
        out = self.get(row["id"], Payer(row["session_id"], row["key_id"]))
        if replayed:
            out["replayed"] = True
            out["message"] = "this payment was already made; it was not charged again"
        return out

    def get(self, payment_id: str, payer: Payer) -> dict[str, Any]:
        with self._connection() as db:
            row = self._owned(db, payment_id, payer)
            refunds = db.execute("SELECT * FROM refunds WHERE payment_id = ? "
                                 "ORDER BY created_at", (row["id"],)).fetchall()
        return _public(row, refunds)

    # -- refunds ------------------------------------------------------------------------

    def quote_refund(self, payment_id: str, amount: float | None, payer: Payer,
                     ) -> dict[str, Any]:
        with self._connection() as db:
            row = self._owned(db, payment_id, payer)
            cur = CURRENCIES[row["currency"]]
            minor = self._refundable(db, row, cur, amount)
        return {"action": "refund", "payment_id": row["id"], "amount": to_major(minor, cur),
                "currency": cur.code,
                "summary": f"refund {spoken(minor, cur)} of payment {row['id']} "
                           f"({row['description']!r})"}

    def refund(self, payment_id: str, amount: float | None, payer: Payer,
               idempotency_key: str | None = None, reason: str = "") -> dict[str, Any]:
        with self._transaction() as db:
            row = self._owned(db, payment_id, payer)
            cur = CURRENCIES[row["currency"]]
            asked = "full" if amount is None else str(to_minor(amount, cur))
            request = _fingerprint(asked, row["id"])
            idempotency_key = idempotency_key or f"auto:{payer.session_id}:{request}"
            refund = db.execute("SELECT * FROM refunds WHERE key_id = ? AND "
                                "idempotency_key = ?", (payer.key_id, idempotency_key)
                                ).fetchone()
            if refund is not None:
                _same_request(refund, request, idempotency_key)
            else:
                minor = self._refundable(db, row, cur, amount)
                refund_id = "re_" + secrets.token_hex(10)
                db.execute("INSERT INTO refunds VALUES (?,?,?,?,?,?,?,'pending',NULL,?)",
                           (refund_id, row["id"], payer.key_id, idempotency_key, request,
                            minor, reason, self._clock()))
                refund = db.execute("SELECT * FROM refunds WHERE id = ?",
                                    (refund_id,)).fetchone()
        replayed = refund["status"] != "pending"
        if refund["status"] == "failed":
            raise ToolError("this refund was declined earlier", code="refund_declined")
        if not replayed:
            self._send_refund(refund, row, cur)
        out = self.get(row["id"], payer) | {"refund_id": refund["id"],
                                            "refund_amount": to_major(refund["amount_minor"],
                                                                      cur)}
        if replayed:
            out["replayed"] = True
        return out

    def _send_refund(self, refund: sqlite3.Row, payment: sqlite3.Row, cur: Currency) -> None:
        try:
            provider_ref = self.provider.refund(Refund(
                refund["id"], payment["id"], payment["provider_ref"] or "",
                refund["amount_minor"], cur.code))
        except ProviderError as exc:
            with self._transaction() as db:
                db.execute("UPDATE refunds SET status = 'failed' WHERE id = ?", (refund["id"],))
            raise ToolError(f"the refund was declined: {exc}", code="refund_declined") from exc
        with self._transaction() as db:
            db.execute("UPDATE refunds SET status = 'succeeded', provider_ref = ? "
                       "WHERE id = ? AND status = 'pending'", (provider_ref, refund["id"]))

    def _refundable(self, db: sqlite3.Connection, row: sqlite3.Row, cur: Currency,
                    amount: float | None) -> int:
        if row["status"] != "succeeded":
            raise ToolError(f"payment {row['id']} is {row['status']}; only a completed "
                            "payment can be refunded")
        (taken,) = db.execute("SELECT COALESCE(SUM(amount_minor), 0) FROM refunds WHERE "
                              "payment_id = ? AND status != 'failed'", (row["id"],)).fetchone()
        left = row["amount_minor"] - taken
        if left <= 0:
            raise ToolError(f"payment {row['id']} has already been refunded in full",
                            code="refund_exceeds_payment")
        minor = left if amount is None else to_minor(amount, cur)
        if minor > left:
            raise ToolError(f"at most {spoken(left, cur)} of payment {row['id']} can still "
                            f"be refunded", code="refund_exceeds_payment",
                            details={"refundable": to_major(left, cur)})
        return minor

    # -- rules --------------------------------------------------------------------------

    def _money(self, amount: float, currency_code: str) -> tuple[Currency, int]:
        cur = currency(currency_code, self.limits.currencies)
        minor = to_minor(amount, cur)
        cap = self.limits.per_payment(cur)
        if minor > cap:
            raise ToolError(f"one payment can be at most {spoken(cap, cur)}",
                            code="amount_over_limit", details={"max": to_major(cap, cur)})
        return cur, minor

    def _check_limits(self, db: sqlite3.Connection, cur: Currency, minor: int,
                      payer: Payer) -> None:
        since = self._clock() - DAY_S
        for column, who, cap in (("session_id", payer.session_id, self.limits.per_session(cur)),
                                 ("key_id", payer.key_id, self.limits.per_key(cur))):
            (spent,) = db.execute(
                f"SELECT COALESCE(SUM(amount_minor), 0) FROM payments WHERE {column} = ? "
                "AND currency = ? AND status != 'failed' AND created_at > ?",
                (who, cur.code, since)).fetchone()
            if spent + minor > cap:
                scope = "this conversation" if column == "session_id" else "this API key"
                left = max(0, cap - spent)
                raise ToolError(f"the daily limit for {scope} is {spoken(cap, cur)}; "
                                f"{spoken(left, cur)} is left", code="limit_exceeded",
                                details={"limit": to_major(cap, cur),
                                         "remaining": to_major(left, cur)})

    def _owned(self, db: sqlite3.Connection, payment_id: str, payer: Payer) -> sqlite3.Row:
        # Another key's payments do not exist, as far as this caller can tell.
        row = db.execute("SELECT * FROM payments WHERE id = ? AND key_id = ?",
                         (payment_id.strip(), payer.key_id)).fetchone()
        if row is None:
            raise ToolError(f"no payment has the id {payment_id!r}", code="not_found")
        return row

    def _connection(self) -> AbstractContextManager[sqlite3.Connection]:
        return connection(self.db_path)

    def _transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        return transaction(self.db_path)


def _fingerprint(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


def _same_request(row: sqlite3.Row, request: str, key: str) -> None:
    if row["fingerprint"] != request:
        raise ToolError(f"the idempotency key {key!r} was already used for a different "
                        "request; use a new key for a new payment", code="idempotency_conflict")


def _public(row: sqlite3.Row, refunds: list[sqlite3.Row]) -> dict[str, Any]:
    cur = CURRENCIES[row["currency"]]
    refunded = sum(r["amount_minor"] for r in refunds if r["status"] == "succeeded")
    status = row["status"]
    if status == "succeeded" and refunded:
        status = "refunded" if refunded >= row["amount_minor"] else "partially_refunded"
    return {
        "payment_id": row["id"], "status": status, "amount": to_major(row["amount_minor"], cur),
        "currency": cur.code, "refunded": to_major(refunded, cur),
        "description": row["description"], "reference": row["reference"],
        "created_at": dt.datetime.fromtimestamp(row["created_at"], dt.UTC)
        .isoformat(timespec="seconds"),
        "refunds": [{"refund_id": r["id"], "amount": to_major(r["amount_minor"], cur),
                     "status": r["status"], "reason": r["reason"]} for r in refunds],
    }



def payment_tools(payments: Payments, timeout_s: float = 15.0) -> list[ToolSpec]:
    """create/refund need the user's explicit confirmation (the dispatcher enforces it for
    non-idempotent writes and shows the model the quote instead); status is read-only."""

    def payer(ctx: CallContext) -> Payer:
        return Payer(ctx.session_id, ctx.key_id)

    async def create(args: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        return await asyncio.to_thread(
            payments.create, args["amount"], args["currency"], args["description"],
            payer(ctx), args.get("idempotency_key"), args.get("reference", ""))

    async def quote(args: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        return await asyncio.to_thread(payments.quote, args["amount"], args["currency"],
                                       args["description"], payer(ctx),
                                       args.get("reference", ""))

    async def refund(args: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        return await asyncio.to_thread(payments.refund, args["payment_id"], args.get("amount"),
                                       payer(ctx), args.get("idempotency_key"),
                                       args.get("reason", ""))

    async def quote_refund(args: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        return await asyncio.to_thread(payments.quote_refund, args["payment_id"],
                                       args.get("amount"), payer(ctx))

    async def status(args: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        return await asyncio.to_thread(payments.get, args["payment_id"], payer(ctx))

    write = SideEffect.NON_IDEMPOTENT_WRITE
    return [
        ToolSpec("create_payment", "Charge the customer's saved payment method. Say the "
                 "amount and what it is for, and call this only after the customer has "
                 "clearly said yes to that exact amount.", load_tool_schema("create_payment"),
                 create, write, timeout_s, preview=quote),
        ToolSpec("refund_payment", "Refund a payment in full or in part, after the customer "
                 "has confirmed the amount.", load_tool_schema("refund_payment"), refund,
                 write, timeout_s, preview=quote_refund),
        ToolSpec("get_payment", "Look up a payment's status, amount and refunds.",
                 load_tool_schema("get_payment"), status, SideEffect.READ_ONLY, timeout_s),
    ]
