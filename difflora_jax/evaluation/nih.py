"""Needle-in-a-haystack (RULER style): single-key, multi-key (2 or 3 needles with different
keys, one asked for) and multi-value (one key, four values, all asked for).

An item is a filler haystack with needles "One of the special magic numbers for {key} is:
{value}." inserted between sentences at known depths, a question at the end, and the gold
values. ``make_nih(task, length, tokenizer, seed)`` sizes the haystack so that the prompt, with
the tokenizer's chat template, is about ``length`` tokens (never more); every needle's
character span in the context is recorded (``needles``) and checked. Items are seeded by
``(task, length, seed)``. Real data: ``load_nih_data`` reads RULER-style rows (a JSONL file, HF or TFDS dataset)
``{"input" or "context" + "question", "outputs" or "answers"}``.

Score: the fraction of gold values that occur in the output (RULER's ``string_match_all``).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from pathlib import Path

from difflora_jax.errors import ConfigError, DataError
from difflora_jax.evaluation.rows import read_rows
from difflora_jax.protocols import Tokenizer

TASKS = {"nih-single": 1, "nih-mk2": 2, "nih-mk3": 3, "nih-mv": 1}
MV_VALUES = 4
_SUBJECTS = (
    "The river", "An old map", "The library", "A quiet street", "The harbor", "A small garden",
    "The museum", "An orchard", "The mountain trail", "A wooden bridge", "The market",
    "A lighthouse", "The valley", "An iron gate", "The station",
)  # fmt: skip
_PREDICATES = (
    "was busy in the morning", "looked different after the rain", "had been repaired twice",
    "stood near the old mill", "was painted in bright colors", "opened late on Sundays",
    "was known to every traveler", "smelled of fresh bread", "was quiet at night",
    "had a long history", "was built of grey stone", "appeared in many stories",
    "was visited by students", "changed little over the years", "was crowded in summer",
)  # fmt: skip
_KEY_WORDS = (
    "amber", "cobalt", "crimson", "dusty", "electric", "frosty", "gentle", "hollow", "ivory",
    "jagged", "lunar", "misty", "noble", "olive", "polar", "quiet", "rusty", "silent", "tidal",
    "velvet", "wild", "young", "zesty", "brisk",
)  # fmt: skip
_KEY_NOUNS = (
    "anchor", "badger", "canyon", "dragon", "ember", "falcon", "glacier", "harbor", "island",
    "jungle", "kettle", "lantern", "meadow", "nebula", "oasis", "pepper", "quartz", "raven",
    "summit", "tunnel", "umbrella", "violin", "walnut", "zephyr",
)  # fmt: skip
INTRO = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize "
    "them. I will quiz you about the numbers afterwards."
)


@dataclasses.dataclass(frozen=True)
class Needle:
    key: str
    value: str
    text: str
    start: int  # character span of ``text`` in the item's context
    end: int
    depth: float  # where it sits in the haystack: 0 = start, 1 = end (by sentence)


@dataclasses.dataclass(frozen=True)
class NIHItem:
    task: str
    length: int  # the target prompt length in tokens
    seed: int
    context: str
    question: str
    answers: tuple[str, ...]
    needles: tuple[Needle, ...]

    @property
    def prompt(self) -> str:
        return f"{INTRO}\n\n{self.context}\n\n{self.question}"

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.prompt}]


def _needle_text(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def _question(task: str, key: str) -> str:
    if task == "nih-mv":
        return (
            f"What are all the special magic numbers for {key} mentioned in the provided text? "
            "Answer with the numbers only."
        )
    return (
        f"What is the special magic number for {key} mentioned in the provided text? "
        "Answer with the number only."
    )


def _prompt_tokens(tokenizer: Tokenizer, text: str) -> int:
    messages = [{"role": "user", "content": text}]
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        return len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    return len(tokenizer(text)["input_ids"])


def _haystack(
    filler: Sequence[str], pairs: Sequence[tuple[str, str]], depths: Sequence[float]
) -> tuple[str, list[Needle]]:
    """The filler sentences with needle ``i`` (``pairs[i]``) before sentence
    ``round(depths[i] * len(filler))``; the needles' spans in the returned context."""
    pending = sorted(zip((round(d * len(filler)) for d in depths), pairs, depths))
    parts: list[str] = []
    needles: list[Needle] = []
    offset = 0
    for i in range(len(filler) + 1):
        while pending and pending[0][0] == i:
            _, (key, value), depth = pending.pop(0)
            text = _needle_text(key, value)
            needles.append(Needle(key, value, text, offset, offset + len(text), depth))
            parts.append(text)
            offset += len(text) + 1
        if i < len(filler):
            parts.append(filler[i])
            offset += len(filler[i]) + 1
    return " ".join(parts), needles


def make_nih(task: str, length: int, tokenizer: Tokenizer, seed: int = 0) -> NIHItem:
    """One item of ``task`` whose chat prompt is at most ``length`` tokens (and close to it)."""
    if task not in TASKS:
        raise ConfigError(f"unknown needle task {task!r}; known: {sorted(TASKS)}")
    rng = random.Random(f"{task}:{length}:{seed}")
    n_keys = TASKS[task]
    keys: list[str] = []
    while len(keys) < n_keys:
        key = f"{rng.choice(_KEY_WORDS)}-{rng.choice(_KEY_NOUNS)}"
        if key not in keys:
            keys.append(key)
    asked = rng.choice(keys)
    values_per_key = MV_VALUES if task == "nih-mv" else 1
    pairs = [
        (k, str(rng.randrange(1_000_000, 10_000_000))) for k in keys for _ in range(values_per_key)
    ]
    rng.shuffle(pairs)
    depths = sorted(rng.uniform(0.05, 0.95) for _ in pairs)
    question = _question(task, asked)
    answers = tuple(v for k, v in pairs if k == asked)

    filler = [f"{rng.choice(_SUBJECTS)} {rng.choice(_PREDICATES)}." for _ in range(4 * length)]

    def build(n: int) -> tuple[str, list[Needle]]:
        return _haystack(filler[:n], pairs, depths)

    def tokens(n: int) -> int:
        context, _ = build(n)
        return _prompt_tokens(tokenizer, f"{INTRO}\n\n{context}\n\n{question}")

    lo, hi = 0, len(filler)
    if tokens(0) > length:
        raise ConfigError(f"{task}: {length} tokens cannot hold the question and the needles")
    while lo < hi:  # the most filler sentences that keep the prompt within ``length`` tokens
        mid = (lo + hi + 1) // 2
        if tokens(mid) <= length:
            lo = mid
        else:
            hi = mid - 1
    context, needles = build(lo)
    for needle in needles:  # the spans say where the needles are
        assert context[needle.start : needle.end] == needle.text
    return NIHItem(task, length, seed, context, question, answers, tuple(needles))


def make_nih_set(
    task: str, lengths: Sequence[int], tokenizer: Tokenizer, n: int = 20, seed: int = 0
) -> list[NIHItem]:
    """``n`` items per length (seeds ``seed .. seed + n - 1``)."""
    return [make_nih(task, length, tokenizer, seed + i) for length in lengths for i in range(n)]


def load_nih_data(spec: str | Path, task: str = "nih-data") -> list[NIHItem]:
    """RULER-style rows: ``{"input": prompt}`` or ``{"context", "question"}``, with gold values
    in ``"outputs"`` or ``"answers"`` and an optional ``"length"``; from a JSONL file,
    ``hf:NAME[:SPLIT]`` or ``tfds:NAME[:SPLIT]``."""
    items = []
    for number, (where, row) in enumerate(read_rows(spec, "needle-in-a-haystack"), 1):
        try:
            answers = row.get("outputs", row.get("answers"))
            if isinstance(answers, str):
                answers = [answers]
            if "input" in row:
                context, question = row["input"], ""
            else:
                context, question = row["context"], row["question"]
            if not answers or not all(isinstance(a, str) for a in answers):
                raise KeyError("outputs")
        except (KeyError, TypeError) as e:
            raise DataError(
                f"{where}: not a needle row with input (or context + question) and "
                f"outputs/answers: {e}"
            ) from e
        items.append(
            NIHItem(task, int(row.get("length", 0)), number, context, question, tuple(answers), ())
        )
    return items
