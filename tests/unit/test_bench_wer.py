from agent.bench.wer import normalised_words, word_errors


def test_identical_after_normalising():
    assert word_errors("Please book a table for two at seven tonight.",
                       "please book a table for 2 at 7 tonight") == (0, 9)


def test_substitution_deletion_insertion():
    assert word_errors("what is the capital of france", "what is the capital of friends") == (1, 6)
    assert word_errors("we desire increase", "we desire") == (1, 3)
    assert word_errors("turn off the lights", "turn off all the lights") == (1, 4)


def test_empty_sides():
    assert word_errors("", "") == (0, 0)
    assert word_errors("two words", "") == (2, 2)
    assert word_errors("", "noise") == (1, 0)


def test_apostrophes_and_case():
    assert normalised_words("I’d like It") == ["i'd", "like", "it"]
