"""HumanEval: the problems load, canonical solutions pass, and the sandbox contains bad programs."""

from __future__ import annotations

import os
import tempfile
import time

import pytest

from difflora_jax.evaluation.humaneval import (
    SandboxLimits,
    SandboxResult,
    check_completion,
    evaluate_completions,
    load_problems,
    pass_at_1,
    run_in_sandbox,
)

FAST = SandboxLimits(timeout_s=5.0)


@pytest.fixture(scope="module")
def problems():
    return load_problems()


def test_load_problems_gives_the_164_problems_in_task_order(problems):
    assert len(problems) == 164
    assert [p["task_id"] for p in problems] == [f"HumanEval/{i}" for i in range(164)]
    for p in problems:
        assert {"task_id", "prompt", "canonical_solution", "test", "entry_point"} <= set(p)


def test_load_problems_reads_a_local_jsonl(problems, tmp_path):
    import json

    path = tmp_path / "two.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in (problems[3], problems[1])))
    assert [p["task_id"] for p in load_problems(path)] == ["HumanEval/1", "HumanEval/3"]


def test_canonical_solutions_of_the_first_20_problems_pass(problems):
    first = problems[:20]
    results = evaluate_completions(first, [p["canonical_solution"] for p in first], workers=2)
    failures = [(p["task_id"], r.detail) for p, r in zip(problems, results) if not r.passed]
    assert failures == []
    assert pass_at_1(results) == 1.0


def test_a_wrong_completion_fails(problems):
    result = check_completion(problems[0], "    return None\n", FAST)
    assert (result.passed, result.status) == (False, "failed")
    assert "AssertionError" in result.detail
    # the same problem with the right answer passes (the failure is the completion's)
    assert check_completion(problems[0], problems[0]["canonical_solution"], FAST).passed


def test_an_infinite_loop_times_out_quickly():
    start = time.monotonic()
    result = run_in_sandbox("while True:\n    pass\n", SandboxLimits(timeout_s=2.0))
    elapsed = time.monotonic() - start
    assert (result.passed, result.status) == (False, "timeout")
    assert 2.0 <= elapsed < 5.0


def test_forking_is_refused_and_the_parent_survives():
    parent = os.getpid()
    result = run_in_sandbox("import os\nwhile True:\n    os.fork()\n", FAST)
    assert (result.passed, result.status) == (False, "refused")
    assert "os.fork" in result.detail
    assert os.getpid() == parent


def test_subprocess_is_refused():
    result = run_in_sandbox('import subprocess\nsubprocess.run(["echo", "x"])\n', FAST)
    assert (result.passed, result.status) == (False, "refused")
    assert "subprocess.Popen" in result.detail


def test_opening_a_socket_is_refused():
    program = 'import socket\ns = socket.socket()\ns.connect(("127.0.0.1", 9))\n'
    result = run_in_sandbox(program, FAST)
    assert (result.passed, result.status) == (False, "refused")
    assert "socket" in result.detail


def test_catching_the_refusal_does_not_make_a_pass():
    program = (
        "import socket\n"
        "try:\n"
        "    socket.socket().connect(('127.0.0.1', 9))\n"
        "except Exception:\n"
        "    pass\n"
    )
    result = run_in_sandbox(program, FAST)
    assert (result.passed, result.status) == (False, "refused")


def test_writing_outside_the_sandbox_is_refused(tmp_path):
    target = tmp_path / "escaped.txt"
    result = run_in_sandbox(f"open({str(target)!r}, 'w').write('x')\n", FAST)
    assert (result.passed, result.status) == (False, "refused")
    assert not target.exists()
    # also through a symbolic link made inside the sandbox, and by removing a file outside
    program = f"import os\nos.symlink({str(tmp_path)!r}, 'link')\nopen('link/escaped.txt', 'w')\n"
    assert run_in_sandbox(program, FAST).status == "refused"
    assert not target.exists()
    keep = tmp_path / "keep.txt"
    keep.write_text("keep")
    assert run_in_sandbox(f"import os\nos.remove({str(keep)!r})\n", FAST).status == "refused"
    assert keep.read_text() == "keep"


def test_writing_inside_the_sandbox_is_allowed():
    program = (
        "import os, tempfile\n"
        "open('x.txt', 'w').write('hi')\n"
        "assert open('x.txt').read() == 'hi'\n"
        "os.makedirs('a/b')\n"
        "os.rename('x.txt', 'a/b/y.txt')\n"
        "fd, name = tempfile.mkstemp()\n"
        "os.close(fd)\n"
        "assert name.startswith(os.getcwd())\n"
    )
    result = run_in_sandbox(program, FAST)
    assert result == SandboxResult(True, "passed", "")


def test_a_memory_blow_up_does_not_pass_and_the_parent_survives():
    limits = SandboxLimits(timeout_s=5.0, memory_bytes=256 << 20)
    result = run_in_sandbox("x = bytearray(4 << 30)\n", limits)
    assert not result.passed
    assert result.status in ("failed", "error")
    assert "MemoryError" in result.detail
    assert run_in_sandbox("assert True\n", FAST).passed  # the parent carries on


def test_exiting_early_is_not_a_pass():
    for program in ("import os\nos._exit(0)\n", "import sys\nsys.exit(0)\n"):
        result = run_in_sandbox(program + "assert False\n", FAST)
        assert (result.passed, result.status) == (False, "failed")


def test_the_sandbox_directory_is_removed(tmp_path, monkeypatch):
    root = tmp_path / "sandboxes"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    program = (
        "import os\n"
        f"assert os.path.dirname(os.getcwd()) == {str(root.resolve())!r}\n"
        "os.makedirs('deep/er')\n"
        "open('deep/er/f.txt', 'w').write('x')\n"
        "os.chmod('deep', 0o500)\n"  # a read-only directory does not stop the clean-up
    )
    assert run_in_sandbox(program, FAST).passed
    looping = run_in_sandbox("while True:\n    pass\n", SandboxLimits(timeout_s=1.0))
    assert looping.status == "timeout"
    assert run_in_sandbox("import os\nos.fork()\n", FAST).status == "refused"
    assert list(root.iterdir()) == []


def test_pass_at_1():
    passed, failed = SandboxResult(True, "passed"), SandboxResult(False, "failed")
    assert pass_at_1([]) == 0.0
    assert pass_at_1([passed, failed, failed, passed]) == 0.5
