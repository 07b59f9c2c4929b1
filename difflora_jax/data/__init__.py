"""The SFT data pipeline: chat examples -> tokens with an assistant-only loss mask -> packed,
resumable ``[batch, max_length]`` batches, from JSONL, HF ``datasets``, TFDS or a synthetic mix.

```python
from difflora_jax.data import SFTBatchIterator, make_mix

it = SFTBatchIterator(make_mix(2000, seed=0), tokenizer, batch_size=8, max_length=256)
batch = next(it)          # input_ids, targets, loss_mask, segment_ids, positions: int32 [8, 256]
saved = it.state()        # JSON-serialisable; SFTBatchIterator(..., state=saved) resumes
```
"""

from difflora_jax.data.chat import (
    ChatEncoder,
    TokenizedExample,
    encode_chat,
    encode_chats,
    special_token_ids,
    validate_messages,
)
from difflora_jax.data.packing import BatchPacker, pack_examples
from difflora_jax.data.pipeline import SFTBatchIterator, epoch_permutation
from difflora_jax.data.sources import (
    ExampleSource,
    load_hf_dataset,
    load_jsonl,
    load_tfds,
    normalize_example,
)
from difflora_jax.data.synthetic import (
    TASKS,
    contains_answer,
    exact_match,
    make_item,
    make_mix,
    normalize_answer,
    prompt_messages,
    prompt_split,
)
from difflora_jax.errors import DataError
from difflora_jax.losses import BATCH_KEYS  # the batch contract, re-exported for data users

__all__ = [
    "BATCH_KEYS",
    "TASKS",
    "BatchPacker",
    "ChatEncoder",
    "DataError",
    "ExampleSource",
    "SFTBatchIterator",
    "TokenizedExample",
    "contains_answer",
    "encode_chat",
    "encode_chats",
    "epoch_permutation",
    "exact_match",
    "load_hf_dataset",
    "load_jsonl",
    "load_tfds",
    "make_item",
    "make_mix",
    "normalize_answer",
    "normalize_example",
    "pack_examples",
    "prompt_messages",
    "prompt_split",
    "special_token_ids",
    "validate_messages",
]
