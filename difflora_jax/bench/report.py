"""What every benchmark section records (machine, load, versions, command, date) and how a
section is written into ``docs/benchmarks.md`` (between its markers, replacing the old one)."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import re
import shlex
from collections.abc import Sequence
from pathlib import Path

import jax

from difflora_jax import host_memory

DOC_HEADER = (
    "# Benchmarks\n\n"
    "Measured numbers, each section written by the command named in it (never edited by "
    "hand).\n"
)


def load_average() -> str:
    """The 1/5/15-minute load averages (other work on the machine skews every number)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def cpu_times() -> tuple[int, ...] | None:
    """The machine's cumulative CPU time counters, the ``cpu`` line of ``/proc/stat`` (user,
    nice, system, idle, iowait, irq, softirq, steal, ...), or None where there is none."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if not fields or fields[0] != "cpu":
        return None
    return tuple(int(x) for x in fields[1:])


def steal_share(before: tuple[int, ...] | None, after: tuple[int, ...] | None) -> str:
    """The share of all cores' time between two ``cpu_times`` readings that the hypervisor
    gave to other guests (``steal``): on a shared virtual machine it slows every number of a
    run, the peers' as much as ours, and it changes from minute to minute."""
    if before is None or after is None or min(len(before), len(after)) < 8:
        return "unknown"
    # the first eight counters partition the time (guest time is already inside user/nice)
    delta = [a - b for a, b in zip(after[:8], before[:8])]
    total = sum(delta)
    if total <= 0:
        return "unknown"
    return f"{100 * delta[7] / total:.1f}%"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def vector_isa(cpuinfo: str | None = None) -> str:
    """The widest x86 vector extension the CPU reports (``AVX-512``, ``AVX2``, ``AVX``), or
    the architecture's name elsewhere. XLA compiles CPU code for it, so it sets how float32
    sums are split into vector lanes: the same program rounds differently on an AVX2 and an
    AVX-512 machine (a chaotic training run then ends elsewhere; see docs/results.md).
    ``cpuinfo``: the text of ``/proc/cpuinfo`` (default: read it)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return platform.machine() or "unknown"
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX")):
        if flag in flags:
            return name
    return platform.machine() or "unknown"


def cpu_description() -> str:
    """The CPU's model name and its vector extension: ``AMD EPYC, AVX2``."""
    return f"{_cpu_name()}, {vector_isa()}"


def compilation_cache(directory: str | None) -> str:
    """Point JAX's persistent compilation cache at ``directory`` (None: leave it as
    ``JAX_COMPILATION_CACHE_DIR`` set it, or off) before anything compiles; returns the header
    line that says which cache the first-call figures ran with and how full it was."""
    if directory:
        jax.config.update("jax_compilation_cache_dir", directory)
    current = jax.config.jax_compilation_cache_dir  # pyright: ignore[reportAttributeAccessIssue]
    if not current:
        return "off (every first call compiles from scratch)"
    path = Path(current)
    entries = len(list(path.iterdir())) if path.is_dir() else 0
    return (
        f"{current}, {entries} entries before this run (a first call that finds its program "
        "there loads it instead of compiling)"
    )


def machine_info(
    load_before: str,
    torch_threads: int | None = None,
    cache: str | None = None,
    cpu_before: tuple[int, ...] | None = None,
) -> dict[str, str]:
    """CPU, cores, device, load before/after, the CPU time stolen since ``cpu_before`` (a
    ``cpu_times`` reading at the start of the run), library versions, and ``cache`` (the line
    ``compilation_cache`` returned), and the malloc setting (``host_memory``: it applies to
    every implementation in the process, the PyTorch peers included)."""
    names = ["jax", "jaxlib", "flax", "optax"]
    if torch_threads is not None:
        names += ["torch", "transformers", "peft"]
    versions = []
    for name in names:
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    info = {
        "CPU": cpu_description(),
        "cores": f"{os.cpu_count()} (usable by this process: {len(os.sched_getaffinity(0))})",
        "JAX device": f"{jax.default_backend()} ({jax.devices()[0].device_kind})",
        "load average (1/5/15 min) before / after": f"{load_before} / {load_average()}",
        "CPU time stolen by the hypervisor during the run": steal_share(cpu_before, cpu_times()),
        "versions": ", ".join(versions) + f", Python {platform.python_version()}",
        "host memory": host_memory.describe(),
    }
    if torch_threads is not None:
        info["PyTorch threads"] = str(torch_threads)
    if cache is not None:
        info["persistent compilation cache"] = cache
    return info


def header(
    title: str,
    argv: Sequence[str],
    took_s: float,
    info: dict[str, str],
    section: str | None = None,
) -> list[str]:
    """The opening lines of a section: title (with the ``--section`` name, so that several runs
    of one kind in one file are told apart), date, the command that wrote it, the machine."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return [
        f"## {title}" + (f" ({section})" if section else ""),
        "",
        f"Written by `difflora bench` on {now:%Y-%m-%d %H:%M} UTC; the run took {took_s:.0f} s.",
        "",
        "```",
        shlex.join(["difflora", *argv]),
        "```",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        "",
    ]


def write_section(path: Path, name: str, body: str) -> None:
    """Put ``body`` between the ``<!-- name:start -->`` / ``<!-- name:end -->`` markers of the
    file at ``path`` (appended when absent; the file is created with a header)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    section = f"{start}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else DOC_HEADER
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
