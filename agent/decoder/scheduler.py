"""The scheduler: one worker thread owns the model; coroutines get streams of text deltas.

    scheduler = Scheduler(engine, max_streams=8)
    async for delta in scheduler.generate(GenerationRequest(messages=..., session_id="s1")):
        print(delta.text, end="")

Each loop of the worker runs at most one prefill chunk (of one request) and then one
batched decode step over every stream in decode, so streams join and leave between steps
(continuous batching) and a long prompt stalls the others for one chunk at a time.

Sessions: a stream with a `session_id` keeps its cache slot after it ends; the next
request of that session reuses the longest common prefix of token ids and prefills only
the rest. A request whose prompt shares a longer prefix with another cached session (the
same instructions and tools) copies those keys and values instead of computing them.
A request without a session keeps its slot too, idle, as a donor of prefixes; the next
such request sharing 64+ tokens with it takes that slot over. `truncate(session_id, n)`
cuts a session back (barge-in, rolled-back speculation). Slots are bounded
(`max_streams`); when a new session needs one, an idle sessionless slot is reused first,
then the least recently used idle session; requests wait while every slot is busy.

Cancellation: leaving the `async for` early, `aclose()`, or cancelling the task marks the
stream; the worker drops it before its next step, so it stops within one step and its
session holds exactly the tokens whose keys and values were written.

Thread-safety: the worker alone touches the model, the cache and the session table;
coroutines talk to it through a command queue, and it answers through each stream's
asyncio queue with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from agent.decoder.cuda_graphs import DecodeRunner
from agent.decoder.engine import Engine
from agent.decoder.generate import DEFAULT_PREFILL_CHUNK, Delta, TextStream, Usage
from agent.decoder.sampling import Sampler, SamplingParams, sample_batch
from agent.errors import InvalidRequestError, ModelUnavailableError, ParleyError

log = logging.getLogger(__name__)

# Positions per cache slot (clamped to the model's context). Memory is committed only as
# far as a slot is used: SmolLM2 needs 45 KiB of float32 K/V per token (180 MiB for a
# full slot), Qwen2.5-0.5B 24 KiB.
DEFAULT_MAX_SEQ_LEN = 4096
# Fewest prompt tokens worth copying from another session's cache instead of prefilling.
MIN_SHARED_PREFIX = 64


@dataclass
class GenerationRequest:
    """Either `prompt_ids` or `messages` (+ `tools`), sampling params, and a session id."""

    prompt_ids: Sequence[int] | None = None
    messages: Sequence[dict[str, Any]] | None = None
    tools: Sequence[dict[str, Any]] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    session_id: str | None = None


@dataclass
class _Session:
    id: str
    slot: int
    tokens: list[int] = field(default_factory=list)  # ids whose KV is in the slot
    busy: bool = False
    ephemeral: bool = False


class _Stream:
    """One request in flight (worker-side state plus the channel back to its coroutine)."""

    def __init__(self, request: GenerationRequest, prompt: list[int],
                 loop: asyncio.AbstractEventLoop, engine: Engine):
        self.request, self.prompt, self.loop = request, prompt, loop
        self.out: asyncio.Queue[Delta | BaseException] = asyncio.Queue()
        self.sampler = Sampler(request.params)
        self.text = TextStream(engine.tokenizer, request.params)
        self.cancelled = False  # set from the event loop; read by the worker
        self.session: _Session | None = None
        self.cursor = 0  # prompt tokens already in the cache
        self.cached = 0  # of those, reused from the session
        self.pending: int | None = None  # sampled token not yet fed to the model

    def send(self, item: Delta | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the consumer's loop is gone
            self.cancelled = True


class Scheduler:
    """Owns `engine.model` on a worker thread; see the module docstring."""

    def __init__(self, engine: Engine, *, max_streams: int = 8,
                 max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK):
        self.engine = engine
        self.cache = engine.model.new_cache(max_streams, max_seq_len)
        # Eager on the CPU; replayed from CUDA graphs on the GPU (cuda_graphs.py).
        self._decode = DecodeRunner(engine.model, self.cache)
        self.max_seq_len = self.cache.max_seq_len
        self.prefill_chunk = prefill_chunk
        self._commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._sessions: OrderedDict[str, _Session] = OrderedDict()  # LRU order
        self._free = list(range(max_streams))
        self._waiting: deque[_Stream] = deque()
        self._prefilling: deque[_Stream] = deque()
        self._decoding: list[_Stream] = []
        self._ids = itertools.count()
        self.largest_batch = 0  # the most streams one decode step has carried
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="parley-decoder", daemon=True)
        self._thread.start()

    # --- the coroutine side ---------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Text deltas of one request; the last one has finish_reason and usage."""
        if self._closed:
            raise InvalidRequestError("the decoder is shut down")
        prompt = await asyncio.to_thread(self._prompt_ids, request)
        stream = _Stream(request, prompt, asyncio.get_running_loop(), self.engine)
        self._commands.put(("submit", stream))
        finished = False
        try:
            while True:
                item = await stream.out.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finish_reason is not None
                yield item
                if finished:
                    return
        finally:
            if not finished:
                stream.cancelled = True
                self._commands.put(("cancel", stream))

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        params = request.params
        if request.messages is not None:
            reserve = min(params.max_tokens, self.max_seq_len // 4)
            ids, _ = self.engine.fit_messages(request.messages, self.max_seq_len - reserve,
                                              tools=request.tools)
        elif request.prompt_ids is not None:
            ids = [int(i) for i in request.prompt_ids]
            if any(not 0 <= i < self.engine.args.vocab_size for i in ids):
                raise InvalidRequestError("prompt holds a token id outside the vocabulary")
        else:
            raise InvalidRequestError("a request needs prompt_ids or messages")
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        if len(ids) >= self.max_seq_len:
            raise InvalidRequestError(
                f"prompt of {len(ids)} tokens does not fit the {self.max_seq_len}-token "
                "context", code="context_length_exceeded")
        return ids

    async def truncate(self, session_id: str, n_tokens: int) -> int:
        """Cut a session's cache back to its first n_tokens; returns the new length."""
        return await self._call("truncate", session_id, n_tokens)

    async def release(self, session_id: str) -> None:
        """Forget a session and free its slot (a no-op for unknown ids)."""
        await self._call("release", session_id)

    async def session_tokens(self, session_id: str) -> list[int]:
        """The token ids held in a session's cache (empty for unknown ids)."""
        return await self._call("tokens", session_id)

    async def _call(self, *command: Any) -> Any:
        if self._closed:
            raise InvalidRequestError("the decoder is shut down")
        future: Future[Any] = Future()
        self._commands.put((*command, future))
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        """Stop the worker; streams in flight end with an error."""
        if not self._closed:
            self._closed = True
            self._commands.put(("close",))
            self._thread.join(timeout=10)

    def stats(self) -> dict[str, int | str]:
        """What /healthz shows for this model: what it runs on, and what it is doing."""
        return {"backend": self.engine.backend, "weights": self.engine.weights,
                "activations": self.engine.activations,
                "sessions": len(self._sessions), "waiting": len(self._waiting),
                "prefilling": len(self._prefilling), "decoding": len(self._decoding),
                "kv_bytes_per_stream": self.cache.bytes_per_stream,
                "largest_batch": self.largest_batch}

    # --- the worker thread ----------------------------------------------------------------

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            busy = bool(self._prefilling or self._decoding)
            if not self._drain(block=not busy):
                break
            self._admit_safely()
            with torch.inference_mode():
                self._guarded(self._prefill_step, list(self._prefilling)[:1])
                self._guarded(self._decode_step, list(self._decoding))
            # A stream that waited for its session (busy with the previous request) may
            # go now; without this the worker would sleep until the next command.
            self._admit_safely()
        gone = InvalidRequestError("the decoder shut down")
        for s in [*self._waiting, *self._prefilling, *self._decoding]:
            s.send(gone)
        while True:  # answer whatever arrived after "close"
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "submit":
                command[1].send(gone)
            elif isinstance(command[-1], Future):
                command[-1].set_exception(gone)

    def _drain(self, block: bool) -> bool:
        """Apply queued commands; False when told to close."""
        while True:
            try:
                command = self._commands.get(block=block)
            except queue.Empty:
                return True
            block = False
            kind, *rest = command
            if kind == "close":
                return False
            if kind == "submit":
                self._waiting.append(rest[0])
            elif kind == "cancel":
                self._finish(rest[0], None)
            else:
                *argv, future = rest
                try:
                    future.set_result(getattr(self, f"_cmd_{kind}")(*argv))
                except ParleyError as exc:
                    future.set_exception(exc)

    def _cmd_truncate(self, session_id: str, n_tokens: int) -> int:
        session = self._sessions.get(session_id)
        if session is None:
            return 0
        if session.busy:
            raise InvalidRequestError("cannot truncate a session while it is generating")
        del session.tokens[max(0, n_tokens):]
        self.cache.truncate(session.slot, len(session.tokens))
        return len(session.tokens)

    def _cmd_release(self, session_id: str) -> None:
        session = self._sessions.get(session_id)
        if session is not None and not session.busy:
            self._drop_session(session)

    def _cmd_tokens(self, session_id: str) -> list[int]:
        session = self._sessions.get(session_id)
        return list(session.tokens) if session else []

    def _drop_session(self, session: _Session) -> None:
        del self._sessions[session.id]
        self.cache.reset(session.slot)
        self._free.append(session.slot)

    def _admit_safely(self) -> None:
        try:
            self._admit()
        except Exception:  # the worker must outlive any one request
            log.exception("decoder admission failed")

    def _admit(self) -> None:
        """Give waiting streams a session and slot, in order, while slots last."""
        for stream in list(self._waiting):
            if stream.cancelled:
                self._waiting.remove(stream)
                continue
            session = self._session_for(stream)
            if session is None:
                continue
            self._waiting.remove(stream)
            session.busy = True
            stream.session = session
            prompt = stream.prompt
            # Reuse the common prefix, but always run the last prompt token for its logits.
            common = _common_prefix(session.tokens, prompt, limit=len(prompt) - 1)
            del session.tokens[common:]
            self.cache.truncate(session.slot, common)
            common = self._borrow_prefix(session, prompt, common)
            stream.cursor = stream.cached = common
            self._prefilling.append(stream)

    def _borrow_prefix(self, session: _Session, prompt: list[int], have: int) -> int:
        """Copy a longer shared prefix of `prompt` from another session's slot; returns how
        many prompt tokens `session` now holds. Sessions opened with the same instructions
        and tool descriptions (thousands of tokens with server tools) prefill them once."""
        others = (s for s in self._sessions.values() if s is not session)
        donor, best = _longest_shared_prefix(others, prompt, have)
        if donor is None or best - have < MIN_SHARED_PREFIX:
            return have  # a copy is not worth it for a few tokens
        self.cache.copy_prefix(donor.slot, session.slot, have, best)
        session.tokens.extend(prompt[have:best])
        return best

    def _session_for(self, stream: _Stream) -> _Session | None:
        sid = stream.request.session_id
        if sid is not None and sid in self._sessions:
            session = self._sessions[sid]
            if session.busy:
                return None  # the session's previous request is still running
            self._sessions.move_to_end(sid)
            return session
        if sid is None and (kept := self._matching_ephemeral(stream.prompt)) is not None:
            self._sessions.move_to_end(kept.id)
            return kept
        if not self._free:
            # A finished request without a session is only a prefix donor: it goes first.
            idle = [s for s in self._sessions.values() if not s.busy]
            if not idle:
                return None
            self._drop_session(next((s for s in idle if s.ephemeral), idle[0]))
        ephemeral = sid is None
        sid = sid if sid is not None else f"_ephemeral-{next(self._ids)}"
        session = _Session(sid, self._free.pop(0), ephemeral=ephemeral)
        self.cache.reset(session.slot)
        self._sessions[sid] = session
        return session

    def _matching_ephemeral(self, prompt: list[int]) -> _Session | None:
        """The idle sessionless slot sharing the longest prefix (64+ tokens) with `prompt`:
        consecutive requests of a stateless client (each tool round of a chat completion
        resends the whole conversation) then prefill only what is new."""
        idle = (s for s in self._sessions.values() if s.ephemeral and not s.busy)
        return _longest_shared_prefix(idle, prompt, MIN_SHARED_PREFIX - 1)[0]

    def _guarded(self, step: Any, streams: list[_Stream]) -> None:
        """Run a step; if it raises, the streams in it end with the error, the worker lives."""
        if not streams:
            return
        try:
            step(streams)
        except Exception as exc:  # any failure must reach the callers
            log.exception("decoder step failed")
            error = _step_error(exc)
            for s in streams:
                if s.session is not None and not s.cancelled:
                    s.session.tokens.clear()  # the cache may be half-written: start afresh
                    self.cache.reset(s.session.slot)
                if s in self._prefilling or s in self._decoding:
                    self._finish(s, error)

    def _prefill_step(self, streams: list[_Stream]) -> None:
        stream = streams[0]
        if stream.cancelled:
            self._finish(stream, None)
            return
        session = stream.session
        assert session is not None
        piece = stream.prompt[stream.cursor:stream.cursor + self.prefill_chunk]
        logits = self.engine.model(torch.tensor([piece]), self.cache, [session.slot],
                                   [stream.cursor])
        session.tokens.extend(piece)
        stream.cursor += len(piece)
        if stream.cursor == len(stream.prompt):
            self._prefilling.remove(stream)
            self._decoding.append(stream)
            self._emit(stream, stream.sampler(logits[0], stream.text.generated))

    def _decode_step(self, streams: list[_Stream]) -> None:
        rows = []
        for s in streams:
            assert s.session is not None
            if s.cancelled:
                self._finish(s, None)
            elif len(s.session.tokens) >= self.max_seq_len:
                self._emit_final(s, s.text.finish(), "length")
            else:
                rows.append(s)
        if not rows:
            return
        rows.sort(key=lambda s: s.session.slot)  # type: ignore[union-attr]
        tokens = [s.pending for s in rows if s.pending is not None]
        assert len(tokens) == len(rows)  # every stream in decode has its next token
        slots = [s.session.slot for s in rows]  # type: ignore[union-attr]
        positions = [len(s.session.tokens) for s in rows]  # type: ignore[union-attr]
        logits = self._decode(tokens, slots, positions)  # [B, vocab]
        self.largest_batch = max(self.largest_batch, len(rows))
        for s, fed in zip(rows, tokens, strict=True):
            s.session.tokens.append(fed)  # type: ignore[union-attr]
        if all(s.sampler.plain_greedy for s in rows):
            for s, token in zip(rows, sample_batch(logits, [s.sampler for s in rows],
                                                   [[] for _ in rows]), strict=True):
                self._emit(s, token)
            return
        for s, row in zip(rows, logits, strict=True):
            try:  # a failing mask hook ends its own stream, not the batch
                token = s.sampler(row, s.text.generated)
            except Exception as exc:
                self._finish(s, _as_parley_error(exc))
                continue
            self._emit(s, token)

    def _emit(self, stream: _Stream, token: int) -> None:
        text, finish = stream.text.accept(token)
        if finish is not None:
            self._emit_final(stream, text, finish, token)
            return
        stream.pending = token
        stream.send(Delta(text, [token]))

    def _emit_final(self, stream: _Stream, text: str, finish: str,
                    token: int | None = None) -> None:
        usage = Usage(len(stream.prompt), stream.cached, len(stream.text.generated))
        stream.send(Delta(text, [] if token is None else [token], finish, usage))
        self._finish(stream, None)

    def _finish(self, stream: _Stream, error: BaseException | None) -> None:
        """Take a stream out of the schedule; its session keeps what the cache holds."""
        for group in (self._waiting, self._prefilling):
            if stream in group:
                group.remove(stream)
        if stream in self._decoding:
            self._decoding.remove(stream)
        if error is not None:
            stream.send(error)
        session, stream.session = stream.session, None
        if session is None or not session.busy:
            return
        session.busy = False
        self.cache.truncate(session.slot, len(session.tokens))


def _as_parley_error(exc: BaseException) -> ParleyError:
    return exc if isinstance(exc, ParleyError) else ParleyError(f"decoder error: {exc}")


def _step_error(exc: BaseException) -> ParleyError:
    """What the streams of a failed step end with: the model is what broke (a 503 that
    says how), unless the error is already a typed one."""
    if isinstance(exc, ParleyError):
        return exc
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return ModelUnavailableError("the decoder ran out of GPU memory; fewer llm_streams "
                                     f"or a smaller model would fit ({exc})")
    return ModelUnavailableError(f"the decoder failed a step: {type(exc).__name__}: {exc}")


def _longest_shared_prefix(sessions: Iterable[_Session], prompt: Sequence[int],
                           beat: int) -> tuple[_Session | None, int]:
    """The session whose cached tokens share the most (more than `beat`) leading tokens
    with `prompt`, short of its last one, and how many; (None, beat) when none does."""
    best, found = beat, None
    for session in sessions:
        shared = _common_prefix(session.tokens, prompt, limit=len(prompt) - 1)
        if shared > best:
            best, found = shared, session
    return found, best


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if n >= limit or x != y:
            break
        n += 1
    return n
