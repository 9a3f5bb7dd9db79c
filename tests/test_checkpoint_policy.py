"""train.py's checkpoint policy and --tensorboard: checkpoints by time (--save-minutes), by steps (--save-every,
which replaces the time rule), at each epoch's end; the newest --keep-checkpoints kept; --resume past unreadable ones
to the newest readable one; a SIGKILL + resume under the time rule bit-identical to an uninterrupted run; the same
decision on every DDP process; --tensorboard's scalars, and its one-line error where the package is missing."""
import ast
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peft_io
import train
from test_train import run_train, write_data

REPO = Path(__file__).resolve().parent.parent
STRICT = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_CBWR": "AUTO,STRICT"}   # one thread: deterministic CPU kernels


def kept(run_dir: Path) -> list:
    """(folder name, step) of every checkpoint folder in run_dir, newest first, and any .checkpoint.tmp left."""
    dirs = sorted(d for d in run_dir.iterdir() if d.is_dir() and "checkpoint" in d.name)
    steps = {d.name: torch.load(d / "trainer_state.pt", weights_only=True)["step"] for d in dirs}
    return sorted(steps.items(), key=lambda x: -x[1])


def train_in_process(capsys, *argv):
    """train.main in this process; (exit status, stderr)."""
    try:
        train.main([str(a) for a in argv])
        rc = 0
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_time_rule_saves_after_every_step_and_keeps_the_newest_k(tmp_path, tiny_ckpt, capsys, one_thread):
    """40 examples in batches of 4: 10 steps an epoch, so the 5 steps here end no epoch; only the time rule saves."""
    data = write_data(tmp_path / "d.jsonl", n=40)
    common = ["--model", tiny_ckpt, "--data", data, "--method", "ft", "--max-steps", 5, "--layer", 2]
    for minutes, keep, want in [(0.0001, 3, [("checkpoint", 5), (".checkpoint.old", 4), (".checkpoint.old2", 3)]),
                                (0.0001, 1, [("checkpoint", 5)]),
                                (0, 3, [("checkpoint", 5)]),          # no time rule: the final checkpoint only
                                (30, 3, [("checkpoint", 5)])]:       # the default: 30 minutes, not reached
        out = tmp_path / f"m{minutes}_k{keep}"
        rc, err = train_in_process(capsys, *common, "--out", out, "--save-minutes", minutes,
                                   "--keep-checkpoints", keep)
        assert rc == 0, err
        assert kept(out) == want, (minutes, keep)


def test_save_every_replaces_the_time_rule_and_each_epoch_ends_with_a_checkpoint(tmp_path, tiny_ckpt, capsys,
                                                                                   one_thread):
    """12 examples, batches of 4, 2 micro-batches a step: an epoch is 3 micro-batches, so epochs end during steps
    2 (micro-batch 3), 3 (6) and 5 (9, the last step, whose checkpoint is the final one)."""
    data = write_data(tmp_path / "d.jsonl", n=12)
    common = ["--model", tiny_ckpt, "--data", data, "--method", "ft", "--grad-accum", 2, "--epochs", 3,
              "--keep-checkpoints", 9]
    rc, err = train_in_process(capsys, *common, "--out", tmp_path / "epochs", "--save-minutes", 0)
    assert rc == 0, err
    assert [s for _, s in kept(tmp_path / "epochs")] == [5, 3, 2]
    rc, err = train_in_process(capsys, *common, "--out", tmp_path / "every", "--save-minutes", 0.0001,
                               "--save-every", 4)
    assert rc == 0, err
    assert [s for _, s in kept(tmp_path / "every")] == [5, 4, 3, 2]   # the time rule would have saved step 1 too


def test_resume_skips_every_unreadable_checkpoint_for_the_newest_readable(tmp_path, tiny_ckpt, capsys, one_thread):
    """Three kept (steps 3, 2, 1); checkpoint/ and .checkpoint.old made unreadable: --resume names both, restarts
    from .checkpoint.old2 (step 1) and ends where the uninterrupted run ended."""
    data = write_data(tmp_path / "d.jsonl", n=40)
    out = tmp_path / "run"
    argv = ["--model", tiny_ckpt, "--data", data, "--out", out, "--method", "ibft", "--layer", 2, "--max-steps", 3,
            "--lr", 1e-3, "--save-minutes", 0.0001, "--keep-checkpoints", 3]
    rc, err = train_in_process(capsys, *argv)
    assert rc == 0, err
    assert [s for _, s in kept(out)] == [3, 2, 1]
    ended = {f: load_file(str(out / f)) for f in (peft_io.ADAPTER_WEIGHTS, "vib.safetensors")}
    state, adapter = out / "checkpoint" / "trainer_state.pt", out / ".checkpoint.old" / peft_io.ADAPTER_WEIGHTS
    state.write_bytes(state.read_bytes()[:100])
    adapter.write_bytes(adapter.read_bytes()[:100])
    rc, err = train_in_process(capsys, *argv, "--resume")
    assert rc == 0, err
    assert f"note: --resume: skipped {state}: cannot be read (" in err
    assert f"; skipped {adapter}: cannot be read (" in err
    assert f"; resuming from {out / '.checkpoint.old2'}\n" in err
    for f, want in ended.items():
        got = load_file(str(out / f))
        assert all(torch.equal(got[k], want[k]) for k in want), f
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    # Two more saves (steps 2 and 3): the newest two are the resumed run's, the third the unreadable one of step 3.
    assert [torch.load(out / d / "trainer_state.pt", weights_only=True)["step"]
            for d in ("checkpoint", ".checkpoint.old")] == [3, 2]
    assert (out / ".checkpoint.old2" / "trainer_state.pt").stat().st_size == 100
    assert not (out / ".checkpoint.old3").exists() and not (out / ".checkpoint.tmp").exists()


def test_sigkill_and_resume_under_the_time_rule_is_bit_identical(tmp_path, tiny_ckpt):
    """A checkpoint after every step (--save-minutes 0.0001), three kept, killed at an arbitrary point after the third
    save (between two renames of a rotation, perhaps), resumed: the same weights as the uninterrupted run, bit for
    bit, and every step logged once. Where they differ, a second uninterrupted run tells a resume bug from kernels
    that are not deterministic on this CPU (as tests/test_train.py's SIGKILL test)."""
    data = write_data(tmp_path / "d.jsonl", n=16)
    common = ["--model", tiny_ckpt, "--data", data, "--max-steps", 20, "--epochs", 20, "--lr", 1e-3, "--layer", 2,
              "--method", "ibft", "--save-minutes", 0.0001, "--keep-checkpoints", 3]
    run_train(*common, "--out", tmp_path / "full", env=STRICT)
    assert kept(tmp_path / "full") == [("checkpoint", 20), (".checkpoint.old", 19), (".checkpoint.old2", 18)]
    out = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, str(REPO / "train.py"), *map(str, common), "--out", str(out)], cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=STRICT)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / ".checkpoint.old2" / "trainer_state.pt").exists():
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (out / "adapter_model.safetensors").exists(), "the run finished before it was killed"
    run_train(*common, "--out", out, "--resume", env=STRICT)

    def weights(run_dir):
        return {**load_file(str(run_dir / "adapter_model.safetensors")), **load_file(str(run_dir / "vib.safetensors"))}

    a, b = weights(tmp_path / "full"), weights(out)
    if not all(torch.equal(a[k], b[k]) for k in a):
        run_train(*common, "--out", tmp_path / "again", env=STRICT)
        c = weights(tmp_path / "again")
        if not all(torch.equal(a[k], c[k]) for k in a):
            pytest.skip("two uninterrupted runs differ on this CPU: its kernels are not deterministic")
        pytest.fail("the resumed run differs from the uninterrupted one, which a second uninterrupted run matches")
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, 21))
    assert kept(out) == [("checkpoint", 20), (".checkpoint.old", 19), (".checkpoint.old2", 18)]


def test_two_processes_checkpoint_on_the_same_steps_by_time(tmp_path, tiny_ckpt):
    """DDP under the time rule: rank 0's decision is broadcast, every rank meets the barrier after each save."""
    data = write_data(tmp_path / "d.jsonl", n=16)
    out = tmp_path / "two"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        "29531", str(REPO / "train.py"), "--model", str(tiny_ckpt), "--data", str(data), "--out",
                        str(out), "--method", "ibft", "--layer", "2", "--max-steps", "3", "--batch-size", "2",
                        "--save-minutes", "0.0001", "--keep-checkpoints", "3"],
                       capture_output=True, text=True, cwd=REPO, env=STRICT, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert [s for _, s in kept(out)] == [3, 2, 1]


@pytest.mark.parametrize("extra, message", [
    (["--keep-checkpoints", 0], "--keep-checkpoints must be >= 1"),
    (["--save-minutes", -1], "--save-minutes must be a number >= 0, got -1.0"),
    (["--save-minutes", "inf"], "--save-minutes must be a number >= 0, got inf"),
    (["--save-every", -2], "--save-every must be >= 0"),
])
def test_bad_checkpoint_flags_are_one_line_before_the_model_is_read(tmp_path, capsys, extra, message):
    rc, err = train_in_process(capsys, "--model", tmp_path / "absent", "--out", tmp_path / "r", *extra)
    assert rc == 2 and err == f"train.py: error: {message}\n", err
    assert not (tmp_path / "r").exists()


def test_tensorboard_without_the_package_is_a_one_line_error_before_the_model_is_read(tmp_path, capsys,
                                                                                        monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)              # as if not installed: importing it fails
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    rc, err = train_in_process(capsys, "--model", tmp_path / "absent", "--out", tmp_path / "r", "--tensorboard",
                               tmp_path / "tb")
    assert rc == 2 and err == ("train.py: error: --tensorboard needs the tensorboard package "
                               "(pip install tensorboard)\n"), err
    assert not (tmp_path / "r").exists() and not (tmp_path / "tb").exists()


def test_only_train_py_imports_tensorboard_and_only_inside_a_function():
    """TensorBoard is optional: no module imports it at load time, and no module but train.py at all."""
    found = []
    for path in sorted(REPO.glob("*.py")) + sorted((REPO / "bench").glob("*.py")):
        tree = ast.parse(path.read_text())
        top = {id(n) for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))} - {
            id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            for n in ast.walk(f)}
        for n in ast.walk(tree):
            names = [a.name for a in n.names] if isinstance(n, ast.Import) else \
                [n.module or ""] if isinstance(n, ast.ImportFrom) else []
            if any("tensorboard" in x for x in names):
                found.append((path.name, "module level" if id(n) in top else "in a function"))
    assert found and set(found) == {("train.py", "in a function")}, found


def test_tensorboard_scalars_are_the_logged_metrics(tmp_path, tiny_ckpt, capsys):
    """Every step's metrics, as metrics.jsonl holds them; a resumed run (here from step 2, checkpoint/ being
    unreadable) replaces the steps after its checkpoint, as in metrics.jsonl, rather than adding a second step 3."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    data = write_data(tmp_path / "d.jsonl", n=16)
    out, tb = tmp_path / "r", tmp_path / "tb"
    argv = ["--model", tiny_ckpt, "--data", data, "--out", out, "--method", "ibft", "--layer", 2, "--max-steps", 3,
            "--diag-every", 1, "--eval-data", data, "--eval-every", 2, "--tensorboard", tb, "--save-minutes", 0.0001]
    rc, err = train_in_process(capsys, *argv)
    assert rc == 0, err
    state = out / "checkpoint" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    rc, err = train_in_process(capsys, *argv, "--resume")
    assert rc == 0 and f"resuming from {out / '.checkpoint.old'}" in err, err
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(tb))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == set(train.TENSORBOARD_SCALARS)
    for tag in train.TENSORBOARD_SCALARS:
        want = [(r["step"], r[tag]) for r in recs if tag in r]
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in want], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6, abs=1e-12), tag
