"""Broken files end every command line in one line naming the file (and the line, for data files), exit status 2,
nothing written: a truncated model.safetensors (--model), a truncated adapter_model.safetensors or an adapter folder
without it (--adapter), a data or samples file that is not UTF-8. And --resume past an unreadable checkpoint/: back to
.checkpoint.old when that one reads, else one line naming what could not be read."""
import json

import pytest
from safetensors.torch import load_file

import checkpoint
import evaluate
import lora
import mink
import peft_io
import train
from conftest import make_checkpoint

COMMANDS = {"train.py": train.main, "evaluate.py": evaluate.main, "mink.py": mink.main, "peft_io.py merge": peft_io.main}


def run(prog, argv, capsys):
    """(exit status, stderr) of a command line run in this process."""
    try:
        rc = COMMANDS[prog](argv)
    except SystemExit as e:                                 # train.py exits; the others return their status
        rc = e.code
    return rc, capsys.readouterr().err


def truncate(f, keep=0.5):
    data = f.read_bytes()
    f.write_bytes(data[:int(len(data) * keep)])


def write_data(path, n=8):
    path.write_text("".join(json.dumps({"instruction": f"Write f{i}.", "response": f"def f{i}():\n    return {i}\n"})
                            + "\n" for i in range(n)))
    return path


@pytest.fixture
def files(tmp_path):
    """A good checkpoint, its adapter and a data file, and the broken variants of the checkpoint and the adapter."""
    good = make_checkpoint(tmp_path / "good")
    model = checkpoint.load_model(good, device="cpu")
    lora.inject_lora(model, r=4, alpha=8)
    adapter = peft_io.save_adapter(model, tmp_path / "adapter")
    broken_model = make_checkpoint(tmp_path / "broken_model")
    truncate(broken_model / "model.safetensors")
    broken_adapter = peft_io.save_adapter(model, tmp_path / "broken_adapter")
    truncate(broken_adapter / peft_io.ADAPTER_WEIGHTS)
    no_weights = peft_io.save_adapter(model, tmp_path / "no_weights")
    (no_weights / peft_io.ADAPTER_WEIGHTS).unlink()
    return {"good": good, "adapter": adapter, "data": write_data(tmp_path / "d.jsonl"), "out": tmp_path / "out",
            "broken_model": broken_model, "broken_adapter": broken_adapter, "no_weights": no_weights}


def argv_of(prog, f, model, adapter, he):
    """The command line of `prog` on --model model (--adapter adapter where it takes one), writing under f["out"]."""
    out = f["out"]
    extra = ["--adapter", str(adapter)] if adapter else []
    return {"train.py": ["--model", str(model), "--data", str(f["data"]), "--out", str(out / "run"), "--method",
                         "ft", "--max-steps", "1", "--batch-size", "2"],
            "evaluate.py": ["--benchmark", "humaneval", "--data-dir", str(he), "--samples", str(out / "s.jsonl"),
                            "--out", str(out / "r.json"), "--generate", "--model", str(model), *extra, "--limit", "1",
                            "--n", "1", "--k", "1", "--m", "1", "--max-new-tokens", "2"],
            "mink.py": ["--model", str(model), *extra, "--data", str(f["data"]), "--out", str(out / "scores.jsonl")],
            "peft_io.py merge": ["merge", "--model", str(model), "--adapter", str(adapter or f["adapter"]), "--out",
                              str(out / "merged")]}[prog]


CASES = [(prog, "broken_model") for prog in COMMANDS] + \
    [(prog, broken) for prog in ("evaluate.py", "mink.py", "peft_io.py merge") for broken in ("broken_adapter", "no_weights")]


@pytest.mark.parametrize("prog, broken", CASES)
def test_a_broken_weights_file_is_one_line_naming_it(files, shared_dir, capsys, prog, broken):
    he = shared_dir / "data" / "humaneval"
    model = files["broken_model"] if broken == "broken_model" else files["good"]
    adapter = files[broken] if broken != "broken_model" else None
    rc, err = run(prog, argv_of(prog, files, model, adapter, he), capsys)
    bad_file = model / "model.safetensors" if broken == "broken_model" else adapter / peft_io.ADAPTER_WEIGHTS
    want = f"{bad_file}: missing" if broken == "no_weights" else \
        f"{bad_file}: not a readable safetensors file, truncated or corrupt"
    assert rc == 2 and err.startswith(f"{prog}: error: {want}") and len(err.strip().splitlines()) == 1, err
    assert not files["out"].exists()                                # nothing written, not even the folder
    rc, err = run(prog, argv_of(prog, files, files["good"], files["adapter"] if adapter else None, he), capsys)
    assert rc in (0, None), err                                     # the same command line on good files runs


def test_data_that_is_not_utf8_is_one_line_naming_file_and_line(files, shared_dir, capsys):
    data = files["data"]
    lines = data.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b"Write", b"Wr\xffite")              # line 3: a byte no UTF-8 text holds
    data.write_bytes(b"\n".join(lines))
    at = data.read_bytes().index(b"\xff")
    for prog in ("train.py", "mink.py"):
        rc, err = run(prog, argv_of(prog, files, files["good"], None, None), capsys)
        assert rc == 2 and err == f"{prog}: error: {data}:3: not valid UTF-8 (byte 0xff at offset {at})\n", err
    samples = files["out"].parent / "s.jsonl"
    samples.write_bytes(b'{"task_id": "HumanEval/0", "completion": "    pass\\n"}\n{"task_id": "HumanEval/1", '
                        b'"completion": "    return \xe9\\n"}\n')
    rc, err = run("evaluate.py", ["--benchmark", "humaneval", "--data-dir", str(shared_dir / "data" / "humaneval"),
                                  "--samples", str(samples), "--out", str(files["out"] / "r.json"), "--limit", "2",
                                  "--k", "1", "--m", "1"], capsys)
    assert rc == 2 and err.startswith(f"evaluate.py: error: {samples}:2: not valid UTF-8 (byte 0xe9"), err
    assert not files["out"].exists()


# ----------------------------------------------------------------------------------------------------------------
# --resume past an unreadable checkpoint
# ----------------------------------------------------------------------------------------------------------------

def test_resume_falls_back_to_the_checkpoint_before_an_unreadable_one(files, capsys):
    """checkpoint/ holds step 3, .checkpoint.old step 2. With checkpoint/trainer_state.pt truncated, --resume says so,
    restarts from step 2 and ends exactly where the uninterrupted run ended."""
    out = files["out"] / "run"
    argv = ["--model", str(files["good"]), "--data", str(files["data"]), "--out", str(out), "--method", "ibft",
            "--layer", "2", "--max-steps", "3", "--save-every", "1", "--batch-size", "2", "--lr", "1e-3"]
    train.main(argv)
    capsys.readouterr()
    ended = {f: load_file(str(out / f)) for f in (peft_io.ADAPTER_WEIGHTS, "vib.safetensors")}
    state, old_state = out / "checkpoint" / "trainer_state.pt", out / ".checkpoint.old" / "trainer_state.pt"
    assert [train.torch.load(f, weights_only=True)["step"] for f in (state, old_state)] == [3, 2]
    truncate(state)
    train.main(argv + ["--resume"])
    err = capsys.readouterr().err
    assert f"note: --resume: skipped {state}: cannot be read (" in err
    assert f"resuming from {out / '.checkpoint.old'}" in err
    for f, want in ended.items():
        got = load_file(str(out / f))
        assert all(train.torch.equal(got[k], want[k]) for k in want), f
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_resume_with_no_readable_checkpoint_is_one_line(files, capsys):
    out = files["out"] / "run"
    argv = ["--model", str(files["good"]), "--data", str(files["data"]), "--out", str(out), "--method", "ft",
            "--max-steps", "2", "--save-every", "1", "--batch-size", "2"]
    train.main(argv)
    capsys.readouterr()
    adapter, old_state = out / "checkpoint" / peft_io.ADAPTER_WEIGHTS, out / ".checkpoint.old" / "trainer_state.pt"
    truncate(adapter)
    truncate(old_state, keep=0)
    rc, err = run("train.py", argv + ["--resume"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--resume: {adapter}: cannot be read (" in err and f"; {old_state}: cannot be read (EOFError)" in err
    (out / ".checkpoint.old" / "trainer_state.pt").unlink()
    rc, err = run("train.py", argv + ["--resume"], capsys)
    assert rc == 2 and f"; {old_state}: missing" in err
    train.shutil.rmtree(out / ".checkpoint.old")
    rc, err = run("train.py", argv + ["--resume"], capsys)
    assert rc == 2 and err.strip().endswith("; no .checkpoint.old to fall back on"), err
