"""Generation scores on crafted outputs with known answers."""

from __future__ import annotations

import pytest

from difflora_jax.evaluation.metrics import (
    contains_all,
    distinct_n,
    exact_match,
    generation_health,
    longest_repeated_ngram,
)


def test_contains_all_scores_perfect_wrong_and_partial():
    assert contains_all("The number is 1234567.", ["1234567"]) == 1.0
    assert contains_all("I do not know.", ["1234567"]) == 0.0
    assert contains_all("1111111, 2222222 and 3333333", ["1111111", "2222222", "3333333", "4"]) == (
        0.75
    )
    assert contains_all("Anything", []) == 0.0
    assert contains_all("  PARIS  ", ["paris"]) == 1.0


def test_exact_match():
    assert exact_match(" Paris. ", ["paris"]) == 1.0
    assert exact_match("Paris is the capital", ["paris"]) == 0.0


def test_distinct_n_and_longest_repeat():
    assert distinct_n("a b c d", 2) == 1.0
    assert distinct_n("a b a b a b", 2) == pytest.approx(2 / 5)
    assert distinct_n("a", 2) == 1.0
    assert longest_repeated_ngram("a b c d") == 0
    assert longest_repeated_ngram("x a b c y a b c z") == 3
    assert longest_repeated_ngram("the the the the") == 3  # overlapping repeats count
    health = generation_health(["a b c", "a a a a"])
    assert health["longest_repeat_max"] == 3.0
    assert health["distinct_1"] == pytest.approx((1 + 0.25) / 2)
