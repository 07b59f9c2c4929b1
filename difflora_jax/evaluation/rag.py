"""RAG question answering: one gold document among distractors that share its entities.

Generated stand-in: the gold document says where a person works and as what; distractors say
other things about the same person (born in, visited, moved to: other cities), the same job in
another city for other people, and other people in the gold city, so no entity alone finds the
answer. Real data (BERGEN-style): ``load_rag_data`` reads (a JSONL file, HF or TFDS dataset) ``{"question", "documents" (strings or
{"title", "text"}), "answers"}``. Score: recall of the gold answers in the output.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from difflora_jax.errors import DataError
from difflora_jax.evaluation.rows import read_rows

_FIRST = ("Maria", "John", "Aiko", "Pedro", "Fatima", "Lukas", "Chen", "Amara", "Olga", "Ravi",
          "Sofia", "Tom", "Nadia", "Kwame", "Elena", "Omar", "Ingrid", "Diego")  # fmt: skip
_LAST = ("Garcia", "Smith", "Tanaka", "Silva", "Khan", "Weber", "Li", "Okafor", "Petrova",
         "Patel", "Rossi", "Brown", "Haddad", "Mensah", "Novak", "Farah", "Berg", "Lopez")  # fmt: skip
_CITIES = ("Lisbon", "Oslo", "Cairo", "Lima", "Osaka", "Nairobi", "Dublin", "Quito", "Hanoi",
           "Vienna", "Perth", "Tunis", "Bergen", "Porto", "Kyoto", "Accra", "Zagreb", "Bogota",
           "Lyon", "Seoul", "Madrid", "Riga", "Hobart", "Minsk")  # fmt: skip
_JOBS = ("baker", "nurse", "pilot", "teacher", "carpenter", "chemist", "librarian", "tailor",
         "architect", "gardener", "journalist", "plumber")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class RAGItem:
    distractors: int
    seed: int
    documents: tuple[str, ...]
    gold: int  # index of the gold document (-1: unknown, real data)
    question: str
    answers: tuple[str, ...]

    @property
    def prompt(self) -> str:
        body = "\n".join(f"Document [{i + 1}]: {d}" for i, d in enumerate(self.documents))
        return f"{body}\n\nAnswer the question using the documents.\nQuestion: {self.question}"

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.prompt}]


def make_rag(distractors: int, seed: int = 0) -> RAGItem:
    """An item with one gold document and ``distractors`` distractors sharing its entities."""
    rng = random.Random(f"rag:{distractors}:{seed}")
    people = [f"{f} {last}" for f, last in zip(rng.sample(_FIRST, 8), rng.sample(_LAST, 8))]
    person, others = people[0], people[1:]
    city, job = rng.choice(_CITIES), rng.choice(_JOBS)
    elsewhere = [c for c in _CITIES if c != city]
    gold = f"{person} works as a {job} in {city}."
    kinds = (  # each shares the person, the job or the city with the gold document
        lambda: f"{person} was born in {rng.choice(elsewhere)} and moved away as a child.",
        lambda: f"{person} spent a holiday in {rng.choice(elsewhere)} last summer.",
        lambda: f"{rng.choice(others)} works as a {job} in {rng.choice(elsewhere)}.",
        lambda: (
            f"{rng.choice(others)} lives in {city} and works as a "
            f"{rng.choice([j for j in _JOBS if j != job])}."
        ),
        lambda: f"{rng.choice(others)} met {person} at a conference in {rng.choice(elsewhere)}.",
    )
    chosen: list[str] = []
    while len(chosen) < distractors:
        doc = rng.choice(kinds)()
        if doc not in chosen:
            chosen.append(doc)
    documents = [gold, *chosen]
    rng.shuffle(documents)
    question = f"In which city does {person} work as a {job}? Answer with the city only."
    return RAGItem(distractors, seed, tuple(documents), documents.index(gold), question, (city,))


def load_rag_data(spec: str | Path) -> list[RAGItem]:
    """Rows ``{"question", "documents", "answers"}`` (a document is a string or ``{"title",
    "text"}``) from a JSONL file, ``hf:NAME[:SPLIT]`` or ``tfds:NAME[:SPLIT]``."""
    items = []
    for number, (where, row) in enumerate(read_rows(spec, "RAG"), 1):
        try:
            docs = [
                d if isinstance(d, str) else f"(Title: {d['title']}) {d['text']}"
                for d in row["documents"]
            ]
            answers = row["answers"]
            answers = [answers] if isinstance(answers, str) else list(answers)
            items.append(
                RAGItem(len(docs) - 1, number, tuple(docs), -1, row["question"], tuple(answers))
            )
        except (KeyError, TypeError) as e:
            raise DataError(f"{where}: not a {{question, documents, answers}} row: {e}") from e
    return items
