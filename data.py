"""Fine-tuning data: the files people bring, read as conversations, and turned into token ids with the loss on the
assistant's turns only (Eq. (1)'s y). train.py and mink.py both read their --data through here.

    records, where = cli.read_records("train.parquet")     # JSONL (.gz), a JSON list, Parquet (through pyarrow)
    fmt = detect_format(records, "train.parquet")           # or (..., prompt="question", response="answer")
    examples, source, stats = encode(tok, records, where, fmt, max_len=2048)    # [(ids, trained)]

Formats, detected from the first record (--instruction-field/--response-field name a pair and win):
    messages  {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}: the chat/SFT format;
              the loss sees every assistant turn, each rendered by the model's template turn by turn
    alpaca    {"instruction", "input", "output"}: a non-empty input joins the instruction as Alpaca does (the
              alpaca template's "### Input:" block; a blank line between the two in a chat template)
    pair      one instruction and one response field: instruction/response (this project's files),
              Instruction/Response (OriGen, the paper's Verilog set), instruction/output (Evol-CodeAlpaca-V1),
              prompt/completion, question/answer (TOFU)
"""
from dataclasses import dataclass

from cli import UsageError

# (instruction, response) field names, most specific first.
FIELD_PAIRS = [("instruction", "response"), ("Instruction", "Response"), ("instruction", "output"),
               ("prompt", "completion"), ("question", "answer")]


@dataclass(frozen=True)
class Format:
    kind: str                   # "messages" | "alpaca" | "pair"
    prompt: str = ""            # the instruction field (alpaca, pair)
    response: str = ""          # the response field (alpaca, pair)

    def describe(self) -> str:
        return "messages" if self.kind == "messages" else f"{self.kind} ({self.prompt} -> {self.response})"

    def messages(self, record: dict, where: str) -> list:
        """The record as a conversation [{"role", "content"}, ...]; a bad pair record is a UsageError naming
        `where` (a conversation is checked when it is encoded: encode() names `where` then)."""
        if self.kind == "messages":
            turns = record.get("messages")
            if isinstance(turns, list):          # role and content only: nothing else reaches the template
                turns = [{"role": m.get("role"), "content": m.get("content")} if isinstance(m, dict) else m
                         for m in turns]
            return turns                         # checked where it is encoded (tokenizer.check_messages)
        for name in (self.prompt, self.response):
            if name not in record:
                raise UsageError(f"{where}: missing field '{name}'")
        response = record[self.response]
        if not isinstance(response, str) or not response.strip():
            raise UsageError(f"{where}: empty response")
        user = {"role": "user", "content": str(record[self.prompt])}
        if self.kind == "alpaca" and str(record.get("input") or "").strip():
            user["alpaca"] = (user["content"], str(record["input"]))    # the alpaca template's "### Input:" block
            user["content"] = f"{user['content']}\n\n{record['input']}"  # what a chat template sees
        return [user, {"role": "assistant", "content": response}]


def detect_format(records, path, prompt: str = None, response: str = None) -> Format:
    """The format of a data file from its first record; prompt/response (the --instruction-field/--response-field
    flags) name a pair explicitly. A file in no known format is a UsageError listing the fields it has."""
    first = records[0]
    if prompt and response:
        return Format("pair", prompt, response)
    if not (prompt or response) and "messages" in first:
        return Format("messages")
    for p, r in FIELD_PAIRS:
        if (prompt or p) in first and (response or r) in first:
            kind = "alpaca" if (p, r) == ("instruction", "output") and "input" in first and not prompt else "pair"
            return Format(kind, prompt or p, response or r)
    raise UsageError(f"{path}: cannot tell the data format from the fields {sorted(first)} (expected 'messages', "
                     f"or an instruction/response pair: use --instruction-field and --response-field)")


def encode(tok, records, where, fmt: Format, max_len: int) -> tuple:
    """-> examples [(ids, trained)], the index of each one's record, stats. trained[t] says whether token t is a
    target of the loss (an assistant turn's token or the end-of-turn token after it). An example longer than
    max_len is cut; one with no trained token left is dropped."""
    examples, source, truncated, dropped = [], [], 0, 0
    for n, r in enumerate(records):
        try:
            ids, trained = tok.encode_messages(fmt.messages(r, where[n]))
        except ValueError as e:                                     # a malformed conversation
            raise UsageError(f"{where[n]}: {e}") from None
        if len(ids) > max_len:
            truncated += 1
            ids, trained = ids[:max_len], trained[:max_len]
            if not any(trained[1:]):                                # nothing of the response is left to learn from
                dropped += 1
                continue
        examples.append((ids, trained))
        source.append(n)
    return examples, source, {"examples": len(examples), "truncated": truncated, "dropped": dropped}
