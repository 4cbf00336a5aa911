"""Function calling: the formats the output is held to, and reading calls back from the output.

- tool_choice "required": the output is a JSON array of calls, each {"name": one of the tools,
  "arguments": that tool's parameters}, one or more (exactly one without parallel_tool_calls); a named
  function: the output is that function's arguments. Both are JSON schemas enforced like any structured
  output, so the calls always parse and their arguments always validate (as vLLM does).
- tool_choice "auto": the model writes calls in its own format; a parser reads them back. ``hermes``:
  ``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` (Qwen2.5, Hermes, kvloom's
  templates/chatml_tools.jinja), picked when the chat template mentions <tool_call>.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
PARSERS = ("hermes",)


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text

    def to_openai(self, index: int | None = None) -> dict:
        call = {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        return call if index is None else {"index": index, **call}


def required_schema(tools: list[dict], parallel: bool) -> dict:
    """The JSON schema of tool_choice "required": an array of calls of the given tools."""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t["name"]},
                "arguments": t.get("parameters") or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    array = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
    if not parallel:
        array["maxItems"] = 1
    return array


def named_schema(tool: dict) -> dict:
    return tool.get("parameters") or {"type": "object"}


def calls_from_required(text: str) -> list[ToolCall]:
    return [ToolCall(c["name"], json.dumps(c["arguments"], ensure_ascii=False)) for c in json.loads(text)]


_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
HERMES_START = "<tool_call>"


def parse_hermes(text: str, names: set[str]) -> tuple[str | None, list[ToolCall]]:
    """(content before the calls, or None; the calls) from a Hermes-format output. A block that is not
    a JSON object naming a defined function is left in the content, as text."""
    calls = []
    for m in _HERMES.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except ValueError:
            continue
        if isinstance(obj, dict) and obj.get("name") in names:
            arguments = obj.get("arguments", obj.get("parameters", {}))
            calls.append(ToolCall(obj["name"], json.dumps(arguments, ensure_ascii=False)))
    if not calls:
        return text, []
    content = text[: text.find(HERMES_START)].strip()
    return content or None, calls


def pick_parser(chat_template: str | None) -> str | None:
    """The parser the chat template's format calls for, or None."""
    if chat_template and "<tool_call>" in chat_template:
        return "hermes"
    return None


def read_template(value: str) -> str:
    """--chat-template: a file, or one of kvloom's (templates/NAME.jinja), or the template itself."""
    path = Path(value)
    if path.is_file():
        return path.read_text()
    shipped = TEMPLATES / f"{value}.jinja"
    if shipped.is_file():
        return shipped.read_text()
    if "{%" in value or "{{" in value:
        return value
    shipped_names = sorted(p.stem for p in TEMPLATES.glob("*.jinja"))
    raise ValueError(f"chat_template: {value} is neither a file nor one of kvloom's: {shipped_names}")
