"""The clause splitter: where streamed text is cut for synthesis."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.speech.clauses import (
    DEFAULT_POLICY,
    ClausePolicy,
    ClauseSplitter,
    count_words,
    split_clauses,
)


def clauses(text: str) -> list[str]:
    return [c.strip() for c in split_clauses(text)]


def test_sentences_are_cut_at_their_ends():
    text = "Hello there. How are you today? I am doing well, thank you!"
    assert clauses(text) == ["Hello there.", "How are you today?", "I am doing well, thank you!"]


def test_abbreviations_numbers_and_initials_do_not_end_sentences():
    text = (
        "Dr. Smith met Mr. Jones in the U.S. last May. "
        "Pi is roughly 3.14 and e.g. is short for exempli gratia. "
        "J. R. R. Tolkien wrote it at 10 a.m. on a Monday."
    )
    assert clauses(text) == [
        "Dr. Smith met Mr. Jones in the U.S. last May.",
        "Pi is roughly 3.14 and e.g. is short for exempli gratia.",
        "J. R. R. Tolkien wrote it at 10 a.m. on a Monday.",
    ]


def test_first_clause_cuts_early_at_a_comma_later_ones_need_more_words():
    text = (
        "Well, let me think about that, because it matters. "
        "After the rain, we walked home, and then we cooked a long dinner together, "
        "which took hours."
    )
    assert clauses(text) == [
        "Well, let me think about that,",
        "because it matters.",
        "After the rain, we walked home, and then we cooked a long dinner together,",
        "which took hours.",
    ]


def test_semicolons_colons_and_dashes_are_soft_breaks():
    text = "Here is what we need to buy: milk and eggs; then some bread — if they have any left."
    assert clauses(text) == [
        "Here is what we need to buy:",
        "milk and eggs; then some bread — if they have any left.",
    ]


def test_tiny_sentences_join_the_next_one():
    assert clauses("Yes. I think that is right. Okay. Thanks. See you tomorrow then.") == [
        "Yes. I think that is right.",
        "Okay. Thanks. See you tomorrow then.",
    ]


def test_a_tiny_text_is_still_spoken():
    assert clauses("Hi.") == ["Hi."]
    assert clauses("") == []


def test_list_lines_are_clauses_and_their_numbers_are_not_sentence_ends():
    text = "Sure, here are the steps:\n1. Preheat the oven\n2. Mix the batter well\n3. Bake it"
    assert clauses(text) == [
        "Sure, here are the steps:",
        "1. Preheat the oven",
        "2. Mix the batter well",
        "3. Bake it",
    ]


def test_quotes_and_brackets_stay_with_their_sentence():
    text = 'He said "it is done." Then he left (without a word.) Nobody followed him.'
    assert clauses(text) == [
        'He said "it is done."',
        "Then he left (without a word.)",
        "Nobody followed him.",
    ]


def test_a_run_on_without_punctuation_is_cut_at_a_word_boundary():
    words = [f"word{i}" for i in range(100)]
    parts = clauses(" ".join(words))
    assert [len(p.split()) for p in parts] == [40, 40, 20]
    assert " ".join(parts) == " ".join(words)


def test_punctuation_at_the_end_of_a_delta_waits_for_the_next_character():
    splitter = ClauseSplitter()
    assert splitter.feed("The value is 3.") == []        # could be 3.5
    assert splitter.feed("5 today. Next") == ["The value is 3.5 today. "]
    assert splitter.flush() == "Next"
    assert splitter.flush() is None


def test_clauses_come_out_as_soon_as_their_text_is_in():
    splitter = ClauseSplitter()
    out = []
    for delta in ["Sure", " thing", ".", " Let", " me", " check", " that", " for", " you", "."]:
        out.append(splitter.feed(delta))
    assert out[3] == ["Sure thing. "]      # cut when the space after "." arrives
    assert [c for cut in out for c in cut] == ["Sure thing. "]
    assert splitter.flush() == "Let me check that for you."


def test_policy_is_configurable():
    eager = ClausePolicy(first_soft_words=1, soft_words=1, sentence_words=1)
    assert [c.strip() for c in split_clauses("One, two, three. Four.", eager)] == [
        "One,", "two,", "three.", "Four.",
    ]


def test_count_words_ignores_bare_punctuation():
    assert count_words("Hello — there ... 42 !") == 3


_TOKENS = st.sampled_from([
    "hello", "world", "Dr.", "U.S.", "3.5", "e.g.", "yes", "a", "I", "1.", "ok,", "well;",
    "end.", "why?", "wow!", "so:", "—", "...", '"quoted."', "(aside)", "\n", "\n\n", "x" * 12,
])


@st.composite
def texts_and_splits(draw):
    tokens = draw(st.lists(_TOKENS, max_size=80))
    seps = draw(st.lists(st.sampled_from([" ", "  ", "", "\n"]), min_size=len(tokens),
                         max_size=len(tokens)))
    text = "".join(t + s for t, s in zip(tokens, seps, strict=True))
    cuts = sorted(draw(st.sets(st.integers(0, max(len(text), 0)), max_size=20)))
    bounds = [0, *cuts, len(text)]
    deltas = [text[a:b] for a, b in itertools.pairwise(bounds)]
    return text, deltas


@settings(max_examples=300, deadline=None)
@given(texts_and_splits())
def test_any_delta_split_gives_the_same_clauses_and_loses_nothing(case):
    text, deltas = case
    streamed = list(split_clauses(deltas))
    assert "".join(streamed) == text
    whole = [c.strip() for c in split_clauses(text) if c.strip()]
    assert [c.strip() for c in streamed if c.strip()] == whole
    # Only the last clause may fall short of the minimum: tiny ones wait for the next.
    policy = DEFAULT_POLICY
    for index, clause in enumerate(streamed[:-1]):
        minimum = policy.first_sentence_words if index == 0 else policy.sentence_words
        assert count_words(clause) >= minimum
