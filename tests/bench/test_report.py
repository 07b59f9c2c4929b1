"""The benchmark header says which persistent compilation cache the first calls ran with."""

from __future__ import annotations

import jax
import pytest

from difflora_jax.bench.report import compilation_cache, machine_info


@pytest.fixture
def restore_cache_dir():
    before = jax.config.jax_compilation_cache_dir  # pyright: ignore[reportAttributeAccessIssue]
    yield
    jax.config.update("jax_compilation_cache_dir", before)


def test_the_header_labels_the_compilation_cache_and_its_entries(tmp_path, restore_cache_dir):
    jax.config.update("jax_compilation_cache_dir", None)
    assert compilation_cache(None).startswith("off")
    (tmp_path / "jit_step-1-cache").write_bytes(b"")
    (tmp_path / "jit_step-2-cache").write_bytes(b"")
    line = compilation_cache(str(tmp_path))
    assert jax.config.jax_compilation_cache_dir == str(tmp_path)  # pyright: ignore[reportAttributeAccessIssue]
    assert line.startswith(f"{tmp_path}, 2 entries before this run")
    info = machine_info("0 0 0", cache=line)
    assert info["persistent compilation cache"] == line
    assert "persistent compilation cache" not in machine_info("0 0 0")
