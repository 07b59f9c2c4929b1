"""An lm-evaluation-harness model: ``difflora_jax`` (loglikelihood, loglikelihood_rolling,
generate_until, batched).

Importing this module registers the model with the harness. lm-eval 0.4 has no plugin entry
point for models (its model table is built in), so the stock ``lm_eval`` command cannot see
it; ``difflora lm-eval ARGS`` imports it and then runs lm-eval's own command line with ARGS:

    difflora lm-eval --model difflora_jax \\
        --model_args model=smollm2-135m-instruct,adapter=runs/x/checkpoints/100 \\
        --tasks hellaswag --include_path my_tasks/ --batch_size 8

or from Python: ``lm_eval.simple_evaluate(model=DiffLoRALM(model=...), tasks=[...])``.
``model_args``: ``model`` (a checkpoint directory, .gguf file or alias), ``adapter`` (an
adapter checkpoint or a method), ``dtype``, ``max_length`` (default: the model's positions).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from difflora_jax.errors import ConfigError
from difflora_jax.generation import generate
from difflora_jax.modeling.llama import LlamaForCausalLM
from difflora_jax.weights.loading import load_model

_BUCKET = 64  # sequences are right-padded to a multiple of this (fewer compilations)


@nnx.jit
def _next_token_scores(model: LlamaForCausalLM, ids: Any, mask: Any) -> tuple[jax.Array, jax.Array]:
    """``(log p(ids[:, t + 1] | ids[:, :t + 1]), whether that token is the argmax)``, each
    ``[batch, length - 1]``, from one forward pass."""
    logits = model(ids, mask)[:, :-1].astype(jnp.float32)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), ids[:, 1:, None], axis=-1)
    return logp[..., 0], jnp.argmax(logits, axis=-1) == ids[:, 1:]


@register_model("difflora_jax")
class DiffLoRALM(LM):
    def __init__(
        self,
        model: str | LlamaForCausalLM,
        adapter: str | None = None,
        dtype: str = "float32",
        batch_size: int | str = 8,
        max_length: int | None = None,
        tokenizer: Any = None,
        **_: Any,  # the harness also passes device, max_batch_size, ...
    ):
        """``model``: a source for ``load_model`` (with ``adapter`` and ``dtype``), or a model
        already in memory with its ``tokenizer`` (``difflora reproduce``)."""
        super().__init__()
        if isinstance(model, LlamaForCausalLM):
            self.model = model
        else:
            self.model, tokenizer = load_model(model, dtype=dtype, adapter=adapter)
        if tokenizer is None:
            raise ConfigError(f"{model} has no tokenizer; lm-eval needs one")
        self.tokenizer = tokenizer
        self.batch = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_length = int(max_length or self.model.config.max_position_embeddings)
        eos = self.model.config.eos_token_ids
        bos = getattr(tokenizer, "bos_token_id", None)
        self.prefix_token = int(bos) if bos is not None else (eos[0] if eos else 0)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """``(sum log p(continuation | context), continuation is greedy)`` per pair, batched;
        contexts are cut on the left to fit ``max_length``."""
        out: list[tuple[float, bool]] = []
        for start in range(0, len(pairs), self.batch):
            chunk = pairs[start : start + self.batch]
            seqs = [(ctx + cont)[-self.max_length :] for ctx, cont in chunk]
            length = min(-(-max(len(s) for s in seqs) // _BUCKET) * _BUCKET, self.max_length)
            ids = np.zeros((len(seqs), length), np.int32)
            mask = np.zeros((len(seqs), length), np.int32)
            for i, s in enumerate(seqs):
                ids[i, : len(s)], mask[i, : len(s)] = s, 1
            logp, greedy = (np.asarray(a) for a in _next_token_scores(self.model, ids, mask))
            for i, (s, (_, cont)) in enumerate(zip(seqs, chunk)):
                span = slice(len(s) - 1 - len(cont), len(s) - 1)  # positions predicting cont
                out.append((float(logp[i, span].sum()), bool(greedy[i, span].all())))
        return out

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of context and continuation, trailing context spaces moved to the
        continuation and the whole encoded at once (as the harness's own models do)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self._encode(context + continuation)
        ctx = self._encode(context)
        if not context:
            return [self.prefix_token], whole
        return ctx, whole[len(ctx) :]

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return self._score([self._pair(*req.args) for req in requests])

    def loglikelihood_rolling(self, requests) -> list[float]:
        results = []
        for req in requests:
            (text,) = req.args
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    token_list=self._encode(text),
                    prefix_token=self.prefix_token,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            results.append(sum(score for score, _ in self._score(windows)))
        return results

    def generate_until(self, requests) -> list[str]:
        """Greedy continuations, batched over requests that share their stop strings and
        token budget; contexts cut on the left to leave room for the new tokens."""
        groups: dict[tuple[tuple[str, ...], int], list[int]] = {}
        prompts: list[str] = []
        for i, req in enumerate(requests):
            args: tuple[Any, ...] = tuple(req.args)
            context, kwargs = args[0], args[1]
            until = kwargs.get("until", [])
            until = (until,) if isinstance(until, str) else tuple(until)
            new = int(kwargs.get("max_gen_toks", 256))
            ids = self._encode(context)
            keep = ids[-(self.max_length - new) :]
            prompts.append(context if len(keep) == len(ids) else str(self.tokenizer.decode(keep)))
            groups.setdefault((until, new), []).append(i)
        outputs = [""] * len(prompts)
        for (until, new), members in groups.items():
            for start in range(0, len(members), self.batch):
                chunk = members[start : start + self.batch]
                results = generate(
                    self.model,
                    self.tokenizer,
                    [prompts[i] for i in chunk],
                    max_new_tokens=new,
                    stop=until,
                )
                for i, result in zip(chunk, results):
                    outputs[i] = result.text
        return outputs
