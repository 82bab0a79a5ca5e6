"""The dispatcher on the real embedded Redis and real backends: once per call id,
validation, permissions, timeouts, failures, cancellation and the payment confirmation."""

import asyncio
import dataclasses
import json
import logging
import time

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from agent.config import load_settings
from agent.dispatch import (
    CallContext,
    Dispatcher,
    SideEffect,
    ToolCall,
    ToolPermissions,
    ToolRegistry,
    ToolSpec,
    tool_message,
)
from agent.dispatch.catalog import open_dispatcher
from agent.dispatch.config import BUNDLED_KB, load_tools_config
from agent.state.store import Store
from tests.tool_fixtures import MODULE_LOOP, TUESDAY, call_id, fixed_now, store  # noqa: F401
from tools.booking import BookingBook, booking_tools
from tools.booking_config import BookingConfig
from tools.payments import Payments, payment_tools
from tools.search import SearchIndex, search_tools

pytestmark = MODULE_LOOP

OBJECT = {"type": "object", "properties": {"note": {"type": "string"}},
          "additionalProperties": False}
CONFIRMED = CallContext("sess_d", "sk-desk", confirmed=True)
ASKING = CallContext("sess_d", "sk-desk")


class Backends:
    """Test tools with real, countable effects: each run appends a line to a file."""

    def __init__(self, folder):
        self.log = folder / "runs.log"
        self.log.touch()

    def runs(self) -> list[str]:
        return self.log.read_text().splitlines()

    def specs(self) -> list[ToolSpec]:
        async def append(args, ctx):
            await asyncio.sleep(0.2)  # long enough for racing executes to overlap
            await asyncio.to_thread(self._write, f"{ctx.call_id} {args.get('note', '')}")
            return {"written": args.get("note", ""), "runs": len(self.runs())}

        async def slow(args, ctx):
            await asyncio.sleep(5)
            return {}

        async def broken(args, ctx):
            raise RuntimeError("disk on fire at /var/secret/path")

        async def not_json(args, ctx):
            return {"when": time}

        return [ToolSpec("append_note", "Append a note.", OBJECT, append,
                         SideEffect.IDEMPOTENT_WRITE, 5.0),
                ToolSpec("slow_lookup", "Slow.", OBJECT, slow, SideEffect.READ_ONLY, 0.2),
                ToolSpec("slow_write", "Slow write.", OBJECT, slow,
                         SideEffect.IDEMPOTENT_WRITE, 0.2),
                ToolSpec("broken", "Broken.", OBJECT, broken),
                ToolSpec("not_json", "Not JSON.", OBJECT, not_json)]

    def _write(self, line: str) -> None:
        with self.log.open("a") as fh:
            fh.write(line + "\n")


@pytest.fixture
def world(tmp_path, store):  # noqa: F811
    backends = Backends(tmp_path)
    payments = Payments(tmp_path / "payments.sqlite3")
    book = BookingBook(tmp_path / "booking.sqlite3", BookingConfig(tables={"Window": 4}),
                       now=fixed_now)
    registry = ToolRegistry(
        search_tools(SearchIndex(BUNDLED_KB, tmp_path / "search.sqlite3"))
        + booking_tools(book) + payment_tools(payments) + backends.specs())
    permissions = ToolPermissions(default_allow=("*",), by_key={
        "sk-kiosk": ("search_knowledge_base", "check_availability")})
    return dataclasses.make_dataclass("World", ["registry", "permissions", "backends",
                                                "payments", "store"])(
        registry, permissions, backends, payments, store)


def _dispatcher(world) -> Dispatcher:
    return Dispatcher(world.registry, world.store, world.permissions)


def _call(tool: str, ident: str | None = None, /, **arguments) -> ToolCall:
    return ToolCall(ident or call_id(), tool, json.dumps(arguments))


async def test_a_tool_runs_and_its_result_is_recorded(world):
    call = _call("search_knowledge_base", query="how do I reset my password")
    result = await _dispatcher(world).execute(call, ASKING)
    assert result.ok and result.error is None and result.duration_ms > 0
    assert result.output["results"][0]["source"] == "password-reset.md"
    record = await world.store.get_json("tool_call", call.id)
    assert record["status"] == "done" and record["call"]["name"] == "search_knowledge_base"
    assert record["result"]["output"] == result.output and record["session_id"] == "sess_d"
    message = tool_message(result)
    assert message["tool_call_id"] == call.id and json.loads(message["content"]) == \
        result.output


async def test_the_same_call_id_runs_once_when_executes_race_in_one_process(world):
    dispatcher = _dispatcher(world)
    call = _call("append_note", note="once")
    results = await asyncio.gather(*[dispatcher.execute(call, ASKING) for _ in range(5)])
    assert world.backends.runs() == [f"{call.id} once"]
    assert {json.dumps(r.output) for r in results} == {json.dumps(results[0].output)}
    assert sum(not r.replayed for r in results) == 1


async def test_the_same_call_id_runs_once_across_replicas(world):
    replicas = [_dispatcher(world) for _ in range(4)]  # separate dispatchers, one Redis
    call = _call("append_note", note="replicas")
    results = await asyncio.gather(*[d.execute(call, ASKING) for d in replicas])
    assert world.backends.runs() == [f"{call.id} replicas"]
    assert all(r.ok and r.output == results[0].output for r in results)
    later = await _dispatcher(world).execute(call, ASKING)
    assert later.replayed and later.output == results[0].output
    assert len(world.backends.runs()) == 1


async def test_a_reused_call_id_with_other_arguments_is_refused(world):
    dispatcher = _dispatcher(world)
    ident = call_id()
    await dispatcher.execute(_call("append_note", ident, note="first"), ASKING)
    other = await dispatcher.execute(_call("append_note", ident, note="second"), ASKING)
    assert other.code == "call_id_reused" and not other.ok
    assert world.backends.runs() == [f"{ident} first"]


async def test_invalid_arguments_give_an_error_naming_the_field_and_run_nothing(world):
    call = _call("create_booking", date=TUESDAY, time="7pm", party_size=2, name="Ann",
                 phone="+441111111111")
    result = await _dispatcher(world).execute(call, ASKING)
    assert result.code == "invalid_arguments" and "'time'" in result.error
    assert result.output["error"]["field"] == "time"
    broken_json = await _dispatcher(world).execute(
        ToolCall(call_id(), "append_note", '{"note": "x"'), ASKING)
    assert broken_json.code == "invalid_arguments" and "not valid JSON" in broken_json.error
    assert world.backends.runs() == []
    assert (await world.store.get_json("tool_call", call.id))["result"]["code"] == \
        "invalid_arguments"


async def test_an_unknown_tool_is_an_error_result(world):
    result = await _dispatcher(world).execute(_call("launch_rocket"), ASKING)
    assert result.code == "unknown_tool" and "launch_rocket" in result.error


async def test_a_tool_the_key_may_not_use_is_denied_and_logged(world, caplog):
    kiosk = CallContext("sess_k", "sk-kiosk")
    dispatcher = _dispatcher(world)
    assert [t["function"]["name"] for t in dispatcher.openai_tools(kiosk)] == \
        ["search_knowledge_base", "check_availability"]
    with caplog.at_level(logging.WARNING, logger="agent.dispatch"):
        result = await dispatcher.execute(_call("append_note", note="sneaky"), kiosk)
    assert result.code == "permission_denied" and not result.ok
    assert "not allowed for this API key" in result.error
    assert any("append_note" in r.getMessage() and "sess_k" in r.getMessage()
               for r in caplog.records)
    session_only = CallContext("sess_s", "sk-desk", allowed_tools=frozenset({"broken"}))
    assert (await dispatcher.execute(_call("append_note"), session_only)).code == \
        "permission_denied"
    assert world.backends.runs() == []


async def test_a_timeout_becomes_an_error_result_that_says_so(world):
    dispatcher = _dispatcher(world)
    started = time.monotonic()
    read = await dispatcher.execute(_call("slow_lookup"), ASKING)
    assert read.code == "timeout" and "0.2 s" in read.error
    assert "taken effect" not in read.error
    write = await dispatcher.execute(_call("slow_write"), ASKING)
    assert write.code == "timeout" and "may still have taken effect" in write.error
    assert time.monotonic() - started < 3


async def test_a_failing_backend_becomes_an_error_result_without_internals(world):
    dispatcher = _dispatcher(world)
    result = await dispatcher.execute(_call("broken"), ASKING)
    assert result.code == "backend_failure" and "RuntimeError" in result.error
    assert "/var/secret" not in json.dumps(result.output)
    weird = await dispatcher.execute(_call("not_json"), ASKING)
    assert weird.code == "backend_failure" and "not JSON" in weird.error
    # The dispatcher carries on as if nothing happened.
    assert (await dispatcher.execute(_call("append_note", note="after"), ASKING)).ok


async def test_a_cancelled_caller_does_not_stop_a_started_call_from_being_recorded(world):
    dispatcher = _dispatcher(world)
    call = _call("append_note", note="cancelled")
    waiter = asyncio.create_task(dispatcher.execute(call, ASKING))
    await asyncio.sleep(0.05)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await dispatcher.aclose()  # lets started calls finish
    record = await world.store.get_json("tool_call", call.id)
    assert record["status"] == "done" and record["result"]["ok"]
    again = await _dispatcher(world).execute(call, ASKING)
    assert again.replayed and world.backends.runs() == [f"{call.id} cancelled"]


async def test_a_call_whose_runner_died_is_reported_in_doubt_not_rerun(world):
    call = _call("append_note", note="ghost")
    await world.store.put_json("tool_call", call.id, {
        "status": "running", "fingerprint": call.fingerprint(), "deadline": time.time() - 1,
        "call": {"id": call.id, "name": call.name, "arguments": call.arguments}})
    result = await _dispatcher(world).execute(call, ASKING)
    assert result.code == "in_doubt" and world.backends.runs() == []


async def test_a_state_store_that_is_down_gives_an_error_result_and_runs_nothing(world):
    socket = str(world.backends.log.parent / "no.sock")
    dead = Store(aioredis.Redis(unix_socket_path=socket, retry=Retry(NoBackoff(), 0)))
    try:
        result = await Dispatcher(world.registry, dead, world.permissions).execute(
            _call("append_note", note="lost"), ASKING)
    finally:
        await dead.close()
    assert result.code == "store_unavailable" and "not run" in result.error
    assert world.backends.runs() == []


async def test_a_payment_needs_confirmation_and_then_charges_once(world):
    dispatcher = _dispatcher(world)
    ask = _call("create_payment", amount=45, currency="GBP", description="Deposit, 6 guests",
                reference="R-7KQ2MX")
    pending = await dispatcher.execute(ask, ASKING)
    assert pending.code == "needs_confirmation" and not pending.ok
    assert pending.output["status"] == "needs_confirmation"
    assert pending.output["would"]["amount"] == "45.00"
    assert "45.00 GBP" in pending.error and "Deposit, 6 guests" in pending.error
    assert world.payments.provider.entries() == 0

    paid = await dispatcher.execute(ask, CONFIRMED)  # the same call, after the user said yes
    assert paid.ok and paid.output["status"] == "succeeded"
    # The model retries with a new call id (say, after a timeout): no second charge.
    retry = await dispatcher.execute(
        _call("create_payment", amount=45.0, currency="gbp", description="Deposit, 6 guests",
              reference="R-7KQ2MX"), CONFIRMED)
    assert retry.output["payment_id"] == paid.output["payment_id"]
    assert retry.output["replayed"] is True
    # A replay of a done call needs no new confirmation and charges nothing.
    assert (await dispatcher.execute(ask, ASKING)).output == paid.output
    assert world.payments.provider.entries() == 1


async def test_payment_retries_with_one_idempotency_key_charge_once(world):
    dispatcher = _dispatcher(world)
    calls = [_call("create_payment", amount=12.5, currency="EUR", description="Gift card",
                   idempotency_key="gift-42") for _ in range(4)]
    results = await asyncio.gather(*[dispatcher.execute(c, CONFIRMED) for c in calls])
    assert len({r.output["payment_id"] for r in results}) == 1
    assert world.payments.provider.entries() == 1
    conflict = await dispatcher.execute(
        _call("create_payment", amount=99, currency="EUR", description="Gift card",
              idempotency_key="gift-42"), CONFIRMED)
    assert conflict.code == "idempotency_conflict"


async def test_an_invalid_payment_is_refused_before_asking_for_confirmation(world):
    result = await _dispatcher(world).execute(
        _call("create_payment", amount=10, currency="XYZ", description="x"), ASKING)
    assert result.code == "invalid_currency"


async def test_a_refund_needs_confirmation_too(world):
    dispatcher = _dispatcher(world)
    paid = await dispatcher.execute(
        _call("create_payment", amount=30, currency="GBP", description="Dinner"), CONFIRMED)
    refund = _call("refund_payment", payment_id=paid.output["payment_id"], amount=10)
    pending = await dispatcher.execute(refund, ASKING)
    assert pending.code == "needs_confirmation" and "refund 10.00 GBP" in pending.error
    done = await dispatcher.execute(refund, CONFIRMED)
    assert done.output["status"] == "partially_refunded"
    status = await dispatcher.execute(
        _call("get_payment", payment_id=paid.output["payment_id"]), ASKING)
    assert status.output["refunded"] == "10.00"


async def test_concurrent_bookings_through_the_dispatcher_book_the_table_once(world):
    dispatcher = _dispatcher(world)
    calls = [_call("create_booking", date=TUESDAY, time="19:00", party_size=2,
                   name=f"Guest {i}", phone=f"+4470000000{i:02d}") for i in range(6)]
    results = await asyncio.gather(*[dispatcher.execute(c, ASKING) for c in calls])
    assert sum(r.ok for r in results) == 1
    assert sorted(r.code for r in results if not r.ok) == ["slot_unavailable"] * 5
    loser = next(r for r in results if not r.ok)
    assert loser.output["error"]["alternatives"]


async def test_the_default_catalog_offers_every_built_in_tool(tmp_path, store):  # noqa: F811
    settings = load_settings(environ={}, cache_dir=str(tmp_path))
    config = load_tools_config(settings, environ={"PARLEY_TOOLS_ENABLED": "search,booking"})
    config = dataclasses.replace(config, timeouts={"find_bookings": 1.5})
    dispatcher = await open_dispatcher(settings, store, config)
    try:
        tools = dispatcher.openai_tools(ASKING)
        assert [t["function"]["name"] for t in tools] == [
            "search_knowledge_base", "check_availability", "create_booking",
            "reschedule_booking", "cancel_booking", "find_bookings"]
        assert dispatcher.registry.get("find_bookings").timeout_s == 1.5
        assert (tmp_path / "tools" / "booking.sqlite3").is_file()
        realtime = dispatcher.realtime_tools(ASKING)[0]
        assert realtime["name"] == "search_knowledge_base" and "parameters" in realtime
        lookup = await dispatcher.execute(_call("find_bookings"), ASKING)
        assert lookup.code == "missing_lookup"
    finally:
        await dispatcher.aclose()
    full = await open_dispatcher(settings, store, load_tools_config(settings, environ={}))
    assert len(full.openai_tools(ASKING)) == 9
    await full.aclose()
