"""What every command line of the project shares: reading its input files (JSONL/JSON/Parquet records with their
line or row numbers), writing its outputs atomically, the usage-error convention (one line naming the file, line or
flag; exit status 2), the interpreter named in hints, and the flags that name a model (--model, --adapter,
--template).

    rows, where = read_records("data.jsonl")     # where[i] = "data.jsonl:7", for error messages
    write_json(path, obj)                        # a temporary file beside path, then a rename
    except UsageError as e: return fail("train.py", e)
    f"{python_command()} evaluate.py ..."        # scripts/python when run by the interpreter install.sh recorded
"""
import gzip
import json
import os
import sys
from pathlib import Path


class UsageError(Exception):
    """Bad input (a flag, a file, a line of a file): reported as one line `prog: error: ...`, exit status 2."""


class CheckpointError(UsageError, ValueError):
    """A checkpoint folder that cannot be loaded as it is; the message names the file."""


def fail(prog: str, error) -> int:
    """Print the one-line error of a command line and return its exit status, 2."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    return 2


def python_command(root=None) -> str:
    """The interpreter to name in a printed hint: scripts/python when this one is the interpreter scripts/install.sh
    recorded in <root>/.ibft-python (default root: this repository), else python."""
    recorded = Path(root or Path(__file__).resolve().parent) / ".ibft-python"
    try:
        ours = os.path.abspath(recorded.read_text(encoding="utf-8").strip()) == os.path.abspath(sys.executable)
    except (OSError, UnicodeDecodeError):
        ours = False
    return "scripts/python" if ours else "python"


# ----------------------------------------------------------------------------------------------------------------
# Reading: objects of a JSONL file (.gz too) or of a JSON list, each with where it came from
# ----------------------------------------------------------------------------------------------------------------

def read_records(path, what: str = "") -> tuple:
    """(rows, where): the JSON objects of a JSONL file (blank lines skipped; .gz read through gzip), of a .json file
    (or any file starting with "["): a list of objects, or {"data": [...]}, or the rows of a .parquet file (through
    pyarrow); and for each one "file:line" (or "file: item i", "file: row i"). A malformed line is a UsageError
    naming file:line; `what` (e.g. "--data") prefixes a missing file's message."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{what + ' ' if what else ''}{path}: no such file")
    if path.suffix == ".parquet":
        return _read_parquet(path)
    text = read_text(path)
    if path.suffix == ".json" or text.lstrip().startswith("["):
        return _read_json_list(path, text)
    rows, where = [], []
    for n, line in enumerate(text.split("\n"), 1):     # not splitlines(): a JSON string may hold U+2028 as it is
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise UsageError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
        rows.append(obj)
        where.append(f"{path}:{n}")
    return rows, where


def read_text(path) -> str:
    """The text of a UTF-8 file (.gz read through gzip). A byte that is not UTF-8 is a UsageError naming file:line;
    a file that cannot be read (a truncated .gz) one naming the file."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as e:
        raise UsageError(f"{path}: cannot be read ({e or type(e).__name__})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise UsageError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})") from None


def _read_parquet(path: Path) -> tuple:
    try:
        import pyarrow.parquet as pq                  # optional: only Parquet files need it
    except ImportError:
        raise UsageError(f"{path}: reading Parquet needs the pyarrow package (pip install pyarrow)") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:                            # pyarrow's own errors: not a Parquet file, corrupt, ...
        raise UsageError(f"{path}: cannot be read as Parquet ({type(e).__name__}: {e})") from None
    return rows, [f"{path}: row {i}" for i in range(len(rows))]


def _read_json_list(path: Path, text: str) -> tuple:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise UsageError(f"{path}: expected JSON lines or a JSON list of objects")
    for i, obj in enumerate(data):
        if not isinstance(obj, dict):
            raise UsageError(f"{path}: item {i} is not a JSON object")
    return data, [f"{path}: item {i}" for i in range(len(data))]


# ----------------------------------------------------------------------------------------------------------------
# Writing: the whole file or nothing
# ----------------------------------------------------------------------------------------------------------------

def atomic_write(path, write) -> None:
    """write(tmp_path) fills a temporary file beside `path`, which then replaces it in one rename: readers (and a
    rerun after a crash) see the old file or the new one, never half of one; a failed write leaves nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path, obj, indent=1) -> None:
    write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def write_jsonl(path, rows) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# ----------------------------------------------------------------------------------------------------------------
# The flags that name a model, spelled and explained the same in every command line
# ----------------------------------------------------------------------------------------------------------------

MODEL_HELP = "HF checkpoint folder (default: the embedded SmolLM2-135M-Instruct)"
ADAPTER_HELP = "LoRA adapter folder from train.py (PEFT format: adapter_config.json + adapter_model.safetensors)"
TEMPLATE_HELP = "prompt template family (default: detected from the checkpoint's chat template)"
DTYPE_HELP = ("the model's weights and activations (the sampler's KV cache too): fp32 or bf16 (default: fp32 on the "
              "CPU, bf16 on CUDA); bf16 only where it is native (a CPU with avx512_bf16 or amx_bf16, a CUDA GPU with "
              "bf16), else refused; logits become probabilities in fp32 either way")


def add_model_flags(parser, families, adapter: bool = True):
    """--model, --template (one of `families`, tokenizer.FAMILIES: the caller hands them, so that cli imports no
    project module) and (adapter=True) --adapter on an argparse parser or argument group."""
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    if adapter:
        parser.add_argument("--adapter", default=None, help=ADAPTER_HELP)
    parser.add_argument("--template", default=None, choices=families, help=TEMPLATE_HELP)
