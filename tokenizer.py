"""The tokenizer of a checkpoint folder and the chat templates of the model families in use (Sec. 5.1, Appendix C.1).

    tok = load_tokenizer(path)                       # tokenizer.json, tokenizer_config.json, generation_config.json
                                                     # (and chat_template.jinja); family="alpaca" etc.: --template
    ids, trained = tok.encode_messages(messages)     # a conversation; the loss sees the assistant turns only
    prompt_ids, response_ids = tok.encode_example(instruction, response)    # one turn; ends with the turn's end

Template families, detected from the checkpoint's chat template: chat_template.jinja, else tokenizer_config.json's
chat_template (transformers' order); a --template flag overrides it. A checkpoint with no template, or one of a family
not listed here, is an error asking for --template (a base model: --template alpaca). Each renders a conversation as
the checkpoint's own Jinja chat_template does (tests/test_templates.py checks the text against the real template
strings in tests/fixtures/chat_templates.json):
    chatml          <|im_start|>user\n...<|im_end|>\n<|im_start|>assistant\n   SmolLM2, Qwen2/2.5(-Coder), Qwen3
    llama3          <|start_header_id|>user<|end_header_id|>\n\n...<|eot_id|>   Llama-3-Instruct
    mistral         [INST] ...[/INST]                                        Mistral-Instruct v0.3
    mistral-v1       [INST] ... [/INST]                                      Mistral-Instruct v0.1, v0.2
    codellama       [INST] ... [/INST]  (with <<SYS>> for a system turn)     CodeLlama-Instruct
    deepseek-coder  ### Instruction:\n...\n### Response:\n                    DeepSeek-Coder-Instruct (7B-v1.5 too)
    deepseek        User: ...\n\nAssistant:                                   DeepSeek-LLM chat
    alpaca          ### Instruction: ... ### Response:                         base models (Evol-CodeAlpaca's prompt)
"""
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from cli import CheckpointError
from default_model import default_model_path


ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
                "### Input:\n{input}\n\n### Response:\n")
FAMILIES = ("chatml", "llama3", "mistral", "mistral-v1", "codellama", "deepseek-coder", "deepseek", "alpaca")
BOS_FAMILIES = ("llama3", "mistral", "mistral-v1", "codellama", "deepseek-coder", "deepseek")  # templates open with BOS
DEEPSEEK_CODER_SYSTEM = ("You are an AI programming assistant, utilizing the Deepseek Coder model, developed by Deepseek "
                         "Company, and you only answer questions related to computer science. For politically sensitive "
                         "questions, security and privacy issues, and other non-computer science questions, you will "
                         "refuse to answer")
ROLES = ("system", "user", "assistant")


@dataclass
class Tokenizer:
    """`tokenizers` wrapper with the ids and the chat template of one model family."""
    tok: object
    bos_id: Optional[int]
    eos_id: int
    pad_id: int
    eos_ids: set = field(default_factory=set)
    family: str = "alpaca"
    adds_bos: bool = False          # does the checkpoint's tokenizer put BOS in front of a text?
    system: str = ""                # the default system prompt of the checkpoint's chat template (ChatML)
    think: bool = False             # Qwen3's template: an empty <think></think> before the last answer

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

    def _text(self, i) -> str:
        return self.tok.id_to_token(i) if i is not None else ""

    # -- the chat template, piece by piece ---------------------------------------------------------------------
    def turns(self, messages, add_generation_prompt=False) -> list:
        """The conversation as the family's chat template renders it, cut into pieces (text, trained): trained
        marks an assistant turn's content and the token that ends it, what Eq. (1)'s loss sees. The template's
        leading BOS is not a piece: encode_messages adds it where the checkpoint's tokenizer does."""
        messages = check_messages(messages)
        system, rest = (messages[0]["content"], messages[1:]) if messages[0]["role"] == "system" else (None, messages)
        eos, bos = self._text(self.eos_id), self._text(self.bos_id)
        out = []
        if self.family == "chatml":        # SmolLM2 and Qwen2/2.5 put a default system turn first; Qwen3 none
            system = self.system if system is None else system
            if system:
                out.append((f"<|im_start|>system\n{system}<|im_end|>\n", False))
            for i, m in enumerate(rest):
                if m["role"] == "user":
                    out.append((f"<|im_start|>user\n{m['content']}<|im_end|>\n", False))
                elif self.think and i == len(rest) - 1:   # Qwen3: an empty thought before the last answer
                    out += [("<|im_start|>assistant\n<think>\n\n</think>\n\n", False),
                            (m["content"].lstrip("\n") + "<|im_end|>", True), ("\n", False)]
                else:
                    out += [("<|im_start|>assistant\n", False), (m["content"] + "<|im_end|>", True), ("\n", False)]
            if add_generation_prompt:       # Qwen3: its non-thinking mode (enable_thinking=False), as trained
                out.append(("<|im_start|>assistant\n" + ("<think>\n\n</think>\n\n" if self.think else ""), False))
        elif self.family == "llama3":      # Llama-3-Instruct: contents are trimmed
            head = "<|start_header_id|>{}<|end_header_id|>\n\n"
            for m in messages:
                if m["role"] == "assistant":
                    out += [(head.format("assistant"), False), (m["content"].strip() + "<|eot_id|>", True)]
                else:
                    out.append((head.format(m["role"]) + m["content"].strip() + "<|eot_id|>", False))
            if add_generation_prompt:
                out.append((head.format("assistant"), False))
        elif self.family in ("mistral", "mistral-v1"):
            # v0.3 on: "[INST] u[/INST] a</s>", a system turn joins the user turn only when it is the LAST message
            # (so a training conversation drops it, as the template does). v0.1/v0.2: " [INST] u [/INST] a</s>",
            # the system turn joins the first user turn.
            v1 = self.family == "mistral-v1"
            for i, m in enumerate(rest):
                if m["role"] == "user":
                    joins = system is not None and (i == 0 if v1 else i == len(rest) - 1)
                    content = f"{system}\n\n{m['content']}" if joins else m["content"]
                    out.append((f" [INST] {content} [/INST]" if v1 else f"[INST] {content}[/INST]", False))
                else:
                    out.append((" " + (m["content"] if v1 else m["content"].strip()) + eos, True))
        elif self.family == "codellama":   # CodeLlama-Instruct: BOS before every user turn, contents trimmed
            for i, m in enumerate(rest):
                if m["role"] == "user":
                    content = m["content"] if i or system is None else f"<<SYS>>\n{system}\n<</SYS>>\n\n{m['content']}"
                    out.append(((bos if i else "") + f"[INST] {content.strip()} [/INST]", False))
                else:
                    out.append((" " + m["content"].strip() + " " + eos, True))
        elif self.family == "deepseek-coder":   # DeepSeek-Coder-Instruct (1.3b .. 33b, 7b-v1.5): a default system text
            out.append((DEEPSEEK_CODER_SYSTEM + "\n" if system is None else system, False))
            for m in rest:
                if m["role"] == "user":
                    out.append((f"### Instruction:\n{m['content']}\n", False))
                else:
                    out += [("### Response:\n", False), (m["content"] + "\n<|EOT|>", True), ("\n", False)]
            if add_generation_prompt:
                out.append(("### Response:\n", False))
        elif self.family == "deepseek":    # the DeepSeek-LLM chat format
            if system is not None:
                out.append((system + "\n\n", False))
            for m in rest:
                if m["role"] == "user":
                    out.append((f"User: {m['content']}\n\n", False))
                else:
                    out += [("Assistant:", False), (" " + m["content"] + eos, True)]
            if add_generation_prompt:
                out.append(("Assistant:", False))
        else:                              # alpaca: base models (Evol-CodeAlpaca's prompt); no system turn
            for m in rest:
                if m["role"] == "user":        # an Alpaca record's input (data.py) gets its own block
                    inst, inp = m.get("alpaca") or (m["content"], "")
                    out.append((ALPACA_INPUT.format(instruction=inst, input=inp) if inp else
                                ALPACA.format(instruction=inst), False))
                else:
                    out.append((m["content"] + eos, True))
        return out

    def render(self, messages, add_generation_prompt=False) -> str:
        """The conversation's text, as the checkpoint's chat_template renders it (BOS included where it does)."""
        bos = self._text(self.bos_id) if self.family in BOS_FAMILIES else ""
        return bos + "".join(text for text, _ in self.turns(messages, add_generation_prompt))

    def encode_messages(self, messages) -> tuple:
        """(ids, trained): the conversation's token ids and, per token, whether the loss sees it (the assistant
        turns, each through the token that ends it). Runs of pieces are encoded separately at the trained/untrained
        boundaries; the untrained tail after the last assistant turn is left out."""
        pieces = self.turns(messages)
        while pieces and not pieces[-1][1]:
            pieces.pop()
        if not pieces:
            raise ValueError("no assistant turn to learn from")
        ids, trained = [], []
        for flag in _runs(pieces):
            text = "".join(t for t, f in flag)
            part = self.encode(text, add_bos=None if not ids else False)
            ids += part
            trained += [flag[0][1]] * len(part)
        return ids, trained

    def prompt(self, instruction: str, system: Optional[str] = None) -> str:
        """The templated prompt text of one user turn; the response starts right after it."""
        messages = ([{"role": "system", "content": system}] if system is not None else []) + \
            [{"role": "user", "content": instruction}]
        return "".join(text for text, _ in self.turns(messages, add_generation_prompt=True))

    def encode_example(self, instruction: str, response: str) -> tuple:
        """(prompt_ids, response_ids) of one turn: BOS where the family uses one; the response ends with the token
        that ends the turn (EOS; <|im_end|>, <|eot_id|> or <|EOT|> in the templates that use one)."""
        ids, trained = self.encode_messages([{"role": "user", "content": instruction},
                                             {"role": "assistant", "content": response}])
        n = trained.index(True)
        return ids[:n], ids[n:]


def _runs(pieces) -> list:
    """Consecutive pieces with the same trained flag, grouped."""
    out = []
    for p in pieces:
        if out and out[-1][-1][1] == p[1]:
            out[-1].append(p)
        else:
            out.append([p])
    return out


def check_messages(messages) -> list:
    """A conversation: an optional system turn first, then user and assistant turns alternating, starting with a
    user turn; every content a string. Raises ValueError saying what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be {{\"role\": system|user|assistant, \"content\": string}}")
        if m["role"] == "system" and i:
            raise ValueError(f"message {i}: a system turn may only come first")
    rest = messages[1:] if messages[0]["role"] == "system" else messages
    for i, m in enumerate(rest):
        if m["role"] != ("user" if i % 2 == 0 else "assistant"):
            raise ValueError("turns must alternate user/assistant, starting with user")
    if not rest:
        raise ValueError("no user turn")
    return messages


def _detect_family(chat_template: Optional[str]) -> Optional[str]:
    """The family whose rendering the template's text shows, or None (no template, or one of no family here)."""
    if not chat_template:
        return None
    if "<|im_start|>" in chat_template:
        return "chatml"
    if "<|start_header_id|>" in chat_template:
        return "llama3"
    if "<<SYS>>" in chat_template:
        return "codellama"
    if "' [INST] '" in chat_template:
        return "mistral-v1"
    if "[INST]" in chat_template:
        return "mistral"
    if "### Instruction:" in chat_template and "<|EOT|>" in chat_template:
        return "deepseek-coder"
    if "User: " in chat_template and "Assistant:" in chat_template:
        return "deepseek"
    return None


def _default_system(chat_template: Optional[str]) -> str:
    """The system prompt a ChatML template writes when the conversation has none (SmolLM2: "You are a helpful AI
    assistant named SmolLM, ..."; Qwen2.5: "You are Qwen, created by Alibaba Cloud. ..."), or ""."""
    m = re.search(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}+\\]*?)<\|im_end\|>", chat_template or "")
    return m.group(1) if m else ""


def _read_json(file: Path) -> dict:
    """A JSON object file of the checkpoint folder ({} when it is absent); unreadable, a CheckpointError naming it."""
    if not file.exists():
        return {}
    try:
        obj = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:                # ValueError: invalid JSON or invalid UTF-8
        raise CheckpointError(f"{file}: cannot be read as JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return obj


def read_chat_template(path: Path, tcfg: dict) -> tuple:
    """(template text, the file it came from): chat_template.jinja, else tokenizer_config.json's chat_template (the
    order transformers reads them in); (None, None) when the folder has neither."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8"), jinja
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{jinja}: cannot be read ({e})") from None
    template = tcfg.get("chat_template")
    if isinstance(template, list):  # some checkpoints store named templates
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    return (template, path / "tokenizer_config.json") if isinstance(template, str) and template else (None, None)


def load_tokenizer(path=None, family=None) -> Tokenizer:
    """Tokenizer of a checkpoint folder (tokenizer.json + tokenizer_config.json + generation_config.json, and
    chat_template.jinja where there is one). `family` (--template) overrides the family the chat template shows."""
    from tokenizers import Tokenizer as HFTokenizer
    path = Path(path) if path is not None else default_model_path()
    tj = path / "tokenizer.json"
    if not tj.exists():
        raise CheckpointError(f"{tj}: not found (a tokenizer.json is required)")
    try:
        tok = HFTokenizer.from_file(str(tj))
    except Exception as e:
        raise CheckpointError(f"{tj}: cannot be read ({e})") from None
    tcfg = _read_json(path / "tokenizer_config.json")
    cfg = _read_json(path / "config.json")
    gen = _read_json(path / "generation_config.json")

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
    template, source = read_chat_template(path, tcfg)
    fam = family or _detect_family(template)
    choose = f"pass --template (one of {', '.join(FAMILIES)}; alpaca for a base model)"
    if fam is None and template is None:
        raise CheckpointError(f"{path}: no chat template (no chat_template.jinja, no chat_template in "
                              f"tokenizer_config.json); {choose}")
    if fam is None:
        raise CheckpointError(f"{source}: a chat template of no family this project renders; {choose}")
    if fam not in FAMILIES:
        raise ValueError(f"unknown template family '{fam}' (choose from {', '.join(FAMILIES)})")
    system = _default_system(template) if fam == "chatml" else ""
    end_of_turn = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "deepseek-coder": "<|EOT|>"}.get(fam)
    if end_of_turn and tok.token_to_id(end_of_turn) is not None:    # a base model's EOS may be another token
        eos_ids.add(tok.token_to_id(end_of_turn))
    return Tokenizer(tok=tok, bos_id=bos, eos_id=eos, pad_id=pad if pad is not None else eos, eos_ids=eos_ids,
                     family=fam, adds_bos=adds_bos, system=system, think=fam == "chatml" and "<think>" in (template or ""))
