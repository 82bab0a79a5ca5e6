"""Sampling rules and stop strings (no model needed)."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.decoder.sampling import (
    Sampler,
    SamplingParams,
    StopMatcher,
    apply_mask,
    greedy_tokens,
    sample_batch,
    top_p_filter,
)
from agent.errors import InvalidRequestError


def logits(seed: int = 0, vocab: int = 500) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_temperature_zero_is_argmax():
    x = logits()
    assert Sampler(SamplingParams())(x, []) == int(x.argmax())
    batch = torch.stack([logits(1), logits(2)])
    assert sample_batch(batch, [Sampler(SamplingParams())] * 2, [[], []]) == \
        batch.argmax(-1).tolist()


def test_greedy_tokens_take_the_first_of_tied_maxima_as_torch_does():
    rows = torch.stack([logits(3), logits(4), torch.zeros(500)])
    rows[0, [7, 30]] = 100.0  # a tie: the first index wins
    rows[1, [2, 40]] = float("nan")  # a NaN counts as the largest, the first one wins
    assert greedy_tokens(rows) == rows.argmax(-1).tolist() == [7, 2, 0]
    assert greedy_tokens(rows.double()) == [7, 2, 0]  # the torch path for other dtypes
    with torch.inference_mode():
        assert greedy_tokens(rows * 1.0) == [7, 2, 0]


def test_same_seed_same_tokens_different_seed_different_tokens():
    x = logits()
    params = SamplingParams(temperature=1.0, seed=1234)
    run = [Sampler(params)(x, []) for _ in range(1)]
    a = Sampler(params)
    b = Sampler(params)
    seq_a = [a(x, []) for _ in range(40)]
    seq_b = [b(x, []) for _ in range(40)]
    assert seq_a == seq_b and seq_a[0] == run[0]
    other = Sampler(SamplingParams(temperature=1.0, seed=99))
    assert [other(x, []) for _ in range(40)] != seq_a


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    kept = top_p_filter(probs, 0.7)
    assert kept.nonzero().flatten().tolist() == [0, 1]
    assert top_p_filter(probs, 0.5).nonzero().flatten().tolist() == [0]
    assert top_p_filter(probs, 1.0).count_nonzero() == 4
    shuffled = probs[torch.tensor([2, 0, 3, 1])]
    assert top_p_filter(shuffled, 0.7).nonzero().flatten().tolist() == [1, 3]


def test_tiny_top_p_always_takes_the_most_likely_token():
    x = logits()
    sampler = Sampler(SamplingParams(temperature=1.5, top_p=1e-6, seed=3))
    assert {sampler(x, []) for _ in range(30)} == {int(x.argmax())}


def test_mask_hook_limits_the_choice_and_sees_the_history():
    allowed = torch.zeros(500, dtype=torch.bool)
    allowed[[7, 42, 99]] = True
    seen = []

    def mask_fn(generated):
        seen.append(list(generated))
        return allowed

    x = logits()
    for params in (SamplingParams(mask_fn=mask_fn),
                   SamplingParams(temperature=2.0, seed=0, mask_fn=mask_fn)):
        sampler = Sampler(params)
        history: list[int] = []
        for _ in range(20):
            history.append(sampler(x, history))
        assert set(history) <= {7, 42, 99}
    assert seen[0] == [] and len(seen[5]) == 5


def test_mask_none_means_unconstrained_and_empty_mask_is_an_error():
    x = logits()
    assert torch.equal(apply_mask(x, None), x)
    with pytest.raises(InvalidRequestError):
        apply_mask(x, torch.zeros(500, dtype=torch.bool))
    short = torch.ones(10, dtype=torch.bool)  # shorter than the vocabulary: rest disallowed
    assert int(apply_mask(x, short).argmax()) == int(x[:10].argmax())


@pytest.mark.parametrize("kwargs", [{"temperature": -0.1}, {"temperature": float("nan")},
                                    {"top_p": 0.0}, {"top_p": 1.5}, {"max_tokens": 0},
                                    {"stop": ("",)}])
def test_bad_params_are_invalid_requests(kwargs):
    with pytest.raises(InvalidRequestError):
        SamplingParams(**kwargs)


def test_a_single_stop_string_is_accepted():
    assert SamplingParams(stop="END").stop == ("END",)


def _stream(matcher: StopMatcher, chunks: list[str]) -> tuple[list[str], bool]:
    out = []
    for chunk in chunks:
        text, stopped = matcher.push(chunk)
        out.append(text)
        if stopped:
            return out, True
    tail, stopped = matcher.flush()
    out.append(tail)
    return out, stopped


def test_stop_string_split_across_chunks_never_leaks():
    out, stopped = _stream(StopMatcher(["</answer>"]), ["The end", "</an", "swer> tail"])
    assert stopped and "".join(out) == "The end"
    assert all("<" not in piece for piece in out)


def test_held_text_that_is_not_a_stop_comes_out():
    out, stopped = _stream(StopMatcher(["STOP"]), ["ST", "ill going ST", "ar"])
    assert not stopped and "".join(out) == "STill going STar"


def test_a_stop_that_starts_earlier_wins_even_when_a_shorter_one_completes_first():
    # Found by the property below: "b" completes in the first piece, but "abX", which
    # starts one character earlier, completes in the next.
    out, stopped = _stream(StopMatcher(["abX", "Yb", "b"]), ["cab", "Xb", "Yb"])
    assert stopped and "".join(out) == "c"
    out, stopped = _stream(StopMatcher(["abX", "b"]), ["cab"])  # "abX" never completes
    assert stopped and "".join(out) == "ca"


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="abcXY", max_size=40),
       stops=st.lists(st.text(alphabet="abcXY", min_size=1, max_size=4), max_size=3),
       cuts=st.lists(st.integers(0, 40), max_size=8))
def test_streamed_stop_matching_equals_matching_the_whole_text(text, stops, cuts):
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    chunks = [text[a:b] for a, b in itertools.pairwise(bounds)]
    out, stopped = _stream(StopMatcher(stops), chunks)
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    expected = text[:min(hits)] if hits else text
    assert "".join(out) == expected and stopped == bool(hits)
    # Nothing emitted before the stop was found may contain any part of the stop string.
    emitted = ""
    for piece in out:
        emitted += piece
        assert expected.startswith(emitted)
