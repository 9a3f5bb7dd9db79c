"""The interpreter a printed hint names (cli.python_command): scripts/python when the one running is the interpreter
scripts/install.sh recorded in .ibft-python, else python; train.py's closing `next` line uses it."""
import json
import sys

import cli
import train
from conftest import REPO, make_checkpoint


def test_python_command_names_scripts_python_for_the_recorded_interpreter(tmp_path, monkeypatch):
    assert cli.python_command(tmp_path) == "python"                                 # install.sh has not run
    (tmp_path / ".ibft-python").write_text(sys.executable + "\n")
    assert cli.python_command(tmp_path) == "scripts/python"
    monkeypatch.setattr(sys, "executable", str(tmp_path / "other" / "python3"))
    assert cli.python_command(tmp_path) == "python"                                 # run by another interpreter


def test_train_next_line_names_the_interpreter(tmp_path, monkeypatch, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {i}.", "response": f"{i}"}) + "\n" for i in range(4)))
    argv = ["--model", str(make_checkpoint(tmp_path / "ckpt")), "--data", str(data), "--method", "ft",
            "--max-steps", "1", "--batch-size", "2"]
    monkeypatch.setattr(sys, "executable", str(tmp_path / "not-recorded" / "python3"))
    train.main(argv + ["--out", str(tmp_path / "a")])
    assert f"  next      python evaluate.py --benchmark humaneval --generate --adapter {tmp_path / 'a'} " \
        in capsys.readouterr().out
    recorded = REPO / ".ibft-python"
    if recorded.is_file():                          # after scripts/install.sh: its interpreter is scripts/python
        monkeypatch.setattr(sys, "executable", recorded.read_text().strip())
        train.main(argv + ["--out", str(tmp_path / "b")])
        assert "  next      scripts/python evaluate.py --benchmark humaneval" in capsys.readouterr().out
