"""Scores of generated text: answer matching, and the health of a generation (repetition).

- ``contains_all(prediction, references)``: the fraction of references that occur in the
  prediction (case-insensitive, whitespace-normalised): RULER's ``string_match_all``. A
  needle-in-a-haystack answer with one value scores 0 or 1; multi-value gives partial credit.
- ``exact_match``: the normalised prediction equals a normalised reference.
- ``distinct_n``: unique n-grams over all n-grams of the whitespace tokens (1 when no n-gram
  repeats; low for degenerate, looping text); 1.0 for text shorter than n.
- ``longest_repeated_ngram``: the largest n such that some n-gram of whitespace tokens occurs
  at least twice (0 when no token repeats).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence


def normalize(text: str) -> str:
    """Lower case, whitespace collapsed, surrounding punctuation and space stripped."""
    return re.sub(r"\s+", " ", text.lower()).strip(" \t\n.,;:!?\"'")


def contains_all(prediction: str, references: Sequence[str]) -> float:
    """Fraction of ``references`` found in ``prediction`` (0.0 when there are none)."""
    if not references:
        return 0.0
    text = normalize(prediction)
    return sum(normalize(r) in text for r in references) / len(references)


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals one normalised reference, else 0.0."""
    text = normalize(prediction)
    return float(any(text == normalize(r) for r in references))


def _ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(text: str, n: int = 2) -> float:
    """Unique n-grams / n-grams of the whitespace tokens of ``text``."""
    grams = _ngrams(text.split(), n)
    return 1.0 if not grams else len(set(grams)) / len(grams)


def longest_repeated_ngram(text: str) -> int:
    """The length of the longest n-gram (whitespace tokens) that occurs at least twice."""
    tokens = text.split()
    lo, hi = 0, max(len(tokens) - 1, 0)
    while lo < hi:  # repeats are monotone in n: a repeated n-gram has a repeated (n-1)-gram
        mid = (lo + hi + 1) // 2
        grams = _ngrams(tokens, mid)
        if len(set(grams)) < len(grams):
            lo = mid
        else:
            hi = mid - 1
    return lo


def generation_health(texts: Iterable[str]) -> dict[str, float]:
    """Mean distinct-1/2/3 and mean and max longest repeated n-gram over ``texts``."""
    texts = list(texts)
    if not texts:
        return {}
    repeats = [longest_repeated_ngram(t) for t in texts]
    out = {f"distinct_{n}": sum(distinct_n(t, n) for t in texts) / len(texts) for n in (1, 2, 3)}
    out["longest_repeat_mean"] = sum(repeats) / len(repeats)
    out["longest_repeat_max"] = float(max(repeats))
    return out
