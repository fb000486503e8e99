"""Tool calling: requests' ``tools``, ``tool_choice`` and tool messages rendered through the chat
template, and the model's tool-call text (between the tokenizer's markers, Gemma 4's
``<|tool_call>call:name{...}<tool_call|>``) parsed by mlx-lm's parser into OpenAI ``tool_calls``."""

from mlx_lm.server import ToolCallFormatter
from mlx_lm.tool_parsers import gemma4

from ..text import overlap
from .protocol import BadRequest, ChatRequest, unicode_text

# Names the server passes to the template itself.
RESERVED_TEMPLATE_KWARGS = (
    "messages",
    "conversation",
    "tools",
    "documents",
    "tokenize",
    "add_generation_prompt",
    "continue_final_message",
    "return_dict",
    "chat_template",
)


def template_messages(body: ChatRequest) -> list[dict]:
    """The messages as the chat template reads them (OpenAI's shape, arguments as mappings)."""
    messages = []
    for i, message in enumerate(body.messages):
        if message.tool_calls is not None and message.role != "assistant":
            raise BadRequest("only assistant messages have tool_calls", f"messages.{i}.tool_calls")
        if message.tool_call_id is not None and message.role != "tool":
            raise BadRequest("only tool messages have a tool_call_id", f"messages.{i}.tool_call_id")
        entry = {"role": message.role, "content": message.template_content()}
        if message.name is not None:
            entry["name"] = message.name
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        if message.reasoning_content is not None:
            entry["reasoning_content"] = message.reasoning_content
        if message.tool_calls:
            entry["tool_calls"] = [
                tool_call(call, f"messages.{i}.tool_calls.{j}.function.arguments")
                for j, call in enumerate(message.tool_calls)
            ]
        messages.append(entry)
    return messages


def checked_text(value, param: str):
    """``value`` (JSON: mappings, lists, strings, ...), or a 400 naming ``param`` when a string in
    it is not valid Unicode (the tokenizer would fail on it)."""
    if isinstance(value, dict):
        return {checked_text(k, param): checked_text(v, param) for k, v in value.items()}
    if isinstance(value, list):
        return [checked_text(v, param) for v in value]
    if isinstance(value, str):
        try:
            unicode_text(value)
        except ValueError as e:
            raise BadRequest(f"{param}: {e}", param) from None
    return value


def tool_call(call, param: str) -> dict:
    try:
        arguments = checked_text(call.function.argument_dict(), param)
    except ValueError as e:
        raise BadRequest(f"{param}: {e}", param) from None
    function = {"name": call.function.name, "arguments": arguments}
    return {"id": call.id, "type": "function", "function": function}


def template_kwargs(body: ChatRequest, tokenizer) -> dict:
    """What the chat template gets besides the messages: ``tools`` (unless ``tool_choice`` is
    ``none``) and ``chat_template_kwargs``."""
    extra = checked_text(dict(body.chat_template_kwargs or {}), "chat_template_kwargs")
    clash = sorted(set(extra) & set(RESERVED_TEMPLATE_KWARGS))
    if clash:
        raise BadRequest(
            f"chat_template_kwargs: {', '.join(clash)} cannot be set here (the server sets them)",
            "chat_template_kwargs",
        )
    if calls_tools(body):
        if not getattr(tokenizer, "has_tool_calling", False):
            raise BadRequest("tools: this model's chat template has no tool calls", "tools")
        extra["tools"] = checked_text(
            [tool.model_dump(exclude_none=True) for tool in body.tools], "tools"
        )
    return extra


def forced_call(body: ChatRequest, tokenizer) -> str:
    """The start of the reply that ``tool_choice`` imposes, in Gemma 4's wire format: a call
    (``required``: the model names the function) or a call to the named function; the prompt
    ends with it, so the model continues the call."""
    choice = body.tool_choice
    if choice in (None, "auto", "none"):
        return ""
    if not body.tools:
        raise BadRequest(
            "tool_choice: a tool call was asked for, but no tools were sent", "tool_choice"
        )
    if getattr(tokenizer, "tool_parser", None) is not gemma4.parse_tool_call:
        raise BadRequest(
            "tool_choice: only auto and none with this chat template (it has no Gemma 4 tool "
            "calls)",
            "tool_choice",
        )
    start = f"{gemma4.tool_call_start}call:"
    if choice == "required":
        return start
    names = [tool.function.name for tool in body.tools]
    if choice.function.name not in names:
        raise BadRequest(
            f"tool_choice: {choice.function.name!r} is not one of the tools {names}", "tool_choice"
        )
    return f"{start}{choice.function.name}{{"


def calls_tools(body: ChatRequest) -> bool:
    """True when the reply is parsed for tool calls (tools sent, ``tool_choice`` not none)."""
    return bool(body.tools) and body.tool_choice != "none"


class ToolCallText:
    """Streamed text split into content and tool-call texts, the text between the start and end
    markers; text that may begin a marker is held back until it is known."""

    def __init__(self, start: str, end: str):
        self.start, self.end = start, end
        self.held, self.call, self.inside = "", "", False

    def feed(self, text: str, final: bool = False) -> tuple[str, list[str]]:
        """Content that is safe to emit now, and the tool-call texts completed by ``text``; when
        ``final``, everything held is let out (a call cut short by ``max_tokens`` included)."""
        text, self.held = self.held + text, ""
        content, calls = "", []
        while text:
            marker = self.end if self.inside else self.start
            at = text.find(marker)
            if at < 0:
                keep = 0 if final else overlap(text, marker)
                piece, self.held = text[: len(text) - keep], text[len(text) - keep :]
                if self.inside:
                    self.call += piece
                else:
                    content += piece
                break
            if self.inside:
                calls.append(self.call + text[:at])
                self.call = ""
            else:
                content += text[:at]
            self.inside = not self.inside
            text = text[at + len(marker) :]
        if final and self.inside:
            calls.append(self.call)
            self.call, self.inside = "", False
        return content, calls


class ToolCalls:
    """The reply's tool calls, parsed as they complete: OpenAI ``tool_calls`` entries (with an
    ``index`` when streaming); a call the parser cannot read is returned as content instead.
    ``parallel=False`` keeps only the first call."""

    def __init__(
        self, tokenizer, tools: list | None, streaming: bool, parallel: bool = True, start=""
    ):
        """``start``: the reply's text already in the prompt (``forced_call``)."""
        self.text = ToolCallText(tokenizer.tool_call_start, tokenizer.tool_call_end)
        self.formatter = ToolCallFormatter(tokenizer.tool_parser, tools, streaming)
        self.parallel, self.count = parallel, 0
        self.text.feed(start)

    def feed(self, text: str, final: bool = False) -> tuple[str, list[dict]]:
        content, texts = self.text.feed(text, final)
        calls = []
        for call_text in texts:
            parsed = self.formatter([call_text])
            if not parsed:  # unreadable (cut short, say): the client sees the text
                content += self.text.start + call_text
            elif self.parallel or self.count == 0:
                calls.extend(parsed if self.parallel else parsed[:1])
                self.count += len(parsed)
        return content, calls

    def finish_reason(self, reason: str | None) -> str | None:
        """``tool_calls`` when the model stopped after calling a tool."""
        return "tool_calls" if reason == "stop" and self.count else reason
