"""Many-shot in-context learning (HELMET style): classification whose label words are
replaced by arbitrary ids, so only the demonstrations can teach the mapping; accuracy against
the number of demonstrations.

Generated stand-in: inputs mention a word of one hidden category (animal, color, city, job,
food, instrument); the label is that category's id, a random 2-digit number drawn per item.
The prompt is plain text (no chat template): ``shots`` demonstrations ``Input: ...\\nLabel:
ID``, balanced over the labels in a shuffled order, then the query ``Input: ...\\nLabel:``.
Real data (TREC, Banking77, Clinic150 exported as JSONL ``{"text", "label"}``):
``load_icl_data`` (a JSONL file, HF or TFDS dataset) plus ``make_icl_from_rows`` (labels are mapped to ids the same way).
Score: the first word of the output equals the gold id.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from pathlib import Path

from difflora_jax.errors import DataError
from difflora_jax.evaluation.rows import read_rows

CATEGORIES = {
    "animal": ("fox", "owl", "whale", "tiger", "rabbit", "falcon", "otter", "wolf", "horse"),
    "color": ("red", "blue", "green", "yellow", "purple", "orange", "silver", "brown", "gray"),
    "city": ("Lisbon", "Oslo", "Cairo", "Lima", "Osaka", "Nairobi", "Dublin", "Quito", "Hanoi"),
    "job": ("baker", "nurse", "pilot", "teacher", "carpenter", "chemist", "tailor", "plumber"),
    "food": ("bread", "rice", "cheese", "soup", "noodles", "apples", "honey", "pasta", "beans"),
    "instrument": ("violin", "piano", "flute", "drum", "guitar", "trumpet", "harp", "cello"),
}
_TEMPLATES = (
    "The report mentioned {w} twice.",
    "Everyone talked about {w} at dinner.",
    "She wrote a short note about {w}.",
    "The lesson today was about {w}.",
    "He could not stop thinking of {w}.",
    "Nobody expected {w} to come up.",
)
INSTRUCTION = "Classify each input. Answer with the label only.\n\n"


@dataclasses.dataclass(frozen=True)
class ICLItem:
    shots: int
    seed: int
    prompt: str
    answer: str
    labels: dict[str, str]  # category (or dataset label) -> id


def _format(text: str, label: str | None) -> str:
    return f"Input: {text}\nLabel:" + (f" {label}" if label is not None else "")


def make_icl_from_rows(
    rows: Sequence[tuple[str, str]], query: tuple[str, str], shots: int, seed: int
) -> ICLItem:
    """An item from ``(text, label)`` rows: labels become random 2-digit ids; ``shots``
    demonstrations balanced over the labels (cycling through them), shuffled."""
    rng = random.Random(f"icl-rows:{shots}:{seed}")
    names = sorted({label for _, label in rows} | {query[1]})
    ids = rng.sample(range(10, 100), len(names))
    labels = {name: str(i) for name, i in zip(names, ids)}
    by_label: dict[str, list[str]] = {n: [t for t, lab in rows if lab == n] for n in names}
    order = [n for n in names if by_label[n]]
    demos = []
    for i in range(shots):
        label = order[i % len(order)]
        demos.append((rng.choice(by_label[label]), label))
    rng.shuffle(demos)
    body = "\n\n".join(_format(text, labels[label]) for text, label in demos)
    prompt = INSTRUCTION + body + "\n\n" + _format(query[0], None)
    return ICLItem(shots, seed, prompt, labels[query[1]], labels)


def make_icl(shots: int, seed: int = 0, num_labels: int = 6) -> ICLItem:
    """A generated item with ``shots`` demonstrations over ``num_labels`` hidden categories."""
    rng = random.Random(f"icl:{shots}:{seed}")
    categories = rng.sample(sorted(CATEGORIES), num_labels)

    def example(category: str) -> tuple[str, str]:
        return rng.choice(_TEMPLATES).format(w=rng.choice(CATEGORIES[category])), category

    rows = [example(categories[i % num_labels]) for i in range(max(shots, num_labels) * 2)]
    query = example(rng.choice(categories))
    return make_icl_from_rows(rows, query, shots, seed)


def icl_score(output: str, answer: str) -> float:
    """1.0 when the first word of ``output`` is the gold id."""
    words = output.strip().split()
    return float(bool(words) and words[0].strip(".,;:") == answer)


def load_icl_data(spec: str | Path) -> list[tuple[str, str]]:
    """``(text, label)`` rows with ``text`` and ``label`` fields, from a JSONL file,
    ``hf:NAME[:SPLIT]`` or ``tfds:NAME[:SPLIT]`` (``evaluation.rows``)."""
    rows = []
    for where, row in read_rows(spec, "in-context learning"):
        try:
            rows.append((str(row["text"]), str(row["label"])))
        except KeyError as e:
            raise DataError(f"{where}: not a {{text, label}} row: missing {e}") from e
    return rows
