"""Training the variants of a preset once and running evaluation jobs on them, with every result
kept on disk so that artifacts share checkpoints and scores, and an interrupted reproduction
continues where it stopped.

Layout of the output directory::

    preset.json                      the preset as run (a later run must use the same training)
    runs/<variant>/                  a `difflora train` run directory per variant (resumed)
    evals/base/<job>.json            scores of the base model
    evals/<variant>/init/<job>.json  scores with fresh adapters (the method's initialisation)
    evals/<variant>/step-<N>/<job>.json   scores after N training steps

A job is an evaluation with its parameters (``Job``); its file name carries a hash of them, so a
changed evaluation size is a new job and never a stale result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import json
import os
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flax import nnx

from difflora_jax.catalog import load_method
from difflora_jax.config import to_dict
from difflora_jax.data import make_mix
from difflora_jax.data.synthetic import prompt_messages
from difflora_jax.errors import ConfigError
from difflora_jax.evaluation import heldout_accuracy, heldout_loss, suite
from difflora_jax.modeling.llama import LlamaForCausalLM
from difflora_jax.parallel import make_mesh, make_rules
from difflora_jax.protocols import Tokenizer
from difflora_jax.reproduce.presets import Preset
from difflora_jax.training import read_metrics, train
from difflora_jax.weights.loading import attach_adapter, load_model

BASE = "base"
PRESET_FILE = "preset.json"
DRY_RUN_MODEL = "dry-run-model"  # the tiny random model of a dry run, written before the preset
LOCAL_TASK = "difflora_mix_mc"  # the lm-eval task written from the held-out instruction mix


@dataclasses.dataclass(frozen=True)
class Job:
    """One evaluation: ``name`` (``heldout``, ``humaneval``, ``lm-eval``, an ``evaluation.suite``
    task) with ``params``; ``init``: scored with fresh adapters instead of trained ones."""

    name: str
    params: tuple[tuple[str, Any], ...] = ()
    init: bool = False

    @property
    def key(self) -> str:
        text = json.dumps([self.name, list(self.params)], sort_keys=True)
        return f"{self.name}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"

    @property
    def slot(self) -> str:
        """The job's entry in ``Reproduction.results``: its ``key`` (also its cache file name,
        under the stage directory), marked ``@init`` for a score with fresh adapters, so a
        job scored both before and after training keeps both."""
        return self.key + ("@init" if self.init else "")

    def arg(self, name: str) -> Any:
        return dict(self.params)[name]


def job(name: str, init: bool = False, **params: Any) -> Job:
    return Job(name, tuple(sorted((k, _plain(v)) for k, v in params.items())), init)


def _plain(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value  # hashable


def slug(variant: str) -> str:
    """A directory name for a variant (a method name, or a methods YAML path's stem)."""
    return Path(variant).stem if variant.endswith((".yaml", ".yml")) else variant


class Reproduction:
    """The variants of ``preset`` trained (or resumed) in ``out``, and the job results."""

    def __init__(
        self,
        preset: Preset,
        out: str | os.PathLike,
        *,
        progress: bool = True,
        echo: Callable[[str], None] = print,
    ):
        self.preset = preset
        self.out = Path(out)
        self.progress = progress
        self.echo = echo
        config = preset.train_config(preset.variants[0], self.out)
        self.mesh = make_mesh(config.mesh)
        self.rules = make_rules(config.sharding_rules)
        self._base: tuple[LlamaForCausalLM, Tokenizer] | None = None
        self._check_out()

    # -- directory --------------------------------------------------------------------------
    def _check_out(self) -> None:
        """A new directory gets ``preset.json``; an existing one must hold the same training
        (model, data, steps, variants' methods). Evaluation sizes may differ."""
        record = to_dict(self.preset)
        path = self.out / PRESET_FILE
        entries = (
            [p for p in self.out.iterdir() if p.name != DRY_RUN_MODEL] if self.out.is_dir() else []
        )
        if entries and not path.is_file():
            raise ConfigError(
                f"--out {self.out} is not empty and holds no {PRESET_FILE}: not a reproduction "
                "directory; choose another"
            )
        if path.is_file():
            try:
                old = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path} is corrupt ({e}); choose another --out") from e
            differ = [k for k in ("train",) if old.get(k) != record.get(k)]
            if differ:
                raise ConfigError(
                    f"{self.out} was made with a different training setup ({PRESET_FILE}: "
                    f"train = {old.get('train')}; now {record.get('train')}); its checkpoints "
                    "cannot be reused: choose another --out"
                )
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(path)

    def run_dir(self, variant: str) -> Path:
        return self.out / "runs" / slug(variant)

    def _cache_path(self, model: str, stage: str, item: Job) -> Path:
        base = self.out / "evals" / slug(model)
        return (base if model == BASE else base / stage) / f"{item.key}.json"

    def _stage(self, model: str, item: Job) -> str:
        if model == BASE:
            return ""
        return "init" if item.init else f"step-{self.preset.train['max_steps']}"

    # -- models -----------------------------------------------------------------------------
    def base(self) -> tuple[LlamaForCausalLM, Tokenizer]:
        if self._base is None:
            config = self.preset.train_config(self.preset.variants[0], self.out)
            self.echo(f"loading {config.model} ({config.dtype})")
            model, tokenizer = load_model(
                config.model,
                dtype=config.dtype,
                attention_backend=config.attention_backend,
                mesh=self.mesh,
                rules=self.rules,
            )
            if tokenizer is None:
                raise ConfigError(f"{config.model} has no tokenizer; the evaluations need one")
            self._base = (model, tokenizer)
        return self._base

    def train_variant(self, variant: str) -> LlamaForCausalLM:
        """The variant trained to the preset's steps: trained now, resumed, or (when finished
        before) restored from its last checkpoint without a step."""
        base, tokenizer = self.base()
        config = self.preset.train_config(variant, self.run_dir(variant))
        self.echo(f"== {variant}: {config.max_steps} steps in {self.run_dir(variant)}")
        result = train(
            config, resume=True, model=nnx.clone(base), tokenizer=tokenizer, progress=self.progress
        )
        if result.resumed_from == config.max_steps:
            self.echo(f"   restored from its step-{result.step} checkpoint (no training)")
        return result.model

    def fresh_variant(self, variant: str) -> LlamaForCausalLM:
        """The base model with the variant's adapters as initialised (before any step)."""
        return attach_adapter(nnx.clone(self.base()[0]), load_method(variant))

    def training_curve(self, variant: str) -> list[dict[str, Any]]:
        return read_metrics(self.run_dir(variant))

    # -- jobs -------------------------------------------------------------------------------
    def results(self, jobs: Sequence[Job]) -> dict[str, dict[str, Any]]:
        """``{model: {job slot: result}}`` for the base model and every variant, running only
        the jobs not on disk (and training a variant only when one of its jobs needs it)."""
        self.preflight(jobs)
        found: dict[str, dict[str, Any]] = {}
        for model_name in (BASE, *self.preset.variants):
            wanted = [j for j in jobs if not (model_name == BASE and j.init)]
            found[model_name] = {}
            missing = []
            for item in wanted:
                path = self._cache_path(model_name, self._stage(model_name, item), item)
                if path.is_file():
                    found[model_name][item.slot] = json.loads(path.read_text())
                else:
                    missing.append(item)
            for init in (True, False):
                todo = [j for j in missing if j.init == init]
                if not todo:
                    continue
                if model_name == BASE:
                    model = self.base()[0]
                elif init:
                    model = self.fresh_variant(model_name)
                else:
                    model = self.train_variant(model_name)
                for item in todo:
                    found[model_name][item.slot] = self._run_job(model_name, model, item)
                del model
        return found

    def _run_job(self, model_name: str, model: LlamaForCausalLM, item: Job) -> dict[str, Any]:
        stage = self._stage(model_name, item)
        self.echo(f"   {model_name}{' (' + stage + ')' if stage else ''}: {item.name}")
        start = time.time()
        result = self._evaluate(model, item)
        result["seconds"] = time.time() - start
        path = self._cache_path(model_name, stage, item)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"job": item.name, "params": dict(item.params), **result}))
        tmp.replace(path)  # a killed run leaves no half-written result
        return json.loads(path.read_text())

    def preflight(self, jobs: Sequence[Job]) -> None:
        """Fail before any training when a job cannot run here."""
        if any(j.name == "lm-eval" for j in jobs) and importlib.util.find_spec("lm_eval") is None:
            raise ConfigError(
                "this preset runs lm-evaluation-harness tasks, but lm-eval is not installed: "
                "pip install 'lm-eval==0.4.13' (or set eval.lm_eval_tasks=[] and "
                "eval.lm_eval_local=false)"
            )

    def _evaluate(self, model: LlamaForCausalLM, item: Job) -> dict[str, Any]:
        tokenizer = self.base()[1]
        plan = self.preset.eval
        if item.name == "heldout":
            items = make_mix(item.arg("items"), seed=0, split="eval")
            return {
                "loss": heldout_loss(model, tokenizer, items, max_length=item.arg("max_length")),
                "accuracy": heldout_accuracy(model, tokenizer, items),
            }
        if item.name == "lm-eval":
            return self._lm_eval(model, item)
        p = dict(item.params)
        records = suite.run_task(
            item.name,
            model,
            tokenizer,
            lengths=p.get("lengths", (1024,)),
            shots=p.get("shots", (4,)),
            distractors=p.get("distractors", (4,)),
            num=p["num"],
            data=p.get("data"),
            batch_size=plan.batch_size,
            max_new_tokens=p.get("max_new_tokens"),
            progress=self.progress,
        )
        return {
            "summary": suite.summarize(records),
            "attention": suite.summarize_attention(records),
            "records": records,
        }

    def _lm_eval(self, model: LlamaForCausalLM, item: Job) -> dict[str, Any]:
        # lm-eval is an optional dependency (it needs PyTorch): imported only when a preset asks
        lm_eval = importlib.import_module("lm_eval")
        tasks_module = importlib.import_module("lm_eval.tasks")
        plugin = importlib.import_module("difflora_jax.evaluation.lm_eval_model")
        tasks = list(item.arg("tasks"))
        include = [p for p in (item.arg("include"),) if p]
        if item.arg("local"):
            include.append(str(write_local_task(self.out / "lm_eval_tasks", item.arg("items"))))
            tasks.append(LOCAL_TASK)
        manager = tasks_module.TaskManager(include_path=include or None)
        lm = plugin.DiffLoRALM(
            model=model, tokenizer=self.base()[1], batch_size=self.preset.eval.batch_size
        )
        out = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, task_manager=manager, limit=item.arg("limit"),
            log_samples=False, bootstrap_iters=0,
        )  # fmt: skip
        scores = {
            task: {k: v for k, v in values.items() if isinstance(v, int | float)}
            for task, values in (out or {}).get("results", {}).items()
        }
        return {"tasks": scores}


def write_local_task(directory: Path, items: int) -> Path:
    """An lm-eval multiple-choice task over the held-out instruction mix, in local files: each
    question's gold answer against three answers of other questions of the same kind."""
    directory.mkdir(parents=True, exist_ok=True)
    pool = make_mix(items + 100, seed=1, split="eval")  # wrong answers come from the whole pool
    rows = []
    for i, row in enumerate(pool[:items]):
        others = sorted({m["answer"] for m in pool if m["task"] == row["task"]} - {row["answer"]})
        rng = random.Random(i)
        choices = [row["answer"], *rng.sample(others, min(3, len(others)))]
        rng.shuffle(choices)
        question = prompt_messages(row)[-1]["content"]
        rows.append(
            {
                "question": f"Question: {question}\nAnswer:",
                "choices": [" " + c for c in choices],
                "answer": choices.index(row["answer"]),
            }
        )
    data = directory / f"{LOCAL_TASK}.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (directory / f"{LOCAL_TASK}.yaml").write_text(
        f"task: {LOCAL_TASK}\ndataset_path: json\ntest_split: test\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data.resolve()}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\ntarget_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n"
    )
    return directory
