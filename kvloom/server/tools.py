"""Function calling: the formats the output is held to, and reading calls back from the output.

- tool_choice "required": the output is a JSON array of calls, each {"name": one of the tools,
  "arguments": that tool's parameters}, one or more (exactly one without parallel_tool_calls); a named
  function: the output is that function's arguments. Both are JSON schemas enforced like any structured
  output, so the calls always parse and their arguments always validate (as vLLM does).
- tool_choice "auto": the model writes calls in its own format; a parser reads them back, picked from
  the chat template's markers (``pick_parser``) or given with --tool-call-parser:
  ``hermes``: ``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` (Qwen2.5, Hermes, kvloom's
  templates/chatml_tools.jinja); ``llama3_json``: ``{"name": ..., "parameters": ...}`` objects, after an
  optional ``<|python_tag|>``, separated by ";" (Llama 3.1-3.3); ``mistral``: ``[TOOL_CALLS]`` then a
  JSON array of ``{"name", "arguments"}``, or ``name[ARGS]{...}`` per call (Mistral's newer templates).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvloom import templates


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


_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_DECODER = json.JSONDecoder()


def _call(obj: object, names: set[str], key: str = "arguments") -> ToolCall | None:
    """A call from a parsed object naming a defined function, or None."""
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    arguments = obj.get(key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(arguments, str):  # some models write the arguments as JSON text
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    return ToolCall(obj["name"], json.dumps(arguments, ensure_ascii=False))


def parse_hermes(text: str, names: set[str]) -> tuple[str | None, list[ToolCall]]:
    """(content before the calls, or None; the calls). A block that is not a JSON object naming a defined
    function is left in the content, as text."""
    calls = []
    for m in _HERMES.finditer(text):
        try:
            call = _call(json.loads(m.group(1)), names)
        except ValueError:
            continue
        if call is not None:
            calls.append(call)
    return _split(text, text.find("<tool_call>"), calls)


def parse_llama3_json(text: str, names: set[str]) -> tuple[str | None, list[ToolCall]]:
    """Llama 3.1+: the output is one or more JSON call objects (after <|python_tag|>), ";"-separated."""
    tag = text.find("<|python_tag|>")
    body = text[tag + len("<|python_tag|>") :] if tag >= 0 else text
    calls, at = [], 0
    body = body.rstrip()
    while at < len(body):
        at = len(body) - len(body[at:].lstrip(" \n;"))
        if at >= len(body):
            break
        try:
            obj, end = _DECODER.raw_decode(body, at)
        except ValueError:
            return text, []  # not (only) calls: all of it is text
        call = _call(obj, names, "parameters")
        if call is None:
            return text, []
        calls.append(call)
        at = end
    return _split(text, max(tag, 0), calls)


def parse_mistral(text: str, names: set[str]) -> tuple[str | None, list[ToolCall]]:
    """[TOOL_CALLS] then a JSON array of calls, or name[ARGS]{...} for each call."""
    at = text.find("[TOOL_CALLS]")
    if at < 0:
        return text, []
    calls = []
    for part in text[at:].split("[TOOL_CALLS]")[1:]:
        part = part.strip()
        if "[ARGS]" in part:
            name, _, args = part.partition("[ARGS]")
            try:
                call = _call({"name": name.strip(), "arguments": json.loads(args)}, names)
            except ValueError:
                call = None
            calls += [call] if call is not None else []
            continue
        try:
            items = json.loads(part)
        except ValueError:
            continue
        for obj in items if isinstance(items, list) else [items]:
            call = _call(obj, names)
            calls += [call] if call is not None else []
    return _split(text, at, calls)


def _split(text: str, start: int, calls: list[ToolCall]) -> tuple[str | None, list[ToolCall]]:
    if not calls:
        return text, []
    content = text[:start].strip()
    return content or None, calls


@dataclass(frozen=True)
class Parser:
    name: str
    parse: Callable[[str, set[str]], tuple[str | None, list[ToolCall]]]
    markers: tuple[str, ...]  # where calls start: streamed text stops before any of them

    def shown(self, text: str, start: int = 0) -> int:
        """How much of a partial output is surely text, not the start of a call (``text[:start]`` was
        already found to be text)."""
        if self.name == "llama3_json" and not text[:start].strip() and text.lstrip().startswith("{"):
            return start  # a bare JSON object is a call until it parses otherwise
        cut = len(text)
        for marker in self.markers:
            at = text.find(marker, start)
            if at >= 0:
                cut = min(cut, at)
                continue
            for n in range(min(len(marker) - 1, len(text) - start), 0, -1):  # a marker begun at the end
                if text.endswith(marker[:n]):
                    cut = min(cut, len(text) - n)
                    break
        return cut


PARSERS = {
    "hermes": Parser("hermes", parse_hermes, ("<tool_call>",)),
    "llama3_json": Parser("llama3_json", parse_llama3_json, ("<|python_tag|>",)),
    "mistral": Parser("mistral", parse_mistral, ("[TOOL_CALLS]",)),
}


def pick_parser(chat_template: str | None) -> str | None:
    """The parser the chat template's format calls for, or None."""
    for marker, name in (
        ("<tool_call>", "hermes"),
        ("[TOOL_CALLS]", "mistral"),
        ("<|python_tag|>", "llama3_json"),
    ):
        if chat_template and marker in chat_template:
            return name
    return None


def read_template(value: str) -> str:
    """--chat-template: a file, or one of kvloom's (templates/NAME.jinja), or the template itself."""
    path = Path(value)
    if path.is_file():
        return path.read_text()
    shipped = templates.read(value)
    if shipped is not None:
        return shipped
    if "{%" in value or "{{" in value:
        return value
    raise ValueError(f"chat_template: {value} is neither a file nor one of kvloom's: {templates.names()}")


class CallStream:
    """One choice's output under tools, as it is written: ``feed`` each new piece of text and get the
    deltas to send; ``finish`` gives the last ones and the finish reason. A delta is ``{"content": text}``
    or ``{"tool_calls": [...]}`` in the shape the OpenAI client assembles: a call's first delta has its
    index, id, type and name; later ones add to its arguments.

    - "named": the output is the arguments: streamed as they are written.
    - "required": the output is a JSON array of {"name", "arguments"} objects (``required_schema``): a
      call is announced once its name is written, and its arguments stream as written.
    - "auto": text is content until a call's marker; the parser reads the calls (hermes blocks as each
      closes, other formats at the end). With no calls, what was held back is content after all.
    """

    def __init__(self, mode: str, parser: Parser | None, names: set[str], function: str | None = None):
        self.mode, self.parser, self.names = mode, parser, names
        self.function = function  # "named": the function's name
        self.text = ""
        self.sent = 0  # "auto": characters of text sent as content
        self.num_calls = 0
        self.scan = 0  # "required": characters scanned; "auto": where the next hermes block may start
        self.calling = False  # "auto": a call's marker was written
        # "required": the JSON scanner (depth counts open [ and {), the call being written
        self.depth, self.in_string, self.escaped = 0, False, False
        self.item_start = -1
        self.args_start = -1  # where the current call's arguments begin, once its name was announced
        self.args_sent = 0
        self.args_begun = False

    def feed(self, delta: str) -> list[dict]:
        self.text += delta
        if self.mode == "named":
            if not delta:
                return []
            if self.num_calls == 0:
                self.num_calls = 1
                return [self._calls(ToolCall(self.function, delta).to_openai(0))]
            return [self._calls({"index": 0, "function": {"arguments": delta}})]
        if self.mode == "required":
            return self._scan_required()
        return self._scan_auto()

    def finish(self, reason: str | None) -> tuple[list[dict], str | None]:
        """The last deltas, and the finish reason ("tool_calls" when calls ended the output)."""
        out: list[dict] = []
        if self.mode == "auto":
            _, calls = self.parser.parse(self.text, self.names)
            out += [
                self._calls(c.to_openai(self.num_calls + i)) for i, c in enumerate(calls[self.num_calls :])
            ]
            self.num_calls = max(self.num_calls, len(calls))
            if not calls and self.sent < len(self.text):  # no calls after all: what was held back is text
                out.append({"content": self.text[self.sent :]})
        if self.num_calls and reason == "stop":
            reason = "tool_calls"
        return out, reason

    @staticmethod
    def _calls(call: dict) -> dict:
        return {"tool_calls": [call]}

    def _scan_auto(self) -> list[dict]:
        out = []
        if not self.calling:
            cut = self.parser.shown(self.text, self.sent)
            if cut > self.sent:
                out.append({"content": self.text[self.sent : cut]})
                self.sent = cut
            at = min((i for m in self.parser.markers if (i := self.text.find(m, self.sent)) >= 0), default=-1)
            if at < 0:
                return out
            self.scan, self.calling = at, True
        if self.parser.name != "hermes":
            return out  # read whole at the end
        while (m := _HERMES.search(self.text, self.scan)) is not None:
            self.scan = m.end()
            try:
                call = _call(json.loads(m.group(1)), self.names)
            except ValueError:
                continue
            if call is not None:
                out.append(self._calls(call.to_openai(self.num_calls)))
                self.num_calls += 1
        return out

    def _scan_required(self) -> list[dict]:
        out = []
        text = self.text
        for pos in range(self.scan, len(text)):
            ch = text[pos]
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
                continue
            if ch == '"':
                self.in_string = True
            elif ch in "[{":
                if self.depth == 1:
                    self.item_start = pos
                self.depth += 1
            elif ch in "]}":
                self.depth -= 1
                if self.depth == 1:  # a call's object closed
                    out += self._end_call(pos)
            elif ch == ":" and self.depth == 2 and self.args_start < 0:
                head = re.fullmatch(
                    r'\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*', text[self.item_start : pos]
                )
                if head is not None:  # the name is written, and now the arguments begin
                    name = json.loads(head.group(1))
                    out.append(self._calls(ToolCall(name, "").to_openai(self.num_calls)))
                    self.args_start = self.args_sent = pos + 1
                    self.args_begun = False
        self.scan = len(text)
        if self.args_start >= 0 and self.args_sent < len(text):
            out += self._arguments(len(text))
        return out

    def _arguments(self, end: int, last: bool = False) -> list[dict]:
        piece = self.text[self.args_sent : end]
        self.args_sent = end
        if not self.args_begun:  # the space after the colon
            piece = piece.lstrip()
            self.args_begun = bool(piece)
        if last:  # what is left before the call's closing brace: the arguments' end, and whitespace
            piece = piece.rstrip()
        if not piece:
            return []
        return [self._calls({"index": self.num_calls, "function": {"arguments": piece}})]

    def _end_call(self, pos: int) -> list[dict]:
        out = []
        if self.args_start >= 0:
            out = self._arguments(pos, last=True)
        else:  # the arguments were written before the name: the call is sent whole
            obj = json.loads(self.text[self.item_start : pos + 1])
            out.append(
                self._calls(
                    ToolCall(obj["name"], json.dumps(obj["arguments"], ensure_ascii=False)).to_openai(
                        self.num_calls
                    )
                )
            )
        self.num_calls += 1
        self.args_start = self.item_start = -1
        return out


def assemble(deltas: list[dict]) -> tuple[str | None, list[dict]]:
    """The content and the tool calls that a list of CallStream deltas add up to (a whole response)."""
    content = "".join(d.get("content", "") for d in deltas)
    calls: list[dict] = []
    for d in deltas:
        for c in d.get("tool_calls", []):
            if c["index"] == len(calls):
                calls.append({k: v for k, v in c.items() if k != "index"} | {"function": dict(c["function"])})
            else:
                calls[c["index"]]["function"]["arguments"] += c["function"]["arguments"]
    if calls:
        return content.strip() or None, calls
    return content, calls
