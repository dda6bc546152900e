"""Answer accuracy: SQuAD-style normalisation, exact match and token F1 against hand-computed
values."""

from __future__ import annotations

import pytest

from dllm_plugin.evaluation.accuracy import (
    exact_match,
    normalize_answer,
    score_answers,
    token_f1,
)


def test_normalisation_drops_case_punctuation_articles_and_extra_spaces():
    assert normalize_answer("  The  capital of Spain is MADRID. ") == "capital of spain is madrid"
    assert normalize_answer("An apple, a pear!") == "apple pear"
    assert normalize_answer("theory") == "theory"  # articles only as whole words


def test_exact_match_and_f1():
    assert exact_match("Paris.", "paris") == 1.0
    assert exact_match("Paris is it", "Paris") == 0.0
    # prediction "capital is paris" vs reference "paris": 1 common word
    assert token_f1("the capital is Paris", "Paris") == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    # repeated words count as a multiset: "blue blue" vs "blue sky": common 1
    assert token_f1("blue blue", "blue sky") == pytest.approx(0.5)
    assert token_f1("", "") == 1.0 and token_f1("", "x") == 0.0 and token_f1("x y", "z") == 0.0


def test_score_answers_averages():
    result = score_answers(["Paris.", "Rome is it", "nothing"], ["paris", "Rome", "Berlin"])
    assert result.exact_match == pytest.approx(1 / 3)
    assert result.token_f1 == pytest.approx((1 + 2 * (1 / 3) / (1 / 3 + 1) + 0) / 3)
    assert result.n == 3 and result.metrics() == {
        "exact_match": result.exact_match,
        "token_f1": result.token_f1,
    }
    with pytest.raises(ValueError):
        score_answers(["a"], [])
