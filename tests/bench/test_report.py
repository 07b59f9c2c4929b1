"""The benchmark header says which persistent compilation cache the first calls ran with, and
how much CPU time the hypervisor took away during the run."""

from __future__ import annotations

from pathlib import Path

import jax
import pytest

from difflora_jax.bench import report
from difflora_jax.bench.report import compilation_cache, cpu_times, machine_info, steal_share


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


def test_steal_share_is_the_steal_counters_share_of_all_time_between_readings():
    # user nice system idle iowait irq softirq steal guest guest_nice
    before = (100, 0, 50, 800, 10, 0, 0, 40, 30, 0)
    after = (400, 0, 150, 1000, 10, 0, 0, 240, 90, 0)  # +300 +100 +200 +200 steal: 200 of 800
    assert steal_share(before, after) == "25.0%"
    assert steal_share(before, before) == "unknown"  # no time passed
    assert steal_share(None, after) == "unknown"
    assert steal_share(before[:4], after[:4]) == "unknown"  # a kernel without a steal counter


def test_the_header_reports_steal_where_the_kernel_counts_it():
    readings = cpu_times()
    if Path("/proc/stat").exists():
        assert readings is not None and len(readings) >= 8
        earlier = tuple(x - 1000 for x in readings[:8]) + readings[8:]  # time has passed
        share = machine_info("0 0 0", cpu_before=earlier)[
            "CPU time stolen by the hypervisor during the run"
        ]
        assert share.endswith("%") and 0.0 <= float(share[:-1]) <= 100.0
    else:
        assert readings is None


def test_the_vector_isa_is_the_widest_extension_in_the_cpu_flags():
    def info(flags: str) -> str:
        return f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 {flags}\n"

    assert report.vector_isa(info("avx avx2 fma avx512f avx512bw")) == "AVX-512"
    assert report.vector_isa(info("avx avx2 fma")) == "AVX2"
    assert report.vector_isa(info("avx")) == "AVX"
    assert report.vector_isa(info("")) not in ("AVX-512", "AVX2", "AVX")
    # a flag's prefix is not the flag: avx512_bf16 alone would not make AVX-512 code
    assert report.vector_isa(info("avx avx2 avx512_bf16")) == "AVX2"


def test_the_header_names_the_cpus_vector_isa():
    line = report.machine_info(report.load_average())["CPU"]
    assert line.endswith(", " + report.vector_isa())


def test_sections_of_one_kind_get_titles_that_tell_them_apart(tmp_path):
    info = {"CPU": "test"}
    plain = report.header("Train step", ["bench", "train"], 1.0, info)
    long = report.header("Train step", ["bench", "train"], 1.0, info, section="long")
    assert plain[0] == "## Train step"
    assert long[0] == "## Train step (long)"
    doc = tmp_path / "benchmarks.md"
    report.write_section(doc, "bench-train", "\n".join(plain))
    report.write_section(doc, "bench-train-long", "\n".join(long))
    titles = [line for line in doc.read_text().splitlines() if line.startswith("## ")]
    assert titles == ["## Train step", "## Train step (long)"]
