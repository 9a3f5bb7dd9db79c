"""Render a Hugging Face chat template the way transformers does, with jinja2 only (a fixture/test helper).

This is not used by the project's modules: it exists so tests can compare the project's own prompt formatting
against the real, verbatim `chat_template` strings kept in tests/fixtures/chat_templates.json, without needing
transformers or torch.

What transformers does (`transformers.utils.chat_template_utils`, `_compile_jinja_template` / `render_jinja_template`):
  * environment: jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
    extensions=[<its AssistantTracker>, jinja2.ext.loopcontrols]);
  * filter `tojson`: json.dumps(x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys);
  * globals `raise_exception(message)` (raises jinja2.exceptions.TemplateError) and `strftime_now(format)`;
  * render(messages=..., tools=None, documents=None, add_generation_prompt=..., **special_tokens_map, **kwargs),
    where special_tokens_map holds only the special tokens the tokenizer has set: a `bos_token` of None is left
    undefined (and so renders as ''), never passed as None (which would render as 'None').
AssistantTracker's `{% generation %}...{% endgeneration %}` block is supported here as a plain pass-through (no
assistant-mask bookkeeping); none of the fixture's official templates use it.

Usage from a test:
    from render_chat_template import render          # tests/ and . are on pytest's pythonpath; scripts/ is not:
                                                       # sys.path.insert(0, str(ROOT / "scripts")) first
    text = render(entry["chat_template"], messages, add_generation_prompt=True,
                  bos_token=entry["bos_token"], eos_token=entry["eos_token"])

From the command line (prints repr()s of the standard renderings of every fixture entry):
    python scripts/render_chat_template.py [tests/fixtures/chat_templates.json]
"""
from __future__ import annotations

import json
import sys
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["render", "compile_template", "STANDARD_CONVERSATIONS"]


class _GenerationPassThrough(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` as transformers' AssistantTracker parses it, rendered as its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' own tojson: unlike jinja2's built-in filter it does not HTML-escape.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


@lru_cache(maxsize=64)
def compile_template(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationPassThrough, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def render(template: str, messages, add_generation_prompt: bool = False, bos_token=None, eos_token=None,
           **extra) -> str:
    """The text `tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` gives.

    bos_token / eos_token: the tokenizer's special-token strings; None means the tokenizer has none (the template
    then sees the name undefined). extra: further template variables (e.g. enable_thinking=False for Qwen3, tools,
    or other special tokens such as pad_token); tools and documents default to None as in transformers.
    """
    kwargs = {"tools": None, "documents": None}
    for name, value in (("bos_token", bos_token), ("eos_token", eos_token)):
        if value is not None:
            kwargs[name] = value
    kwargs.update(extra)
    return compile_template(template).render(messages=list(messages),
                                             add_generation_prompt=add_generation_prompt, **kwargs)


# The three conversations the fixture's renderings are made from: (name, messages, add_generation_prompt).
STANDARD_CONVERSATIONS = (
    ("system_user_gen", [{"role": "system", "content": "SYS"}, {"role": "user", "content": "USER"}], True),
    ("user_only_gen", [{"role": "user", "content": "USER"}], True),
    ("system_user_assistant", [{"role": "system", "content": "SYS"}, {"role": "user", "content": "USER"},
                               {"role": "assistant", "content": "ASSIST"}], False),
)


def _main(argv) -> int:
    path = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent / "tests/fixtures/chat_templates.json"
    fixture = json.loads(path.read_text(encoding="utf-8"))
    for name, entry in fixture.items():
        if not isinstance(entry, dict) or "chat_template" not in entry:
            continue
        print(f"== {name}")
        for conv, messages, gen in STANDARD_CONVERSATIONS:
            try:
                text = repr(render(entry["chat_template"], messages, add_generation_prompt=gen,
                                   bos_token=entry.get("bos_token"), eos_token=entry.get("eos_token")))
            except jinja2.exceptions.TemplateError as e:
                text = f"TemplateError: {e}"
            print(f"  {conv}: {text}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv))
