"""Turn-taking for one realtime session: who holds the floor, and what to do about it.

`TurnState` is the one owner of every decision the session makes about turns. It is fed
what happens — the VAD's events, the buffer commands, transcripts, the response's
lifecycle, the client's cancel — and answers with the actions to take. It holds the
response slot (one response at a time, numbered by generation), the user item the speech
in progress becomes, the held (speculative) reply, and the barge-in decision. It does no
I/O: the session carries out the actions, so every rule here is tested with plain calls.

    LISTENING ──speech──► USER_SPEAKING ──stop──► TRANSCRIBING ──transcript──► (respond)
        ▲                  │ pause: hold a reply        │ more speech: back to speaking
        │                  ▼
    RESPONDING ──first audio──► SPEAKING ──done──► LISTENING, or AWAITING_TOOL when the
        │  speech                 │ speech         response called server tools (their
        ▼                         ▼                results get a follow-up response)
    OVERLAP: the user speaks over the response; its audio waits. Speech that stops before
        `backchannel_ms` of voice ("uh-huh", a cough) is dropped and the audio goes on;
        longer speech barges in ──► CANCELLING ──done──► the user's turn goes on.

An input that makes no sense in the current phase (audio from no response, a second
response while one runs) raises `IllegalTransition`: it is a bug in the caller, never
something a client can cause (client mistakes are refused before they get here).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar


class Phase(enum.Enum):
    LISTENING = "listening"                  # nobody speaks, no response
    USER_SPEAKING = "user speaking"          # speech in progress, no response
    TRANSCRIBING = "transcribing"            # a turn ended; its answer waits on the ASR
    RESPONDING = "responding"                # a response runs, no audio out yet
    SPEAKING = "speaking"                    # the response's audio is going out
    OVERLAP = "user over response"           # speech during a response: barge-in or not
    CANCELLING = "cancelling"                # the response was told to stop
    AWAITING_TOOL = "awaiting tool results"  # server tools run; a follow-up will answer


class Input(enum.Enum):
    SPEECH_STARTED = "speech started"
    SPEECH_PAUSED = "speech paused"
    VOICED = "voiced"
    SPEECH_STOPPED = "speech stopped"
    SPEECH_ABANDONED = "speech abandoned"    # the VAD was replaced mid-speech
    COMMITTED = "buffer committed"
    CLEARED = "buffer cleared"
    HELD = "reply held"
    TRANSCRIBED = "transcribed"
    RESPONSE_STARTED = "response started"
    AUDIO_STARTED = "audio started"
    CANCEL = "cancel"
    RESPONSE_FINISHED = "response finished"
    TOOLS_DONE = "tools done"
    CONFIGURED = "configured"


P = Phase
_ALL = frozenset(Phase)
_SPEECH = frozenset({P.USER_SPEAKING, P.OVERLAP, P.CANCELLING})
_ACTIVE = frozenset({P.RESPONDING, P.SPEAKING, P.OVERLAP, P.CANCELLING})
_SILENT = _ALL - {P.USER_SPEAKING, P.OVERLAP}

# phase → input → the phases it may lead to. Anything else is an illegal move.
TRANSITIONS: dict[Phase, dict[Input, frozenset[Phase]]] = {
    P.LISTENING: {
        Input.SPEECH_STARTED: frozenset({P.USER_SPEAKING}),
        Input.COMMITTED: frozenset({P.LISTENING}),
        Input.CLEARED: frozenset({P.LISTENING}),
        Input.TRANSCRIBED: frozenset({P.LISTENING}),
        Input.RESPONSE_STARTED: frozenset({P.RESPONDING}),
        Input.TOOLS_DONE: frozenset({P.LISTENING}),
        Input.CONFIGURED: frozenset({P.LISTENING}),
    },
    P.USER_SPEAKING: {
        Input.SPEECH_PAUSED: frozenset({P.USER_SPEAKING}),
        Input.VOICED: frozenset({P.USER_SPEAKING}),
        Input.HELD: frozenset({P.USER_SPEAKING}),
        Input.SPEECH_STOPPED: frozenset({P.TRANSCRIBING, P.LISTENING}),
        Input.SPEECH_ABANDONED: frozenset({P.LISTENING}),
        Input.COMMITTED: frozenset({P.USER_SPEAKING}),
        Input.CLEARED: frozenset({P.USER_SPEAKING}),
        Input.TRANSCRIBED: frozenset({P.USER_SPEAKING}),
        Input.RESPONSE_STARTED: frozenset({P.OVERLAP}),
        Input.TOOLS_DONE: frozenset({P.USER_SPEAKING}),
        Input.CONFIGURED: frozenset({P.USER_SPEAKING}),
    },
    P.TRANSCRIBING: {
        Input.SPEECH_STARTED: frozenset({P.USER_SPEAKING}),
        Input.TRANSCRIBED: frozenset({P.TRANSCRIBING, P.LISTENING}),
        Input.COMMITTED: frozenset({P.TRANSCRIBING}),
        Input.CLEARED: frozenset({P.TRANSCRIBING}),
        Input.RESPONSE_STARTED: frozenset({P.RESPONDING}),
        Input.TOOLS_DONE: frozenset({P.TRANSCRIBING}),
        Input.CONFIGURED: frozenset({P.TRANSCRIBING}),
    },
    P.RESPONDING: {
        Input.SPEECH_STARTED: frozenset({P.OVERLAP}),
        Input.AUDIO_STARTED: frozenset({P.SPEAKING}),
        Input.CANCEL: frozenset({P.CANCELLING}),
        Input.RESPONSE_FINISHED: frozenset({P.LISTENING, P.AWAITING_TOOL, P.TRANSCRIBING}),
        Input.COMMITTED: frozenset({P.RESPONDING}),
        Input.CLEARED: frozenset({P.RESPONDING}),
        Input.TRANSCRIBED: frozenset({P.RESPONDING}),
        Input.TOOLS_DONE: frozenset({P.RESPONDING}),
        Input.CONFIGURED: frozenset({P.RESPONDING}),
    },
    P.SPEAKING: {
        Input.SPEECH_STARTED: frozenset({P.OVERLAP}),
        Input.CANCEL: frozenset({P.CANCELLING}),
        Input.RESPONSE_FINISHED: frozenset({P.LISTENING, P.AWAITING_TOOL, P.TRANSCRIBING}),
        Input.COMMITTED: frozenset({P.SPEAKING}),
        Input.CLEARED: frozenset({P.SPEAKING}),
        Input.TRANSCRIBED: frozenset({P.SPEAKING}),
        Input.TOOLS_DONE: frozenset({P.SPEAKING}),
        Input.CONFIGURED: frozenset({P.SPEAKING}),
    },
    P.OVERLAP: {
        Input.VOICED: frozenset({P.OVERLAP, P.CANCELLING}),
        Input.SPEECH_PAUSED: frozenset({P.OVERLAP}),
        Input.SPEECH_STOPPED: frozenset({P.RESPONDING, P.SPEAKING}),
        Input.SPEECH_ABANDONED: frozenset({P.RESPONDING, P.SPEAKING}),
        Input.AUDIO_STARTED: frozenset({P.OVERLAP}),
        Input.CANCEL: frozenset({P.CANCELLING}),
        Input.RESPONSE_FINISHED: frozenset({P.USER_SPEAKING}),
        Input.COMMITTED: frozenset({P.OVERLAP}),
        Input.CLEARED: frozenset({P.OVERLAP}),
        Input.TRANSCRIBED: frozenset({P.OVERLAP}),
        Input.TOOLS_DONE: frozenset({P.OVERLAP}),
        Input.CONFIGURED: frozenset({P.OVERLAP}),
    },
    P.CANCELLING: {
        Input.SPEECH_STARTED: frozenset({P.CANCELLING}),
        Input.VOICED: frozenset({P.CANCELLING}),
        Input.SPEECH_PAUSED: frozenset({P.CANCELLING}),
        Input.SPEECH_STOPPED: frozenset({P.CANCELLING}),
        Input.SPEECH_ABANDONED: frozenset({P.CANCELLING}),
        Input.AUDIO_STARTED: frozenset({P.CANCELLING}),
        Input.CANCEL: frozenset({P.CANCELLING}),
        Input.RESPONSE_FINISHED: frozenset({P.LISTENING, P.USER_SPEAKING, P.TRANSCRIBING}),
        Input.COMMITTED: frozenset({P.CANCELLING}),
        Input.CLEARED: frozenset({P.CANCELLING}),
        Input.TRANSCRIBED: frozenset({P.CANCELLING}),
        Input.TOOLS_DONE: frozenset({P.CANCELLING}),
        Input.CONFIGURED: frozenset({P.CANCELLING}),
    },
    P.AWAITING_TOOL: {
        Input.SPEECH_STARTED: frozenset({P.USER_SPEAKING}),
        Input.TOOLS_DONE: frozenset({P.AWAITING_TOOL, P.LISTENING}),
        Input.COMMITTED: frozenset({P.AWAITING_TOOL}),
        Input.CLEARED: frozenset({P.AWAITING_TOOL}),
        Input.TRANSCRIBED: frozenset({P.AWAITING_TOOL}),
        Input.RESPONSE_STARTED: frozenset({P.RESPONDING}),
        Input.CONFIGURED: frozenset({P.AWAITING_TOOL}),
    },
}


class IllegalTransition(RuntimeError):
    def __init__(self, phase: Phase, what: Input, target: Phase | None = None):
        where = f" to {target.value}" if target is not None else ""
        super().__init__(f"turn state: {what.value} is not allowed in {phase.value}{where}")
        self.phase, self.input, self.target = phase, what, target


class ResponseActive(Exception):
    """A response was asked for while another holds the slot."""

    def __init__(self, response_id: str):
        super().__init__(response_id)
        self.response_id = response_id


class NoActiveResponse(Exception):
    """A cancel named no response in flight (or another one)."""


class HeldReply(Protocol):
    """What the machine needs to know of a speculative reply: the pause it answers."""

    @property
    def speech_end(self) -> int: ...


H = TypeVar("H", bound=HeldReply)


@dataclass(frozen=True)
class TurnPolicy:
    """The session's turn detection settings that decide behaviour."""

    create_response: bool = True       # a turn the VAD ends gets an answer by itself
    interrupt_response: bool = True    # speech over a response may cancel it
    backchannel_ms: int = 500          # voiced time speech needs to count as barge-in
    speculate: bool = True             # hold a reply during the end-of-turn pause


# -- actions ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Commit:
    """The speech that just stopped is a turn: it becomes user item `item_id`."""

    item_id: str


@dataclass(frozen=True)
class Backchannel:
    """The speech that just stopped (as item `item_id`) was no turn: drop its audio and
    its ASR pass."""

    item_id: str


@dataclass(frozen=True)
class Speculate:
    """Start a reply to the words before the pause at `speech_end` and `hold` it."""

    speech_end: int


@dataclass(frozen=True)
class DropHeld(Generic[H]):
    held: H


@dataclass(frozen=True)
class Respond(Generic[H]):
    """Start a response: to user item `user_item` (with `held` if one answers the same
    pause; the session checks that it still matches), or, with no item, a follow-up."""

    user_item: str | None = None
    held: H | None = None
    speech_end: int | None = None
    text: str | None = None


@dataclass(frozen=True)
class HoldAudio:
    generation: int


@dataclass(frozen=True)
class ReleaseAudio:
    generation: int


@dataclass(frozen=True)
class CancelResponse:
    generation: int
    reason: str


@dataclass(frozen=True)
class RunTools:
    """Response `generation` completed with server-side calls: run them."""

    generation: int


Action = (Commit | Backchannel | Speculate | DropHeld | Respond | HoldAudio | ReleaseAudio
          | CancelResponse | RunTools)


@dataclass
class ActiveResponse:
    id: str
    generation: int
    audible: bool = False              # its first audio has gone out
    cancel_reason: str | None = None


@dataclass
class _Answer:
    """A committed turn that gets an answer once it is transcribed and the floor is free."""

    item_id: str
    speech_end: int | None
    text: str | None = None            # set once transcribed (non-empty)


class TurnState(Generic[H]):
    def __init__(self, policy: TurnPolicy, new_item_id: Callable[[], str]):
        self.policy = policy
        self._new_item_id = new_item_id
        self.phase = Phase.LISTENING
        self.response: ActiveResponse | None = None
        self.user_item: str | None = None   # the item the speech in progress becomes
        self.held: H | None = None          # a reply held during the pause
        self.tools_running = 0
        self._generation = 0
        self._answer: _Answer | None = None
        self._pause_at: int | None = None   # start of the silence in the speech

    # -- speech ----------------------------------------------------------------------------

    @property
    def user_speaking(self) -> bool:
        return self.user_item is not None

    def speech_started(self) -> list[Action]:
        """The VAD heard speech begin (a new user item); returns what to do."""
        actions = self._drop_held()  # it answered words the user has now gone on from
        self.user_item, self._pause_at = self._new_item_id(), None
        if self.phase in (P.RESPONDING, P.SPEAKING):
            actions += self._move(Input.SPEECH_STARTED, P.OVERLAP)
            if self.policy.interrupt_response:
                assert self.response is not None
                actions.append(HoldAudio(self.response.generation))
        elif self.phase is P.CANCELLING:
            actions += self._move(Input.SPEECH_STARTED, P.CANCELLING)
        else:
            self._answer = None  # the user goes on: the answer waits for this turn
            actions += self._move(Input.SPEECH_STARTED, P.USER_SPEAKING)
        return actions

    def speech_paused(self, speech_end: int) -> list[Action]:
        """Silence began in the speech at `speech_end`: maybe the turn is over."""
        actions = self._move(Input.SPEECH_PAUSED, self.phase)
        self._pause_at = speech_end
        if self.held is not None:
            actions.append(DropHeld(self.held))
            self.held = None
        if (self.phase is P.USER_SPEAKING and self.policy.speculate
                and self.policy.create_response):
            actions.append(Speculate(speech_end))
        return actions

    def hold(self, held: H) -> list[Action]:
        """The reply `Speculate` asked for; dropped at once if the moment has passed."""
        if self.phase is not P.USER_SPEAKING or held.speech_end != self._pause_at:
            return [DropHeld(held)]
        self._move(Input.HELD, P.USER_SPEAKING)
        self.held = held
        return []

    def voiced(self, voiced_ms: int, voiced_until: int | None) -> list[Action]:
        """After each chunk of speech: `voiced_ms` of voice since the onset, the last of it
        ending at sample `voiced_until`. Voice past the pause drops the held reply; enough
        voice over a response barges in."""
        actions = self._move(Input.VOICED, self.phase)
        if (self.held is not None and voiced_until is not None
                and voiced_until > self.held.speech_end):
            actions.append(DropHeld(self.held))  # the pause was a breath: the user goes on
            self.held = None
        if (self.phase is P.OVERLAP and self.policy.interrupt_response
                and voiced_ms >= self.policy.backchannel_ms):
            assert self.response is not None
            actions += self._cancel("turn_detected")
        return actions

    def speech_stopped(self) -> list[Action]:
        """The VAD's silence ran out: the speech is a turn, or a backchannel."""
        item_id, self.user_item = self.user_item or self._new_item_id(), None
        actions: list[Action] = []
        if self.phase is P.OVERLAP:
            assert self.response is not None
            target = P.SPEAKING if self.response.audible else P.RESPONDING
            actions += self._move(Input.SPEECH_STOPPED, target)
            if not self.policy.interrupt_response:
                # Heard but not allowed to interrupt: the turn is answered afterwards.
                self._answer = _Answer(item_id, self._pause_at) \
                    if self.policy.create_response else None
                return [*actions, Commit(item_id)]
            return [*actions, Backchannel(item_id), ReleaseAudio(self.response.generation)]
        if self.phase is P.CANCELLING:
            actions += self._move(Input.SPEECH_STOPPED, P.CANCELLING)
            if self.policy.create_response:
                self._answer = _Answer(item_id, self._pause_at)
            return [*actions, Commit(item_id)]
        if self.policy.create_response:
            self._answer = _Answer(item_id, self._pause_at)
            actions += self._move(Input.SPEECH_STOPPED, P.TRANSCRIBING)
        else:
            actions += self._move(Input.SPEECH_STOPPED, P.LISTENING)
        return [*actions, Commit(item_id)]

    def speech_abandoned(self) -> list[Action]:
        """Turn detection changed mid-speech: that speech will never stop; forget it."""
        if self.phase not in _SPEECH:
            return []
        self.user_item = None
        if self.phase is P.OVERLAP:
            assert self.response is not None
            target = P.SPEAKING if self.response.audible else P.RESPONDING
            return [*self._move(Input.SPEECH_ABANDONED, target),
                    ReleaseAudio(self.response.generation)]
        target = P.CANCELLING if self.phase is P.CANCELLING else P.LISTENING
        return self._move(Input.SPEECH_ABANDONED, target)

    # -- buffer commands -------------------------------------------------------------------

    def committed(self) -> tuple[str, list[Action]]:
        """input_audio_buffer.commit: the item id the buffer becomes (the speech's own when
        someone speaks; the rest of that speech becomes a new item)."""
        actions = self._move(Input.COMMITTED, self.phase)
        actions += self._drop_held()
        item_id = self.user_item or self._new_item_id()
        if self.user_item is not None:
            self.user_item = self._new_item_id()
        return item_id, actions

    def cleared(self) -> list[Action]:
        actions = self._move(Input.CLEARED, self.phase)
        actions += self._drop_held()
        if self.user_item is not None:
            self.user_item = self._new_item_id()
        return actions

    def configured(self, policy: TurnPolicy) -> list[Action]:
        """session.update: new rules; a held reply was made under the old ones."""
        self.policy = policy
        return [*self._move(Input.CONFIGURED, self.phase), *self._drop_held()]

    # -- transcripts -----------------------------------------------------------------------

    def transcribed(self, item_id: str, text: str | None) -> list[Action]:
        """Item `item_id` has its transcript (`None`: the ASR failed)."""
        answer = self._answer
        if answer is None or answer.item_id != item_id:
            return self._move(Input.TRANSCRIBED, self.phase)
        if not text:
            self._answer = None
            target = P.LISTENING if self.phase is P.TRANSCRIBING else self.phase
            return [*self._move(Input.TRANSCRIBED, target), *self._drop_held()]
        if self.phase is P.TRANSCRIBING:
            self._answer, held, self.held = None, self.held, None
            return [*self._move(Input.TRANSCRIBED, P.LISTENING),
                    Respond(item_id, held, answer.speech_end, text)]
        answer.text = text  # answered when the response in the way is done
        return self._move(Input.TRANSCRIBED, self.phase)

    # -- responses -------------------------------------------------------------------------

    def begin_response(self, response_id: str) -> tuple[int, list[Action]]:
        """Claim the response slot for `response_id`: its generation, and what to do (a
        held reply is dropped: the response answers the conversation as it is now)."""
        if self.response is not None:
            raise ResponseActive(self.response.id)
        target = P.OVERLAP if self.phase is P.USER_SPEAKING else P.RESPONDING
        actions = self._move(Input.RESPONSE_STARTED, target)
        self._answer = None  # it waits for every transcript, so it answers that turn too
        self._generation += 1
        self.response = ActiveResponse(response_id, self._generation)
        if target is P.OVERLAP and self.policy.interrupt_response:
            actions.append(HoldAudio(self._generation))
        return self._generation, actions

    def audio_started(self, generation: int) -> list[Action]:
        response = self._current(generation, Input.AUDIO_STARTED)
        response.audible = True
        target = P.SPEAKING if self.phase is P.RESPONDING else self.phase
        return self._move(Input.AUDIO_STARTED, target)

    def cancel(self, response_id: str | None = None) -> list[Action]:
        """response.cancel from the client (for the active one, or the one it names)."""
        if self.response is None or (response_id and response_id != self.response.id):
            raise NoActiveResponse(response_id)
        return self._cancel("client_cancelled")

    def _cancel(self, reason: str) -> list[Action]:
        assert self.response is not None
        if self.response.cancel_reason is not None:
            return self._move(Input.CANCEL, P.CANCELLING)
        self.response.cancel_reason = reason
        return [*self._move(Input.CANCEL, P.CANCELLING),
                CancelResponse(self.response.generation, reason)]

    def response_finished(self, generation: int, *, server_calls: bool) -> list[Action]:
        """Response `generation` sent its last event. `server_calls`: it completed with
        calls the session runs itself."""
        self._current(generation, Input.RESPONSE_FINISHED)
        self.response = None
        actions: list[Action] = [RunTools(generation)] if server_calls else []
        self.tools_running += bool(server_calls)
        if self.phase is P.OVERLAP:
            # Its audio waited for the speech's verdict; with no response left to cancel,
            # what it said goes out (the client truncates what it does not play).
            return [*self._move(Input.RESPONSE_FINISHED, P.USER_SPEAKING),
                    ReleaseAudio(generation), *actions]
        if self.phase is P.CANCELLING and self.user_speaking:
            return [*self._move(Input.RESPONSE_FINISHED, P.USER_SPEAKING), *actions]
        answer = self._answer
        if answer is not None and answer.text is not None:  # a turn the response was in
            self._answer = None                              # the way of: answer it now
            return [*self._move(Input.RESPONSE_FINISHED, P.LISTENING), *actions,
                    Respond(answer.item_id, None, answer.speech_end, answer.text)]
        target = P.AWAITING_TOOL if server_calls else P.LISTENING
        if answer is not None:
            target = P.TRANSCRIBING
        return [*self._move(Input.RESPONSE_FINISHED, target), *actions]

    def tools_done(self) -> list[Action]:
        """A RunTools finished and its results are in the conversation."""
        if self.tools_running <= 0:
            raise IllegalTransition(self.phase, Input.TOOLS_DONE)
        self.tools_running -= 1
        if self.phase in (P.AWAITING_TOOL, P.LISTENING) and self.tools_running == 0:
            return [*self._move(Input.TOOLS_DONE, P.LISTENING), Respond()]
        return self._move(Input.TOOLS_DONE, self.phase)

    # -- helpers ---------------------------------------------------------------------------

    def _current(self, generation: int, what: Input) -> ActiveResponse:
        if self.response is None or self.response.generation != generation:
            raise IllegalTransition(self.phase, what)
        return self.response

    def _move(self, what: Input, target: Phase) -> list[Action]:
        allowed = TRANSITIONS[self.phase].get(what)
        if allowed is None or target not in allowed:
            raise IllegalTransition(self.phase, what, target)
        self.phase = target
        # A held reply lives only while the turn it answers may still end.
        if target not in (P.USER_SPEAKING, P.TRANSCRIBING):
            return self._drop_held()
        return []

    def _drop_held(self) -> list[Action]:
        held, self.held = self.held, None
        return [DropHeld(held)] if held is not None else []
