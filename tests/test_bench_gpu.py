"""bench/bench_gpu.py and scripts/device_check.sh, the GPU check, run on the CPU at a tiny shape so that neither can
rot before a GPU machine runs them: the JSON's keys, finite numbers, and the MFU formula's FLOPs written out."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench" / "bench_gpu.py"


def numbers(obj):
    """Every int and float in a JSON object."""
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in numbers(v)]
    return [obj] if isinstance(obj, (int, float)) and not isinstance(obj, bool) else []


def tiny_flops(ib: bool) -> int:
    """6 N + 12 L H T for --tiny (hidden 64, intermediate 128, 2 layers, vocab 320, 32 tokens, LoRA r 32, d 16)."""
    H, I, L, V, T, r, d = 64, 128, 2, 320, 32, 32, 16
    frozen = L * (4 * H * H + 3 * H * I)
    lora = L * r * (4 * (H + H) + 3 * (H + I))
    n = frozen + lora + V * H + ((2 * d * H + d * H + V * H) if ib else 0)     # IB: q_phi, g_phi, the LM head again
    return 6 * n + 12 * L * H * T


def test_tiny_run_gives_every_key_with_finite_numbers(tmp_path):
    out = tmp_path / "gpu.json"
    p = subprocess.run([sys.executable, str(BENCH), "--tiny", "--device", "cpu", "--out", str(out)],
                       capture_output=True, text=True, cwd=REPO, timeout=600)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert json.loads(out.read_text()) == res
    assert {"environment", "shape", "dtype", "peak_tflops", "mfu_formula", "train", "generate", "hf",
            "seconds"} <= res.keys()
    configs = res["train"]["configs"]
    assert [(c["method"], c["gradient_checkpointing"]) for c in configs] == [
        ("ibft", False), ("ibft", True), ("ft", False), ("ft", True)]
    for c in configs:
        assert {"step_s", "tokens_per_s", "mfu", "flops_per_token", "peak_memory_gib", "loss"} <= c.keys(), c
        assert c["flops_per_token"] == tiny_flops(c["method"] == "ibft")
        assert c["mfu"] == pytest.approx(c["tokens_per_s"] * c["flops_per_token"] / 989e12, rel=1e-9)
        assert c["tokens_per_s"] * c["step_s"] == pytest.approx(2 * 32, rel=1e-9)
    gen = res["generate"]
    assert gen["tokens"] == 4 * 8 and {"tokens_per_s", "decode_tokens_per_s", "peak_memory_gib"} <= gen.keys()
    hf = res["hf"]
    if "skipped" in hf:                                   # transformers or peft not installed here
        assert "not both importable" in hf["skipped"]
    else:
        assert [c["gradient_checkpointing"] for c in hf["train"]] == [False, True]
        assert all(c["flops_per_token"] == tiny_flops(False) for c in hf["train"])
        assert hf["generate"]["tokens"] == 4 * 8
    values = numbers(res)
    assert values and all(math.isfinite(x) for x in values)
    assert all(x > 0 for c in configs for x in (c["step_s"], c["tokens_per_s"], c["mfu"], c["peak_memory_gib"]))


def test_bad_flags_are_one_line_errors():
    for argv, message in ((["--tiny", "--device", "cpu", "--parts", "train,nope"], "--parts train,nope"),
                          (["--tiny", "--device", "cpu", "--steps", "0"], "--steps must be >= 1")):
        p = subprocess.run([sys.executable, str(BENCH), *argv], capture_output=True, text=True, cwd=REPO, timeout=120)
        assert p.returncode == 2 and p.stderr.startswith(f"bench_gpu.py: error: {message}"), p.stderr
        assert p.stderr.count("\n") == 1 and p.stdout == ""
    if not torch.cuda.is_available():
        p = subprocess.run([sys.executable, str(BENCH)], capture_output=True, text=True, cwd=REPO, timeout=120)
        assert p.returncode == 2 and "--device cuda: CUDA is not available" in p.stderr


def test_device_check_dry_run_on_the_cpu(tmp_path):
    """scripts/device_check.sh with BENCH_ARGS="--tiny --device cpu": every step runs and leaves its JSON."""
    env = dict(os.environ, PYTHON=sys.executable, BENCH_ARGS="--tiny --device cpu", OUT=str(tmp_path))
    p = subprocess.run(["bash", str(REPO / "scripts" / "device_check.sh")], env=env, capture_output=True, text=True,
                       timeout=600)
    log = (tmp_path / "check.log").read_text()
    for step in ("versions", "train", "generate", "hf"):
        assert f"[{step}] exit 0 after" in log, log
    assert p.returncode == (0 if "[nvidia-smi] exit 0 after" in log else 1)
    assert json.loads((tmp_path / "versions.json").read_text())["torch"] == torch.__version__
    for part in ("train", "generate", "hf"):
        assert part in json.loads((tmp_path / f"{part}.json").read_text())
    assert sorted(f.name for f in tmp_path.iterdir()) == ["check.log", "generate.json", "hf.json", "nvidia-smi.txt",
                                                          "train.json", "versions.json"]


def test_our_train_step_draws_train_pys_keyed_dropout_masks(monkeypatch):
    """Forward and backward (gradient checkpointing's recomputation too) run under lora.keyed_dropout, as in
    train.optimizer_step, so the check times the masks train.py draws."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    keyed, forward = [], bench.L.LoRADropout.forward

    def spy(self, x):
        keyed.append(self.rows is not None)
        return forward(self, x)

    monkeypatch.setattr(bench.L.LoRADropout, "forward", spy)
    res = bench.part_train(dict(bench.TINY, steps=1, warmup=0), torch.device("cpu"), 989.0)
    assert len(res["configs"]) == 4 and all("error" not in c for c in res["configs"])
    assert keyed and all(keyed)
