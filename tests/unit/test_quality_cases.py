"""How `parley bench quality` marks a reply: the rule its accuracy numbers stand on."""

from __future__ import annotations

from collections import Counter

from agent.bench.quality_cases import GENERAL_SYSTEM, QUESTIONS, SHOP_SYSTEM, Question, correct


def _q(*accept: str, refuse: tuple[str, ...] = ()) -> Question:
    return Question("general", "?", accept, refuse)


def test_the_set_is_big_enough_and_covers_every_group():
    groups = Counter(q.group for q in QUESTIONS)
    assert len(QUESTIONS) >= 60
    assert set(groups) == {"general", "arithmetic", "support"}
    assert min(groups.values()) >= 12
    assert len({q.text for q in QUESTIONS}) == len(QUESTIONS)  # no question asked twice


def test_support_questions_are_answered_from_the_shop_prompt():
    for q in QUESTIONS:
        assert q.system == (SHOP_SYSTEM if q.group == "support" else GENERAL_SYSTEM)
        assert q.accept, q.text


def test_an_accepted_answer_counts_as_a_whole_word_whatever_its_case_or_punctuation():
    paris = _q("paris")
    assert correct(paris, "The capital of France is Paris.")
    assert correct(paris, "PARIS!")
    assert not correct(paris, "It is Parisian in style.")
    assert not correct(_q("no"), "Nothing is known.")


def test_a_number_may_run_into_its_unit_but_not_into_more_digits():
    nine = _q("9")
    assert correct(nine, "We open at 9am.")
    assert correct(nine, "It is 9.")
    assert not correct(nine, "There are 19 of them.")
    assert not correct(nine, "It costs 90 pounds.")


def test_a_reply_naming_a_refused_candidate_is_wrong():
    q = _q("paris", refuse=("lyon",))
    assert correct(q, "Paris.")
    assert not correct(q, "Paris or Lyon.")


def test_an_empty_reply_is_wrong_for_every_question():
    assert not any(correct(q, "") for q in QUESTIONS)
