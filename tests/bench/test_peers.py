"""The PyTorch DiffLoRA peer computes our numbers (so timing it against us compares the same
work), and ``difflora bench`` writes its sections from a real (tiny) run."""

from __future__ import annotations

import numpy as np
import pytest

from difflora_jax.bench.train import random_batch
from difflora_jax.cli import main
from difflora_jax.losses import batch_loss
from difflora_jax.modeling.adapters import apply_adapters
from difflora_jax.weights.loading import load_model
from tests.variants import difflora

torch = pytest.importorskip("torch")


@pytest.mark.parametrize(
    "adapter",
    [
        difflora(negative_term="adapters"),
        difflora(negative_term="base_plus_adapters", group_norm=True),
        difflora(lambda_mode="fixed", lambda_init=0.3),
    ],
    ids=["adapters", "base-plus-adapters-gn", "fixed-lambda"],
)
def test_the_eager_torch_difflora_peer_computes_our_loss(tiny_hf_dir, adapter):
    from difflora_jax.bench import peers

    ours, _ = load_model(tiny_hf_dir, with_tokenizer=False)
    apply_adapters(ours, adapter)
    batch = random_batch(2, 12, ours.config.vocab_size, seed=3)
    want = float(batch_loss(ours, batch)[0])
    peer = peers.torch_difflora(peers.load_torch_llama(tiny_hf_dir), ours.config, adapter)
    peers.copy_adapters_from(peer, ours)
    peer.eval()  # no dropout: the same function
    with torch.no_grad():
        logits = peer(input_ids=torch.tensor(batch["input_ids"], dtype=torch.long)).logits
        got = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), torch.tensor(batch["targets"], dtype=torch.long).flatten()
        )
    # float32 on both sides, different summation orders: agreement to ~1e-6 relative
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_the_peer_refuses_what_it_does_not_cover(tiny_hf_dir):
    from difflora_jax.bench import peers
    from difflora_jax.errors import ConfigError

    ours, _ = load_model(tiny_hf_dir, with_tokenizer=False)
    with pytest.raises(ConfigError, match="lora_mlp"):
        peers.torch_difflora(
            peers.load_torch_llama(tiny_hf_dir), ours.config, difflora(lora_mlp=True)
        )


def test_bench_train_and_generate_write_their_sections(tiny_hf_dir, tmp_path, capsys):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nkept text\n")
    common = ["--model", str(tiny_hf_dir), "--repeats", "1", "--peers", "--write", str(doc)]
    assert (
        main(
            [
                "bench",
                "train",
                "--methods",
                "lora-r8,difflora-32",
                "--batch",
                "1",
                "--seq-len",
                "16",
                "--also-per-layer",
                *common,
            ]
        )
        == 0
    )
    generate = ["bench", "generate", "--batches", "1", "--prompt-tokens", "16"]
    generate += ["--new-tokens", "4", *common]
    assert main(generate) == 0
    text = doc.read_text()
    assert "kept text" in text
    for name in ("bench-train", "bench-generate"):
        assert text.count(f"<!-- {name}:start -->") == 1 == text.count(f"<!-- {name}:end -->")
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert any(
        "| difflora_jax | lora-r8 | 1 x 16 |" in r and "x PyTorch + peft |" in r for r in rows
    )
    assert any("| PyTorch eager DiffLoRA | difflora-32 |" in r for r in rows)
    per_layer = [r for r in rows if "per-layer adapters" in r]
    assert [r.split(" | ")[1] for r in per_layer] == ["lora-r8", "difflora-32"]
    # DiffLoRA's step over LoRA's of the same setting, once per setting
    ratios = [line for line in text.splitlines() if " step / " in line]
    assert len(ratios) == 2 and all(
        "difflora-32 step / lora-r8 step at 1 x 16 (" in r for r in ratios
    )
    assert sum("per-layer adapters" in r for r in ratios) == 1
    assert any(r.startswith("| 1 | transformers |") for r in rows)
    assert "difflora bench train --methods lora-r8,difflora-32" in text
    # a second run replaces the section instead of appending another
    assert main(generate) == 0
    assert doc.read_text().count("<!-- bench-generate:start -->") == 1
