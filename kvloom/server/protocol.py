"""OpenAI request schemas (pydantic) and their translation into SamplingParams.

Every field is checked here or in SamplingParams, before anything is allocated: numbers must be finite
(NaN, Infinity and 1e999 are refused), integers fit in 64 bits, text must be valid UTF-8 (a lone surrogate
such as "\\ud800" made the tokenizer raise). Fields of OpenAI's request schema that kvloom does not honor
are refused by name (``refuse_unsupported``); fields that are not OpenAI's are ignored and logged once, as
vLLM does, so clients that send vendor extras keep working.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from kvloom.logger import init_logger
from kvloom.sampling_params import INT64_MAX, INT64_MIN, MAX_LOGPROBS, SamplingParams, StructuredOutputsParams
from kvloom.server.tools import named_schema, required_schema

logger = init_logger(__name__)


class OpenAIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _utf8(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid UTF-8 text: a lone surrogate at character {e.start}") from None
    return text


Text = Annotated[str, AfterValidator(_utf8)]
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
Count = Annotated[int, Field(ge=1, le=INT64_MAX)]  # n, best_of, max_tokens: bounded by the engine after

# OpenAI request fields kvloom does not implement yet -> the values that ask for nothing (accepted).
_REFUSED_CHAT: dict[str, tuple] = {
    "functions": ([],),
    "function_call": ("none",),
    "audio": (),
    "modalities": (["text"],),
    "prediction": (),
    "reasoning_effort": (),
    "verbosity": (),
    "web_search_options": (),
    "store": (False,),
    "metadata": ({},),
    "service_tier": ("auto", "default"),
    "prompt_cache_retention": (),
}
# Other engines' extras (vLLM's) that change the output and kvloom does not implement: refused too, since
# ignoring them would answer something other than what was asked (prose for a JSON schema, ...).
_REFUSED_EXTRAS: dict[str, tuple] = {
    name: ()
    for name in (
        "guided_json",
        "guided_regex",
        "guided_choice",
        "guided_grammar",
        "guided_decoding_backend",
        "guided_whitespace_pattern",
        "use_beam_search",
        "length_penalty",
        "prompt_logprobs",
        "bad_words",
        "allowed_token_ids",
        "logits_processors",
        "truncate_prompt_tokens",
        "continue_final_message",
        "chat_template",
        "return_tokens_as_token_ids",
        "documents",
        "vllm_xargs",
    )
} | {"echo": (False,), "spaces_between_special_tokens": (True,)}
_logged_extras: set[str] = set()


def _asks_nothing(value: Any, noop: tuple) -> bool:
    return value is None or any(value == v and type(value) is type(v) for v in noop)


class _Checked(BaseModel):
    """A request body: unknown fields are kept (to refuse or log them), numbers must be finite."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    REFUSED: ClassVar[dict[str, tuple]] = _REFUSED_EXTRAS
    WHERE: ClassVar[str] = ""  # the path of nested objects ("structured_outputs."), for error messages
    STRICT: ClassVar[bool] = False  # refuse every unknown field (nested objects), not only REFUSED ones

    def refuse_unsupported(self) -> None:
        """Raise a 400 naming the first field kvloom would have to ignore; log other unknown fields once."""
        ignored = []
        for name, value in (self.model_extra or {}).items():
            if name in self.REFUSED or self.STRICT:
                if self.STRICT or not _asks_nothing(value, self.REFUSED[name]):
                    where = self.WHERE + name
                    raise OpenAIError(f"{where} is not supported by kvloom", param=where, code="unsupported")
            elif name not in _logged_extras:
                _logged_extras.add(name)
                ignored.append(name)
        if ignored:
            logger.warning("Ignoring request fields that are neither OpenAI's nor kvloom's: %s", ignored)


class StreamOptions(_Checked):
    REFUSED: ClassVar[dict[str, tuple]] = {"include_obfuscation": (False,)}

    include_usage: bool = False


class JsonSchema(_Checked):
    REFUSED: ClassVar[dict[str, tuple]] = {}
    WHERE: ClassVar[str] = "response_format.json_schema."
    STRICT: ClassVar[bool] = True

    name: Text
    description: Text | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Checked):
    """OpenAI's response_format: text (no constraint), json_object or json_schema."""

    REFUSED: ClassVar[dict[str, tuple]] = {}
    WHERE: ClassVar[str] = "response_format."
    STRICT: ClassVar[bool] = True

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


class StructuredOutputs(_Checked):
    """vLLM's structured_outputs extra: exactly one of json, regex, choice, grammar (or json_object)."""

    REFUSED: ClassVar[dict[str, tuple]] = {}
    WHERE: ClassVar[str] = "structured_outputs."
    STRICT: ClassVar[bool] = True

    # NOTE: "json" by its alias: a field of that name would shadow pydantic's BaseModel.json
    json_: dict[str, Any] | Text | None = Field(default=None, alias="json")
    json_object: bool | None = None
    regex: Text | None = None
    choice: list[Text] | None = None
    grammar: Text | None = None


class _SamplingRequest(_Checked):
    """Fields shared by completions and chat completions: OpenAI's, plus vLLM's usual extras."""

    model: Text | None = None
    n: Count = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: Text | list[Text] | None = None
    seed: Int64 | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[Text, float] | None = None
    user: Text | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # NOTE: OpenAI's newer identifiers. kvloom caches every prefix without a key, and a safety identifier
    # stands for the user (the fair policy's party) when ``user`` is absent.
    prompt_cache_key: Text | None = None
    safety_identifier: Text | None = None
    # extras
    top_k: Int64 | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: Int64 | None = 0
    ignore_eos: bool | None = False
    stop_token_ids: list[Int64] | None = None
    skip_special_tokens: bool | None = True
    include_stop_str_in_output: bool | None = False
    priority: Int64 | None = 0  # lower first, under --scheduling-policy priority
    cache_salt: Text | None = None  # requests with different salts never share prefix-cache blocks
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None  # vLLM's extra

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.stream_options is not None:
            if not self.stream:
                raise OpenAIError("stream_options needs stream to be true", param="stream_options")
            self.stream_options.refuse_unsupported()
        if self.response_format is not None:
            self.response_format.refuse_unsupported()
            if self.response_format.json_schema is not None:
                self.response_format.json_schema.refuse_unsupported()
        if self.structured_outputs is not None:
            self.structured_outputs.refuse_unsupported()

    def structured(self) -> tuple[StructuredOutputsParams | None, str]:
        """The format asked for (response_format or structured_outputs) and the field that asked."""
        rf = self.response_format
        wants_format = rf is not None and rf.type != "text"
        if wants_format and self.structured_outputs is not None:
            raise OpenAIError("give response_format or structured_outputs, not both", param="response_format")
        try:
            if self.structured_outputs is not None:
                so = self.structured_outputs
                return StructuredOutputsParams(
                    json=so.json_,
                    json_object=bool(so.json_object),
                    regex=so.regex,
                    choice=so.choice,
                    grammar=so.grammar,
                ), "structured_outputs"
            if not wants_format:
                return None, ""
            if rf.type == "json_object":
                return StructuredOutputsParams(json_object=True), "response_format"
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise OpenAIError(
                    "response_format of type json_schema needs json_schema.schema", param="response_format"
                )
            return StructuredOutputsParams(json=rf.json_schema.schema_), "response_format"
        except ValueError as e:
            field = "response_format" if self.structured_outputs is None else "structured_outputs"
            raise OpenAIError(str(e).replace("structured_outputs", field, 1), param=field) from None

    def scheduling(self) -> dict:
        """What LLMEngine.add_request takes beside the sampling parameters."""
        return {
            "priority": self.priority or 0,
            "user": self.user if self.user is not None else self.safety_identifier,
            "cache_salt": self.cache_salt,
        }

    def _sampling_params(self, max_tokens: int, logprobs: int | None, **extra: Any) -> SamplingParams:
        return SamplingParams(
            n=self.n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p,
            # NOTE: 0 is refused by SamplingParams, not turned into 1.0 (which is "off").
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=self.logit_bias,
            seed=self.seed,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens or 0,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids or [],
            include_stop_str_in_output=bool(self.include_stop_str_in_output),
            ignore_eos=bool(self.ignore_eos),
            skip_special_tokens=self.skip_special_tokens is not False,
            logprobs=logprobs,
            structured_outputs=self.structured()[0],
            **extra,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingRequest):
    REFUSED: ClassVar[dict[str, tuple]] = {k: v for k, v in _REFUSED_EXTRAS.items() if k != "echo"}

    prompt: Text | list[Text] | list[Int64] | list[list[Int64]]
    max_tokens: Count | None = 16
    best_of: Count | None = None
    echo: bool | None = False
    logprobs: Int64 | None = None
    suffix: Text | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.suffix:
            raise OpenAIError("suffix is not supported by kvloom", param="suffix", code="unsupported")

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        # echo with logprobs reports the prompt's logprobs too (as OpenAI's legacy API does).
        prompt_logprobs = self.logprobs if (self.echo and self.logprobs is not None) else None
        return self._sampling_params(
            max_tokens, self.logprobs, best_of=self.best_of, prompt_logprobs=prompt_logprobs
        )

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [p]  # one prompt of token ids
        if not p:
            raise OpenAIError("prompt must not be empty", param="prompt")
        return list(p)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Text
    text: Text | None = None


class FunctionCall(BaseModel):
    name: Text
    arguments: Text  # JSON text, as OpenAI sends it


class ToolCallIn(BaseModel):
    """An assistant message's earlier tool call, given back in the history."""

    id: Text | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDef(_Checked):
    REFUSED: ClassVar[dict[str, tuple]] = {}
    WHERE: ClassVar[str] = "tools[].function."
    STRICT: ClassVar[bool] = True

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # the arguments always follow the schema here, strict or not


class Tool(_Checked):
    REFUSED: ClassVar[dict[str, tuple]] = {}
    WHERE: ClassVar[str] = "tools[]."
    STRICT: ClassVar[bool] = True

    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    name: Text


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None  # given to the chat template, as vLLM does
    tool_call_id: Text | None = None
    tool_calls: list[ToolCallIn] | None = None  # an assistant's earlier calls
    # OpenAI's, not implemented: refused when set.
    function_call: Any | None = None
    audio: Any | None = None

    def conversation_entry(self, index: int) -> dict[str, Any]:
        """This message as the chat template sees it; raises a 400 naming what kvloom cannot give it."""
        for name in ("function_call", "audio"):
            if getattr(self, name):
                where = f"messages[{index}].{name}"
                raise OpenAIError(f"{where} is not supported by kvloom", param=where, code="unsupported")
        entry: dict[str, Any] = {"role": self.role, "content": self.text(index)}
        for name in ("name", "tool_call_id"):
            if getattr(self, name) is not None:
                entry[name] = getattr(self, name)
        if self.tool_calls:
            calls = []
            for j, call in enumerate(self.tool_calls):
                try:  # templates take the arguments as an object (transformers' convention)
                    arguments = json.loads(call.function.arguments)
                except ValueError:
                    where = f"messages[{index}].tool_calls[{j}].function.arguments"
                    raise OpenAIError(f"{where} must be JSON text", param=where) from None
                calls.append(
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.function.name, "arguments": arguments},
                    }
                )
            entry["tool_calls"] = calls
        return entry

    def text(self, index: int = 0) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                where = f"messages[{index}].content"
                raise OpenAIError(f"{where}: unsupported content part type {part.type!r}", param=where)
            parts.append(part.text)
        return "".join(parts)


class ChatCompletionRequest(_SamplingRequest):
    REFUSED: ClassVar[dict[str, tuple]] = _REFUSED_CHAT | _REFUSED_EXTRAS

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Count | None = None
    max_completion_tokens: Count | None = None
    logprobs: bool | None = False
    top_logprobs: Int64 | None = None
    add_generation_prompt: bool | None = True
    chat_template_kwargs: dict[Text, Any] | None = None  # extra variables for the template (vLLM's)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = True

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        for tool in self.tools or []:
            tool.refuse_unsupported()
            tool.function.refuse_unsupported()
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) < len(names):
            raise OpenAIError("tools: two functions have the same name", param="tools")
        choice = self.tool_choice
        if choice not in (None, "none") and not self.tools:
            raise OpenAIError("tool_choice needs tools", param="tool_choice")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise OpenAIError(f"tool_choice: no tool is named {choice.function.name!r}", param="tool_choice")
        if self.tool_mode in ("required", "named") and (self.stop or self.stop_token_ids):
            field = "stop" if self.stop else "stop_token_ids"
            raise OpenAIError(
                f"{field}: tool_choice required or a named function makes the output a whole call, which a "
                "stop could cut short; leave it out",
                param=field,
            )

    @property
    def tool_mode(self) -> str | None:
        """None (no tools in play), "auto", "required" or "named"."""
        if not self.tools or self.tool_choice == "none":
            return None
        if self.tool_choice is None or self.tool_choice == "auto":
            return "auto"
        return "required" if self.tool_choice == "required" else "named"

    def tool_defs(self) -> list[dict]:
        """The functions as plain dicts (what the chat template and the schemas read)."""
        return [t.function.model_dump(exclude_none=True) for t in self.tools or []]

    def structured(self) -> tuple[StructuredOutputsParams | None, str]:
        mode = self.tool_mode
        if mode not in ("required", "named"):
            return super().structured()
        if (
            self.response_format is not None and self.response_format.type != "text"
        ) or self.structured_outputs:
            raise OpenAIError(
                "tool_choice required or a named function sets the output's format: no response_format "
                "or structured_outputs beside it",
                param="tool_choice",
            )
        defs = self.tool_defs()
        if mode == "required":
            schema = required_schema(defs, self.parallel_tool_calls is not False)
        else:
            schema = named_schema(next(d for d in defs if d["name"] == self.tool_choice.function.name))
        try:
            return StructuredOutputsParams(json=schema), "tools"
        except ValueError as e:
            raise OpenAIError(str(e).replace("structured_outputs", "tools", 1), param="tools") from None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise OpenAIError("top_logprobs needs logprobs to be true", param="top_logprobs")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_LOGPROBS:
            message = f"top_logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.top_logprobs}"
            raise OpenAIError(message, param="top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens, logprobs)


class TokenizeRequest(_Checked):
    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    # None: a prompt gets the tokenizer's special tokens (BOS), a chat none beyond what the template writes
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[Text, Any] | None = None
    tools: list[Tool] | None = None  # rendered by the chat template, as in a chat completion


class DetokenizeRequest(_Checked):
    model: Text | None = None
    tokens: list[Int64]
