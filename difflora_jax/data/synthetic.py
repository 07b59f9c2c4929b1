"""An offline, seeded instruction mix for SFT and held-out evaluation.

Five tasks, each item a chat example with its gold answer::

    {"messages": [{"role": "user", ...}, {"role": "assistant", "content": answer}],
     "answer": answer, "task": "kv_lookup"}

- ``context_retrieval``: a passage of filler sentences holding a few key-value facts whose keys
  share words (distractors); the question asks for one fact's value.
- ``kv_lookup``: a list of random ``key: value`` pairs; the question asks for one key's value.
- ``multidoc_qa``: one gold document among distractor documents that each share its person
  (other facts about them, other cities) or its relation (another person's job and city).
- ``copy``: repeat a random word sequence exactly.
- ``count``: count one word's occurrences in a list of words.

Items are short (about 60-250 SmolLM2 tokens with the template). ``make_mix(n, seed, split)``
draws item ``i`` from its own stream, seeded from ``(seed, split, i)``, so an item does not
depend on ``n``. Held-out by construction: a user prompt belongs to ``"eval"`` or ``"train"`` by a
hash of its text, and each split rejects prompts of the other, so the splits never share a prompt
whatever the seeds.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Sequence
from typing import Any

from difflora_jax.errors import ConfigError

SPLITS = ("train", "eval")

_COLORS = (
    "red", "blue", "green", "yellow", "purple", "orange", "silver", "golden", "black", "white",
    "brown", "gray",
)  # fmt: skip
_ANIMALS = (
    "fox", "owl", "whale", "tiger", "rabbit", "falcon", "otter", "wolf", "horse", "panda",
    "eagle", "lizard", "dolphin", "badger", "crane", "moose",
)  # fmt: skip
_OBJECTS = ("code", "number", "password", "room number", "ticket number", "locker number")
_FILLER = (
    "The morning was quiet and the streets were mostly empty.",
    "A light rain had started to fall over the hills.",
    "Several people waited patiently at the bus stop.",
    "The library closes early on public holidays.",
    "Fresh bread was sold at the market every Tuesday.",
    "The river ran slowly past the old stone bridge.",
    "Most of the shops along the square had green doors.",
    "A cat slept in the sun on a wooden bench.",
    "The train to the coast was delayed by ten minutes.",
    "Children played football in the park after school.",
    "The museum added a new room for old maps.",
    "Wind moved the tall grass along the road.",
    "The cafe on the corner served tea in blue cups.",
    "A small boat was tied to the end of the pier.",
    "The town hall clock struck noon.",
    "Someone had left an umbrella by the door.",
    "The mountain path was steep but well marked.",
    "Birds gathered on the roof of the old barn.",
    "The farmer checked the fences before sunset.",
    "The bakery smelled of cinnamon and butter.",
    "A group of students studied in the garden.",
    "The lights of the harbor reflected on the water.",
    "The bookshop had a sale on travel guides.",
    "An old radio played music in the kitchen.",
)
_FIRST = (
    "Maria", "John", "Aiko", "Pedro", "Fatima", "Lukas", "Chen", "Amara", "Olga", "Ravi",
    "Sofia", "Tom", "Nadia", "Kwame", "Elena", "Omar", "Ingrid", "Diego", "Mei", "Samuel",
)  # fmt: skip
_LAST = (
    "Garcia", "Smith", "Tanaka", "Silva", "Khan", "Weber", "Li", "Okafor", "Petrova", "Patel",
    "Rossi", "Brown", "Haddad", "Mensah", "Novak", "Farah", "Berg", "Lopez", "Wang", "Cohen",
)  # fmt: skip
_CITIES = (
    "Lisbon", "Oslo", "Cairo", "Lima", "Osaka", "Nairobi", "Dublin", "Quito", "Hanoi", "Vienna",
    "Perth", "Tunis", "Bergen", "Porto", "Kyoto", "Accra", "Zagreb", "Bogota", "Lyon", "Seoul",
)  # fmt: skip
_JOBS = (
    "baker", "nurse", "pilot", "teacher", "carpenter", "chemist", "librarian", "tailor",
    "architect", "gardener", "journalist", "plumber",
)  # fmt: skip
_WORDS = (
    "apple", "river", "stone", "cloud", "lamp", "garden", "pencil", "window", "coffee", "bridge",
    "mirror", "candle", "forest", "rocket", "violin", "basket", "planet", "ladder", "tunnel",
    "island", "marble", "feather", "button", "engine", "blanket", "compass", "lemon", "anchor",
)  # fmt: skip
_ALNUM = "abcdefghijkmnpqrstuvwxyz23456789"


def _key(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(_ALNUM) for _ in range(n))


def _context_retrieval(rng: random.Random) -> tuple[str, str]:
    n_facts = rng.randint(3, 4)
    obj = rng.choice(_OBJECTS)
    # Keys share a color or an animal with the asked one, so the whole key must be matched.
    color, animal = rng.choice(_COLORS), rng.choice(_ANIMALS)
    keys = {(color, animal)}
    while len(keys) < n_facts:
        keys.add(
            (color, rng.choice(_ANIMALS)) if rng.random() < 0.5 else (rng.choice(_COLORS), animal)
        )
    keys = sorted(keys)
    rng.shuffle(keys)
    values = rng.sample(range(1000, 10000), n_facts)
    facts = [f"The {obj} of the {c} {a} is {v}." for (c, a), v in zip(keys, values)]
    sentences: list[str] = rng.sample(_FILLER, rng.randint(6, 10))
    for fact in facts:
        sentences.insert(rng.randint(0, len(sentences)), fact)
    answer = str(values[keys.index((color, animal))])
    prompt = (
        "Read the passage and answer the question.\n\nPassage: "
        + " ".join(sentences)
        + f"\n\nQuestion: What is the {obj} of the {color} {animal}? Answer with the number only."
    )
    return prompt, answer


def _kv_lookup(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(5, 10)
    keys = set()
    while len(keys) < n:
        keys.add(_key(rng, 4))
    keys = sorted(keys)
    rng.shuffle(keys)
    values = [_key(rng, 6) for _ in keys]
    asked = rng.randrange(n)
    lines = "\n".join(f"{k}: {v}" for k, v in zip(keys, values))
    prompt = (
        f"Here is a list of key-value pairs:\n{lines}\n\n"
        f"What is the value for the key {keys[asked]}? Answer with the value only."
    )
    return prompt, values[asked]


def _multidoc_qa(rng: random.Random) -> tuple[str, str]:
    person, other = (f"{f} {last}" for f, last in zip(rng.sample(_FIRST, 2), rng.sample(_LAST, 2)))
    cities = rng.sample(_CITIES, 5)
    jobs = rng.sample(_JOBS, 2)
    gold = f"{person} works as a {jobs[0]} in {cities[0]}."
    distractors = [
        f"{person} was born in {cities[1]} and moved away as a child.",
        f"{person} spent a holiday in {cities[2]} last summer.",
        f"{other} works as a {jobs[1]} in {cities[3]}.",
        f"{other} met {person} at a conference in {cities[4]}.",
    ]
    documents = [gold, *rng.sample(distractors, rng.randint(2, 4))]
    rng.shuffle(documents)
    body = "\n".join(f"Document {i + 1}: {doc}" for i, doc in enumerate(documents))
    prompt = (
        f"{body}\n\nUsing the documents, answer: in which city does {person} work? "
        "Answer with the city only."
    )
    return prompt, cities[0]


def _copy(rng: random.Random) -> tuple[str, str]:
    text = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12)))
    return f"Copy the following text exactly, without changing anything:\n{text}", text


def _count(rng: random.Random) -> tuple[str, str]:
    vocabulary = rng.sample(_WORDS, rng.randint(3, 5))
    words = [rng.choice(vocabulary) for _ in range(rng.randint(6, 16))]
    target = rng.choice(vocabulary)
    prompt = (
        f"How many times does the word {target} appear in this list?\n"
        + ", ".join(words)
        + "\nAnswer with a number."
    )
    return prompt, str(words.count(target))


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "context_retrieval": _context_retrieval,
    "kv_lookup": _kv_lookup,
    "multidoc_qa": _multidoc_qa,
    "copy": _copy,
    "count": _count,
}


def prompt_split(prompt: str) -> str:
    """The split (``"train"`` or ``"eval"``) a user prompt belongs to, by a hash of its text."""
    return SPLITS[hashlib.sha256(prompt.encode("utf-8")).digest()[0] & 1]


def _rng(seed: int, split: str, index: int, attempt: int) -> random.Random:
    digest = hashlib.sha256(f"difflora-mix/{seed}/{split}/{index}/{attempt}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def make_item(task: str, seed: int, index: int, split: str = "train") -> dict[str, Any]:
    """Item ``index`` of ``task`` in ``split`` (deterministic in all arguments)."""
    if task not in TASKS:
        raise ConfigError(f"unknown synthetic task {task!r}; known: {sorted(TASKS)}")
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is invalid; allowed: {list(SPLITS)}")
    for attempt in range(1000):
        prompt, answer = TASKS[task](_rng(seed, split, index, attempt))
        if prompt_split(prompt) == split:
            return {
                "messages": [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": answer},
                ],
                "answer": answer,
                "task": task,
            }
    raise AssertionError("unreachable: half of all prompts belong to each split")


def make_mix(
    n: int, seed: int = 0, split: str = "train", tasks: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """``n`` items cycling through ``tasks`` (default: all five, in ``TASKS`` order).

    ``make_mix(n, seed, split)[:m] == make_mix(m, seed, split)``; train and eval items never
    share a user prompt.
    """
    if n < 0:
        raise ConfigError(f"n={n} is invalid: must be >= 0")
    tasks = list(TASKS) if tasks is None else list(tasks)
    if not tasks:
        raise ConfigError("tasks is empty")
    return [make_item(tasks[i % len(tasks)], seed, i, split) for i in range(n)]


def prompt_messages(item: dict[str, Any]) -> list[dict[str, str]]:
    """The item's messages up to (without) the final assistant answer, for generation."""
    messages = item["messages"]
    return messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages


def normalize_answer(text: str) -> str:
    """Lower case, surrounding whitespace and trailing punctuation removed, spaces collapsed."""
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(" .!?,;:\"'")


def exact_match(prediction: str, answer: str) -> bool:
    """Whether the prediction equals the gold answer after ``normalize_answer``."""
    return normalize_answer(prediction) == normalize_answer(answer)


def contains_answer(prediction: str, answer: str) -> bool:
    """Whether the normalized gold answer occurs in the normalized prediction."""
    return normalize_answer(answer) in normalize_answer(prediction)
