"""The turn state machine, driven with plain calls: every phase's moves, the illegal ones,
barge-in from each phase a response can be in, the backchannel rule, and held replies
adopted and dropped. No models, no event loop."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest

from agent.realtime.turns import (
    TRANSITIONS,
    Backchannel,
    CancelResponse,
    Commit,
    DropHeld,
    HoldAudio,
    IllegalTransition,
    Input,
    NoActiveResponse,
    Phase,
    ReleaseAudio,
    Respond,
    ResponseActive,
    RunTools,
    Speculate,
    TurnPolicy,
    TurnState,
)


@dataclass(frozen=True)
class Held:
    speech_end: int


def machine(**policy: object) -> TurnState[Held]:
    counter = itertools.count(1)
    return TurnState(TurnPolicy(**policy), lambda: f"item_{next(counter)}")  # type: ignore[arg-type]


def speaking(turns: TurnState[Held]) -> str:
    turns.speech_started()
    assert turns.user_item is not None
    return turns.user_item


def responding(turns: TurnState[Held], audible: bool = False) -> int:
    generation, _ = turns.begin_response(f"resp_{turns._generation + 1}")
    if audible:
        turns.audio_started(generation)
    return generation


# -- the ordinary turn ------------------------------------------------------------------------

def test_a_spoken_turn_is_committed_transcribed_answered_and_spoken() -> None:
    turns = machine()
    item = speaking(turns)
    assert turns.phase is Phase.USER_SPEAKING
    assert turns.speech_stopped() == [Commit(item)]
    assert turns.phase is Phase.TRANSCRIBING and turns.user_item is None
    assert turns.transcribed(item, "where is my order") == \
        [Respond(item, None, None, "where is my order")]
    assert turns.phase is Phase.LISTENING
    generation, actions = turns.begin_response("resp_1")
    assert (generation, actions, turns.phase) == (1, [], Phase.RESPONDING)
    assert turns.audio_started(generation) == [] and turns.phase is Phase.SPEAKING
    assert turns.response_finished(generation, server_calls=False) == []
    assert turns.phase is Phase.LISTENING and turns.response is None


def test_an_empty_or_failed_transcript_gets_no_answer() -> None:
    for text in ("", None):
        turns = machine()
        item = speaking(turns)
        turns.speech_stopped()
        assert turns.transcribed(item, text) == []
        assert turns.phase is Phase.LISTENING


def test_without_create_response_a_turn_is_committed_and_left_to_the_client() -> None:
    turns = machine(create_response=False)
    item = speaking(turns)
    assert turns.speech_stopped() == [Commit(item)]
    assert turns.phase is Phase.LISTENING
    assert turns.transcribed(item, "hello") == []


def test_speech_before_the_transcript_arrives_means_the_user_goes_on() -> None:
    turns = machine()
    first = speaking(turns)
    turns.speech_stopped()
    second = speaking(turns)
    assert turns.transcribed(first, "so") == []  # the next turn's answer covers both
    turns.speech_stopped()
    assert turns.transcribed(second, "about my order") == \
        [Respond(second, None, None, "about my order")]


def test_a_response_the_client_asks_for_while_transcribing_answers_that_turn() -> None:
    turns = machine()
    item = speaking(turns)
    turns.speech_stopped()
    generation = responding(turns)
    assert turns.transcribed(item, "hello") == []
    assert turns.response_finished(generation, server_calls=False) == []  # not twice
    assert turns.phase is Phase.LISTENING


def test_a_manual_commit_is_not_answered_by_itself() -> None:
    turns = machine()
    item, actions = turns.committed()
    assert actions == [] and turns.phase is Phase.LISTENING
    assert turns.transcribed(item, "hello") == []


def test_a_commit_during_speech_takes_the_speech_item_and_the_rest_gets_a_new_one() -> None:
    turns = machine()
    item = speaking(turns)
    committed, _ = turns.committed()
    assert committed == item and turns.user_item not in (None, item)
    assert turns.phase is Phase.USER_SPEAKING


# -- the response slot --------------------------------------------------------------------------

def test_one_response_at_a_time_and_generations_count_up() -> None:
    turns = machine()
    assert responding(turns) == 1
    with pytest.raises(ResponseActive) as refused:
        turns.begin_response("resp_x")
    assert refused.value.response_id == "resp_1"
    turns.response_finished(1, server_calls=False)
    assert responding(turns) == 2


def test_a_client_cancel_names_the_active_response_or_none() -> None:
    turns = machine()
    with pytest.raises(NoActiveResponse):
        turns.cancel()
    generation = responding(turns)
    with pytest.raises(NoActiveResponse):
        turns.cancel("resp_other")
    assert turns.cancel() == [CancelResponse(generation, "client_cancelled")]
    assert turns.phase is Phase.CANCELLING
    assert turns.cancel() == []  # already on its way out: nothing more to do
    turns.response_finished(generation, server_calls=False)
    assert turns.phase is Phase.LISTENING


def test_server_calls_run_and_their_results_get_a_follow_up() -> None:
    turns = machine()
    generation = responding(turns)
    assert turns.response_finished(generation, server_calls=True) == [RunTools(generation)]
    assert turns.phase is Phase.AWAITING_TOOL
    assert turns.tools_done() == [Respond()]
    assert turns.phase is Phase.LISTENING


def test_speech_while_tools_run_takes_the_floor_from_the_follow_up() -> None:
    turns = machine()
    generation = responding(turns)
    turns.response_finished(generation, server_calls=True)
    speaking(turns)
    assert turns.tools_done() == []  # the user's turn will read the results
    assert turns.phase is Phase.USER_SPEAKING


def test_tools_done_without_tools_running_is_a_bug() -> None:
    with pytest.raises(IllegalTransition):
        machine().tools_done()


# -- barge-in ---------------------------------------------------------------------------------

@pytest.mark.parametrize("audible", [False, True], ids=["responding", "speaking"])
def test_speech_over_a_response_holds_its_audio_and_barges_in_once_voiced_long_enough(
        audible: bool) -> None:
    turns = machine(backchannel_ms=300)
    generation = responding(turns, audible)
    assert turns.speech_started() == [HoldAudio(generation)]
    assert turns.phase is Phase.OVERLAP
    assert turns.voiced(299, 100) == []
    assert turns.voiced(300, 200) == [CancelResponse(generation, "turn_detected")]
    assert turns.phase is Phase.CANCELLING
    assert turns.voiced(900, 300) == []  # decided once
    item = turns.user_item
    assert item is not None
    assert turns.response_finished(generation, server_calls=False) == []
    assert turns.phase is Phase.USER_SPEAKING
    assert turns.speech_stopped() == [Commit(item)]
    assert turns.transcribed(item, "no, stop") == [Respond(item, None, None, "no, stop")]


@pytest.mark.parametrize("audible", [False, True], ids=["responding", "speaking"])
def test_a_backchannel_is_dropped_and_the_audio_goes_on(audible: bool) -> None:
    turns = machine(backchannel_ms=300)
    generation = responding(turns, audible)
    item = speaking(turns)
    turns.voiced(200, 100)
    assert turns.speech_stopped() == [Backchannel(item), ReleaseAudio(generation)]
    assert turns.phase is (Phase.SPEAKING if audible else Phase.RESPONDING)
    assert turns.response is not None and turns.response.cancel_reason is None


def test_the_barge_in_turn_ends_before_the_cancelled_response_does() -> None:
    turns = machine(backchannel_ms=100)
    generation = responding(turns, audible=True)
    item = speaking(turns)
    turns.voiced(150, 10)
    assert turns.speech_stopped() == [Commit(item)]
    assert turns.phase is Phase.CANCELLING
    # transcript first, then the response's end: answered when the floor is free
    assert turns.transcribed(item, "wait") == []
    assert turns.response_finished(generation, server_calls=False) == \
        [Respond(item, None, None, "wait")]
    assert turns.phase is Phase.LISTENING


def test_the_barge_in_turn_transcribed_after_the_response_ended() -> None:
    turns = machine(backchannel_ms=100)
    generation = responding(turns)
    item = speaking(turns)
    turns.voiced(150, 10)
    turns.speech_stopped()
    assert turns.response_finished(generation, server_calls=False) == []
    assert turns.phase is Phase.TRANSCRIBING
    assert turns.transcribed(item, "wait") == [Respond(item, None, None, "wait")]


def test_a_cancelled_response_runs_none_of_its_calls_and_a_completed_one_during_speech_does(
        ) -> None:
    turns = machine(backchannel_ms=1000)
    generation = responding(turns)
    speaking(turns)
    assert turns.response_finished(generation, server_calls=True) == \
        [ReleaseAudio(generation), RunTools(generation)]
    assert turns.phase is Phase.USER_SPEAKING


def test_without_interrupt_response_speech_over_an_answer_is_a_turn_answered_after_it() -> None:
    turns = machine(interrupt_response=False, backchannel_ms=100)
    generation = responding(turns, audible=True)
    assert turns.speech_started() == []  # nothing to hold back: it will not be cut
    item = turns.user_item
    assert item is not None and turns.phase is Phase.OVERLAP
    assert turns.voiced(5000, 10) == []  # never cancels
    assert turns.speech_stopped() == [Commit(item)]
    assert turns.transcribed(item, "and tomorrow?") == []
    assert turns.response_finished(generation, server_calls=False) == \
        [Respond(item, None, None, "and tomorrow?")]


def test_a_response_asked_for_while_the_user_speaks_starts_in_overlap() -> None:
    turns = machine()
    speaking(turns)
    generation, actions = turns.begin_response("resp_1")
    assert actions == [HoldAudio(generation)] and turns.phase is Phase.OVERLAP


def test_speech_abandoned_by_a_new_vad_releases_held_audio() -> None:
    turns = machine()
    generation = responding(turns, audible=True)
    speaking(turns)
    assert turns.speech_abandoned() == [ReleaseAudio(generation)]
    assert turns.phase is Phase.SPEAKING and not turns.user_speaking


# -- held replies -------------------------------------------------------------------------------

def test_a_held_reply_is_adopted_when_the_turn_ends_at_its_pause() -> None:
    turns = machine()
    item = speaking(turns)
    assert turns.speech_paused(8000) == [Speculate(8000)]
    held = Held(8000)
    assert turns.hold(held) == [] and turns.held is held
    turns.voiced(400, 8000)  # no voice past the pause
    assert turns.speech_stopped() == [Commit(item)]
    assert turns.held is held  # still the candidate while transcribing
    assert turns.transcribed(item, "hi") == [Respond(item, held, 8000, "hi")]
    assert turns.held is None


def test_voice_after_the_pause_drops_the_held_reply() -> None:
    turns = machine()
    speaking(turns)
    turns.speech_paused(8000)
    held = Held(8000)
    turns.hold(held)
    assert turns.voiced(600, 9000) == [DropHeld(held)]
    assert turns.held is None


def test_a_second_pause_replaces_the_held_reply() -> None:
    turns = machine()
    speaking(turns)
    turns.speech_paused(8000)
    first = Held(8000)
    turns.hold(first)
    assert turns.speech_paused(12000) == [DropHeld(first), Speculate(12000)]


def test_a_reply_that_arrives_too_late_is_dropped_at_once() -> None:
    turns = machine()
    speaking(turns)
    turns.speech_paused(8000)
    turns.speech_paused(9000)
    stale = Held(8000)
    assert turns.hold(stale) == [DropHeld(stale)] and turns.held is None


@pytest.mark.parametrize("how", ["commit", "clear", "configure", "response", "speech",
                                 "empty transcript"])
def test_a_held_reply_is_dropped_when_its_turn_cannot_end_as_it_assumed(how: str) -> None:
    turns = machine()
    item = speaking(turns)
    turns.speech_paused(8000)
    held = Held(8000)
    turns.hold(held)
    if how == "commit":
        actions = turns.committed()[1]
    elif how == "clear":
        actions = turns.cleared()
    elif how == "configure":
        actions = turns.configured(TurnPolicy(backchannel_ms=500))
    elif how == "response":
        actions = turns.begin_response("resp_1")[1]
    elif how == "speech":
        turns.speech_stopped()
        actions = turns.speech_started()
    else:
        turns.speech_stopped()
        actions = turns.transcribed(item, "")
    assert DropHeld(held) in actions and turns.held is None


def test_no_held_reply_without_speculation_or_auto_responses() -> None:
    for policy in ({"speculate": False}, {"create_response": False}):
        turns = machine(**policy)
        speaking(turns)
        assert turns.speech_paused(8000) == []


def test_no_held_reply_over_a_running_response() -> None:
    turns = machine(backchannel_ms=10_000)
    responding(turns)
    speaking(turns)
    assert turns.speech_paused(8000) == []


# -- the table --------------------------------------------------------------------------------

def test_every_phase_has_its_moves_and_every_target_is_a_phase() -> None:
    assert set(TRANSITIONS) == set(Phase)
    for moves in TRANSITIONS.values():
        assert all(targets and targets <= set(Phase) for targets in moves.values())


@pytest.mark.parametrize("call", [
    lambda t: t.speech_stopped(),              # nobody spoke
    lambda t: t.audio_started(1),              # no response
    lambda t: t.response_finished(1, server_calls=False),
    lambda t: t.voiced(100, 10),
    lambda t: t.speech_paused(10),
], ids=["stop", "audio", "finish", "voiced", "pause"])
def test_moves_that_cannot_happen_while_listening_raise(call) -> None:
    turns = machine()
    with pytest.raises(IllegalTransition):
        call(turns)
    assert turns.phase is Phase.LISTENING


def test_audio_or_an_end_from_a_response_that_is_not_current_raises() -> None:
    turns = machine()
    generation = responding(turns)
    with pytest.raises(IllegalTransition):
        turns.audio_started(generation + 1)
    with pytest.raises(IllegalTransition):
        turns.response_finished(generation - 1, server_calls=False)


def test_speech_cannot_start_twice() -> None:
    turns = machine()
    speaking(turns)
    with pytest.raises(IllegalTransition):
        turns.speech_started()


def test_illegal_moves_are_exactly_the_ones_the_table_leaves_out() -> None:
    """Each input outside a phase's row raises from that phase."""
    reached: dict[Phase, TurnState[Held]] = {}

    def at(phase: Phase) -> TurnState[Held]:
        turns = machine(backchannel_ms=100)
        if phase is Phase.USER_SPEAKING:
            speaking(turns)
        elif phase is Phase.TRANSCRIBING:
            speaking(turns)
            turns.speech_stopped()
        elif phase in (Phase.RESPONDING, Phase.SPEAKING, Phase.OVERLAP, Phase.CANCELLING):
            responding(turns, audible=phase is Phase.SPEAKING)
            if phase is Phase.OVERLAP:
                speaking(turns)
            if phase is Phase.CANCELLING:
                turns.cancel()
        elif phase is Phase.AWAITING_TOOL:
            turns.response_finished(responding(turns), server_calls=True)
        assert turns.phase is phase
        return turns

    probes = {
        Input.SPEECH_STARTED: lambda t: t.speech_started(),
        Input.SPEECH_STOPPED: lambda t: t.speech_stopped(),
        Input.AUDIO_STARTED: lambda t: t.audio_started(t.response.generation if t.response
                                                       else 1),
        Input.CANCEL: lambda t: t.cancel() if t.response else t._move(Input.CANCEL, t.phase),
        Input.VOICED: lambda t: t.voiced(0, None),
    }
    for phase in Phase:
        reached[phase] = at(phase)
        for what, probe in probes.items():
            turns = at(phase)
            if what in TRANSITIONS[phase]:
                continue
            with pytest.raises((IllegalTransition, NoActiveResponse)):
                probe(turns)


def test_a_turn_heard_without_interrupting_waits_for_its_transcript_after_the_answer() -> None:
    turns = machine(interrupt_response=False)
    generation = responding(turns, audible=True)
    item = speaking(turns)
    turns.speech_stopped()
    assert turns.response_finished(generation, server_calls=False) == []
    assert turns.phase is Phase.TRANSCRIBING
    assert turns.transcribed(item, "and tomorrow?") == \
        [Respond(item, None, None, "and tomorrow?")]
