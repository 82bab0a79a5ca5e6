"""Runs a model's tool call: permission, validation, confirmation, idempotency, timeout.

`execute` never raises (cancellation aside): every failure becomes a ToolResult the model
can talk about. Once a call is claimed it runs to the end and its result is recorded even
if the caller is cancelled meanwhile (the work is shielded), so a call from a cancelled
response either never starts or finishes and is recorded — never half-way, unnoticed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from agent.dispatch.permissions import ToolPermissions
from agent.dispatch.records import DONE, CallRecords
from agent.dispatch.registry import ToolRegistry
from agent.dispatch.spec import ToolSpec
from agent.dispatch.types import (
    CallContext,
    ErrorCode,
    SideEffect,
    ToolCall,
    ToolError,
    ToolResult,
)
from agent.dispatch.validation import parse_arguments
from agent.state.store import Store

log = logging.getLogger(__name__)

Closer = Callable[[], Awaitable[None]]


class Dispatcher:
    def __init__(self, registry: ToolRegistry, store: Store,
                 permissions: ToolPermissions | None = None, *,
                 record_ttl_s: float = 7 * 24 * 3600, closers: tuple[Closer, ...] = ()):
        self.registry = registry
        self.permissions = permissions or ToolPermissions()
        self.records = CallRecords(store, record_ttl_s)
        self._closers = closers
        # call id -> (fingerprint, task) of the runs this process started and not finished
        self._inflight: dict[str, tuple[str, asyncio.Task[ToolResult]]] = {}

    # -- what the chat and realtime layers offer the model -----------------------------

    def tool_specs(self, context: CallContext) -> list[ToolSpec]:
        """The specs this context may call, in registration order."""
        return self.registry.specs(self.permissions.allowed(context, self.registry.names()))

    def openai_tools(self, context: CallContext) -> list[dict[str, Any]]:
        """A Chat Completions `tools` list of what this context may call."""
        return [spec.openai_tool() for spec in self.tool_specs(context)]

    def realtime_tools(self, context: CallContext) -> list[dict[str, Any]]:
        """A Realtime `session.tools` list of what this context may call."""
        return [spec.realtime_tool() for spec in self.tool_specs(context)]

    # -- running a call -----------------------------------------------------------------

    async def execute(self, call: ToolCall, context: CallContext) -> ToolResult:
        """Run `call` for `context` once, and say what happened. Raises only CancelledError."""
        started = time.perf_counter()
        try:
            return await self._execute(call, context, started)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the state store failed; this request ran nothing
            log.exception("tool call %s: the state store failed", call.id)
            return _failed(call, ErrorCode.STORE_UNAVAILABLE,
                           f"the call could not be checked or recorded "
                           f"({type(exc).__name__}); it was not run", started)

    async def _execute(self, call: ToolCall, context: CallContext,
                       started: float) -> ToolResult:
        spec = self.registry.get(call.name)
        if spec is None:
            log.warning("tool call to unknown tool %r (call_id=%s session=%s)",
                        call.name, call.id, context.session_id)
            return _failed(call, ErrorCode.UNKNOWN_TOOL,
                           f"there is no tool named {call.name!r}", started)
        if not self.permissions.allows(context, call.name):
            self.permissions.log_denial(context, call.name, call.id)
            return _failed(call, ErrorCode.PERMISSION_DENIED,
                           f"the tool {call.name!r} is "
                           f"{self.permissions.why_denied(context, call.name)}", started)
        if call.id in self._inflight:  # the same id racing in this process: share one run
            fingerprint, running = self._inflight[call.id]
            if fingerprint != call.fingerprint():
                return _reused(call, started)
            return _replayed(await asyncio.shield(running))
        earlier = await self.records.get(call.id)
        if earlier is not None:
            return await self._replay(call, context, earlier)
        try:
            arguments = parse_arguments(call.arguments, spec.validator)
        except ToolError as exc:
            result = _from_error(call, exc, started)
            await self.records.record_once(call, context, result)
            return result
        context = dataclasses.replace(context, call_id=call.id)
        if spec.side_effect is SideEffect.NON_IDEMPOTENT_WRITE and not context.confirmed:
            return await self._needs_confirmation(call, spec, arguments, context, started)
        return await self._start(call, spec, arguments, context, started)

    async def _start(self, call: ToolCall, spec: ToolSpec, arguments: dict[str, Any],
                     context: CallContext, started: float) -> ToolResult:
        task = asyncio.get_running_loop().create_task(
            self._claim_and_run(call, spec, arguments, context, started))
        self._inflight[call.id] = (call.fingerprint(), task)
        task.add_done_callback(lambda done: self._forget(call.id, done))
        return await asyncio.shield(task)

    async def _claim_and_run(self, call: ToolCall, spec: ToolSpec, arguments: dict[str, Any],
                             context: CallContext, started: float) -> ToolResult:
        try:
            earlier = await self.records.claim(call, context, spec.timeout_s)
        except Exception as exc:
            log.exception("tool call %s: claiming it in the state store failed", call.id)
            return _failed(call, ErrorCode.STORE_UNAVAILABLE,
                           f"the call could not be recorded ({type(exc).__name__}); "
                           "nothing was run", started)
        if earlier is not None:
            return await self._replay(call, context, earlier)
        result = await self._run(call, spec, arguments, context, started)
        log.info("tool call %s %s: %s in %.0f ms (session=%s)", call.id, spec.name,
                 "ok" if result.ok else result.code, result.duration_ms, context.session_id)
        try:
            await self.records.finish(call, context, result)
        except Exception:
            # It ran: the caller must hear the real outcome. A retry of this id will find
            # the claim without a result and report the outcome as in doubt.
            log.exception("tool call %s ran but its result could not be recorded", call.id)
        return result

    async def _run(self, call: ToolCall, spec: ToolSpec, arguments: dict[str, Any],
                   context: CallContext, started: float) -> ToolResult:
        try:
            output = await asyncio.wait_for(spec.handler(arguments, context), spec.timeout_s)
        except TimeoutError:
            return _failed(call, ErrorCode.TIMEOUT, _timeout_message(spec), started)
        except ToolError as exc:
            return _from_error(call, exc, started)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("tool %s failed (call_id=%s)", spec.name, call.id)
            return _failed(call, ErrorCode.BACKEND_FAILURE,
                           f"the tool failed unexpectedly ({type(exc).__name__})", started)
        if not isinstance(output, dict):
            output = {"result": output}
        try:
            json.dumps(output)
        except (TypeError, ValueError):
            log.error("tool %s returned a value that is not JSON", spec.name)
            return _failed(call, ErrorCode.BACKEND_FAILURE,
                           "the tool returned a reply that is not JSON", started)
        return ToolResult(call.id, call.name, True, output, None, _ms(started))

    async def _needs_confirmation(self, call: ToolCall, spec: ToolSpec,
                                  arguments: dict[str, Any], context: CallContext,
                                  started: float) -> ToolResult:
        """Describe what the call would do; nothing runs and nothing is recorded as final,
        so the same call can execute once the user has confirmed."""
        try:
            would = await asyncio.wait_for(spec.preview(arguments, context), spec.timeout_s) \
                if spec.preview is not None else {"tool": spec.name, "arguments": arguments}
        except ToolError as exc:
            return _from_error(call, exc, started)
        except Exception as exc:
            log.exception("preview of %s failed", spec.name)
            return _failed(call, ErrorCode.BACKEND_FAILURE,
                           f"the tool could not check the request ({type(exc).__name__})",
                           started)
        summary = would.get("summary") or f"run {spec.name}"
        message = (f"needs confirmation: ask the user to confirm explicitly that they want to "
                   f"{summary}; nothing has been done yet")
        output = {"status": ErrorCode.NEEDS_CONFIRMATION.value, "message": message,
                  "would": would}
        return _failed(call, ErrorCode.NEEDS_CONFIRMATION, message, started, output=output)

    async def _replay(self, call: ToolCall, context: CallContext,
                      record: dict[str, Any]) -> ToolResult:
        """The recorded outcome of an id seen before (waiting for it if still running)."""
        if record.get("fingerprint") != call.fingerprint():
            return _reused(call, time.perf_counter())
        if record.get("status") != DONE:
            done = await self.records.wait_done(call.id)
            if done is None:  # the claim was released (it expired): run it properly now
                return await self.execute(call, context)
            record = done
        if record.get("status") != DONE:
            return _failed(call, ErrorCode.IN_DOUBT,
                           "an earlier attempt of this call stopped without reporting back; "
                           "its effect is unknown — look the outcome up before retrying",
                           time.perf_counter())
        return ToolResult.from_json(record["result"], replayed=True)

    def _forget(self, call_id: str, task: asyncio.Task[ToolResult]) -> None:
        if call_id in self._inflight and self._inflight[call_id][1] is task:
            del self._inflight[call_id]

    async def aclose(self) -> None:
        """Let running calls finish and record, then release the backends' resources."""
        if self._inflight:
            await asyncio.gather(*(task for _, task in self._inflight.values()),
                                 return_exceptions=True)
        for close in self._closers:
            await close()


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


def _failed(call: ToolCall, code: str, message: str, started: float,
            output: dict[str, Any] | None = None) -> ToolResult:
    return ToolResult.failure(call, code, message, duration_ms=_ms(started), output=output)


def _from_error(call: ToolCall, exc: ToolError, started: float) -> ToolResult:
    return ToolResult.failure(call, exc.code, exc.message, exc.details, _ms(started))


def _reused(call: ToolCall, started: float) -> ToolResult:
    return _failed(call, ErrorCode.CALL_ID_REUSED,
                   f"the call id {call.id!r} was already used for a different call", started)


def _replayed(result: ToolResult) -> ToolResult:
    return dataclasses.replace(result, replayed=True)


def _timeout_message(spec: ToolSpec) -> str:
    message = f"the tool did not answer within {spec.timeout_s:g} s"
    if spec.side_effect is not SideEffect.READ_ONLY:
        message += "; it may still have taken effect, so look the outcome up before retrying"
    return message
