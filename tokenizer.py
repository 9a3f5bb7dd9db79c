"""The tokenizer of a checkpoint folder and the prompt templates of the model families in use (Sec. 5.1, Appendix C.1).

    tok = load_tokenizer(path)                       # tokenizer.json, tokenizer_config.json, generation_config.json
    prompt_ids, response_ids = tok.encode_example(instruction, response)    # the response ends with EOS

Four families, detected from the checkpoint's chat template (a --template flag overrides it):
    chatml     <|im_start|>user ... <|im_end|>              SmolLM2-Instruct, Qwen
    deepseek   User: ...\n\nAssistant:                       DeepSeek-Coder-7B-Instruct-v1.5
    codellama  [INST] ... [/INST]                           CodeLlama-Instruct
    alpaca     ### Instruction: ... ### Response:           base models (Evol-CodeAlpaca's prompt)
"""
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from cli import CheckpointError
from default_model import default_model_path


ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
FAMILIES = ("chatml", "deepseek", "codellama", "alpaca")


@dataclass
class Tokenizer:
    """`tokenizers` wrapper with the ids and the prompt template of one model family."""
    tok: object
    bos_id: Optional[int]
    eos_id: int
    pad_id: int
    eos_ids: set = field(default_factory=set)
    family: str = "alpaca"
    adds_bos: bool = False          # does the checkpoint's tokenizer put BOS in front of a text?
    system: str = ""                # ChatML default system prompt, from the checkpoint's chat template

    def encode(self, text, add_bos=None) -> list:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if (self.adds_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens=True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self):
        return self.tok.get_vocab_size()

    def prompt(self, instruction: str) -> str:
        """The templated prompt text; the response starts right after it."""
        if self.family == "chatml":        # SmolLM2-Instruct
            sys_part = f"<|im_start|>system\n{self.system}<|im_end|>\n" if self.system else ""
            return f"{sys_part}<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"
        if self.family == "deepseek":      # DeepSeek-Coder-7B-Instruct-v1.5 (DeepSeek-LLM chat format)
            return f"User: {instruction}\n\nAssistant:"
        if self.family == "codellama":     # CodeLlama-Instruct
            return f"[INST] {instruction.strip()} [/INST]"
        return ALPACA.format(instruction=instruction)      # base models (Evol-CodeAlpaca's prompt)

    def response_text(self, response: str) -> str:
        """How a response follows the prompt in the family's template (before EOS)."""
        if self.family == "codellama":
            return " " + response.strip()
        return " " + response if self.family == "deepseek" else response

    def encode_example(self, instruction: str, response: str) -> tuple:
        """(prompt_ids, response_ids): BOS where the family uses one; the response ends with EOS."""
        return self.encode(self.prompt(instruction)), self.encode(self.response_text(response), add_bos=False) + [self.eos_id]


def _detect_family(chat_template: Optional[str]) -> str:
    if not chat_template:
        return "alpaca"
    if "<|im_start|>" in chat_template:
        return "chatml"
    if "[INST]" in chat_template:
        return "codellama"
    if "User: " in chat_template and "Assistant:" in chat_template:
        return "deepseek"
    print("warning: unrecognized chat template; using the Alpaca-style prompt (pass --template to choose)",
          file=sys.stderr)
    return "alpaca"


def load_tokenizer(path=None, family=None) -> Tokenizer:
    """Tokenizer of a checkpoint folder (tokenizer.json + tokenizer_config.json + generation_config.json)."""
    from tokenizers import Tokenizer as HFTokenizer
    path = Path(path) if path is not None else default_model_path()
    tj = path / "tokenizer.json"
    if not tj.exists():
        raise CheckpointError(f"{tj}: not found (a tokenizer.json is required)")
    try:
        tok = HFTokenizer.from_file(str(tj))
    except Exception as e:
        raise CheckpointError(f"{tj}: cannot be read ({e})") from None
    tcfg_file = path / "tokenizer_config.json"
    tcfg = json.loads(tcfg_file.read_text()) if tcfg_file.exists() else {}
    cfg = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
    gen_file = path / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.exists() else {}

    def tok_id(spec, fallback_key):
        if isinstance(spec, dict):
            spec = spec.get("content")
        if isinstance(spec, str):
            i = tok.token_to_id(spec)
            if i is not None:
                return i
        v = cfg.get(fallback_key)
        return v[0] if isinstance(v, list) else v

    bos = tok_id(tcfg.get("bos_token"), "bos_token_id")
    eos = tok_id(tcfg.get("eos_token"), "eos_token_id")
    if eos is None:
        raise CheckpointError(f"{path}: no EOS token in tokenizer_config.json or config.json")
    pad = tok_id(tcfg.get("pad_token"), "pad_token_id")
    eos_ids = {eos}
    for src in (cfg.get("eos_token_id"), gen.get("eos_token_id")):
        eos_ids.update(src if isinstance(src, list) else [src] if src is not None else [])
    # Does the checkpoint's tokenizer add BOS? tokenizer_config says so explicitly for Llama/DeepSeek/CodeLlama;
    # otherwise ask the post-processor.
    if "add_bos_token" in tcfg:
        adds_bos = bool(tcfg["add_bos_token"])
    else:
        adds_bos = bos is not None and tok.encode("a", add_special_tokens=True).ids[:1] == [bos]
    template = tcfg.get("chat_template")
    if isinstance(template, list):  # some checkpoints store named templates
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    fam = family or _detect_family(template)
    if fam not in FAMILIES:
        raise ValueError(f"unknown template family '{fam}' (choose from {', '.join(FAMILIES)})")
    system = ""
    if fam == "chatml" and template and "You are a helpful AI assistant named SmolLM" in template:
        system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    return Tokenizer(tok=tok, bos_id=bos, eos_id=eos, pad_id=pad if pad is not None else eos, eos_ids=eos_ids,
                     family=fam, adds_bos=adds_bos, system=system)
