"""Dataset rows -> chat messages.

Either the host's templates (Jinja2 for input/output, a literal system message for the
instruction) or, without templates, the row's columns are recognised. A row that fits
nothing is an error naming the row and its columns: never a silent `str(row)`.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .. import signals
from ..errors import DataError

Message = dict[str, str]

# Column pairs recognised as (prompt, answer), in order of preference.
PAIR_COLUMNS = [
    ("prompt", "completion"),
    ("prompt", "response"),
    ("question", "answer"),
    ("input", "output"),
]
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


RENDER_SECONDS = 2.0  # per template and row: real rows render in microseconds
DEFAULT_MAX_CHARS = 1 << 20  # per rendered template (data/sources.line_limit sets the job's)


class RenderLimitExceeded(Exception):
    """A template used more time or produced more text than any real row needs."""


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja2's immutable sandbox plus cost limits: no operator, method call or output may
    make text longer than `max_chars` (`"x" * 10**9`, `"".ljust(10**9)`), and `lipsum`
    is gone. Time is bounded by the caller (`time_limit`)."""

    intercepted_binops = frozenset(["*", "**"])

    def __init__(self, max_chars: int):
        super().__init__(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
        self.max_chars = max_chars
        self.globals.pop("lipsum", None)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, str | bytes | list | tuple) and isinstance(times, int):
                    self._check_size(len(seq) * times)
        if operator == "**" and _huge_power(left, right):
            raise RenderLimitExceeded(f"raises a number to the power {right} (too large)")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        if isinstance(getattr(__obj, "__self__", None), str | bytes | list | tuple):
            for value in (*args, *kwargs.values()):
                if isinstance(value, int) and not isinstance(value, bool):
                    __self._check_size(value)
        return super().call(__context, __obj, *args, **kwargs)

    def _check_size(self, size: int) -> None:
        if size > self.max_chars:
            raise RenderLimitExceeded(
                f"would make a text of {size} characters (at most {self.max_chars})"
            )


def _huge_power(base: Any, exponent: Any) -> bool:
    """An integer power with more than 65536 bits (computed in C: no alarm can stop it)."""
    if not (isinstance(base, int) and isinstance(exponent, int)) or abs(base) <= 1:
        return False
    return exponent * abs(base).bit_length() > (1 << 16)


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise RenderLimitExceeded in this (main) thread after `seconds`. Elsewhere there is
    no alarm: only the size limits hold."""

    def expire(_signum: int, _frame: Any) -> None:
        raise RenderLimitExceeded(f"took longer than {seconds:g} s")

    with signals.handling(expire, (signal.SIGALRM,)) as installed:
        if installed:
            signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            if installed:
                signal.setitimer(signal.ITIMER_REAL, 0)


def _joined(chunks: Iterable[str], max_chars: int) -> str:
    """The output of `Template.generate`, refused as soon as it passes `max_chars`."""
    parts, size = [], 0
    for chunk in chunks:
        size += len(chunk)
        if size > max_chars:
            raise RenderLimitExceeded(f"produced more than {max_chars} characters")
        parts.append(chunk)
    return "".join(parts)


@dataclass
class RowTemplates:
    """The host's template fields; empty strings mean "not given".

    Rendering is bounded per row and template: `RENDER_SECONDS` of time and `max_chars`
    characters of output (and of any intermediate text); a row over either is an error
    naming it.
    """

    input_template: str = ""
    output_template: str = ""
    instruction_template: str = ""
    max_chars: int = DEFAULT_MAX_CHARS

    def __post_init__(self) -> None:
        given = {
            k: bool(v and v.strip())
            for k, v in (
                ("input_template", self.input_template),
                ("output_template", self.output_template),
            )
        }
        if given["input_template"] != given["output_template"]:
            missing = "output_template" if given["input_template"] else "input_template"
            other = "input_template" if missing == "output_template" else "output_template"
            raise DataError(
                f"{missing} is empty but {other} is set: give both, or neither to infer the columns"
            )
        env = BoundedSandbox(self.max_chars)
        self._compiled = {}
        for name in ("input_template", "output_template"):
            source = getattr(self, name)
            if source and source.strip():
                try:
                    self._compiled[name] = env.from_string(source)
                except jinja2.TemplateSyntaxError as e:
                    raise DataError(
                        f"{name} is not a valid Jinja2 template (line {e.lineno}): {e.message}"
                    ) from None

    @property
    def uses_templates(self) -> bool:
        return bool(self._compiled)

    def render(self, name: str, row: Mapping[str, Any], index: int) -> str:
        # A missing value (an empty CSV cell, a JSON null) is an empty text, not "None".
        values = {k: "" if v is None else v for k, v in row.items()}
        try:
            with time_limit(RENDER_SECONDS):
                return _joined(self._compiled[name].generate(**values), self.max_chars)
        except RenderLimitExceeded as e:
            raise DataError(
                f"row {index}: {name} {e}; a template may take {RENDER_SECONDS:g} s and "
                f"{self.max_chars} characters per row"
            ) from None
        except jinja2.UndefinedError as e:
            raise DataError(
                f"row {index}: {name} uses a column or attribute that is missing ({e.message}); "
                f"the row's columns are: {', '.join(sorted(row))}"
            ) from None
        except jinja2.TemplateError as e:
            raise DataError(f"row {index}: {name} failed to render: {e}") from None


def row_to_messages(row: Mapping[str, Any], index: int, templates: RowTemplates) -> list[Message]:
    """The chat messages for one row: templates when given, else inferred from columns."""
    system = templates.instruction_template.strip() if templates.instruction_template else ""
    if templates.uses_templates:
        prompt = templates.render("input_template", row, index)
        answer = templates.render("output_template", row, index)
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    else:
        messages = infer_messages(row, index)
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    return messages


def infer_messages(row: Mapping[str, Any], index: int) -> list[Message]:
    """Recognise the common dataset shapes by their columns."""
    present = {k for k, v in row.items() if v is not None}
    if "messages" in present or "conversations" in present:
        key = "messages" if "messages" in present else "conversations"
        return _conversation(row[key], index, key)
    if {"instruction", "output"} <= present:
        extra = _text(row, "input", index) if "input" in present else ""
        instruction = _text(row, "instruction", index)
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return _pair(prompt, _text(row, "output", index))
    for prompt_col, answer_col in PAIR_COLUMNS:
        if {prompt_col, answer_col} <= present:
            return _pair(_text(row, prompt_col, index), _text(row, answer_col, index))
    if "text" in present:
        text = _text(row, "text", index)
        prompt, sep, answer = text.partition("\n\n")
        if not sep or not prompt.strip() or not answer.strip():
            raise DataError(
                f"row {index}: column 'text' has no blank line separating a prompt from an answer "
                "(expected 'prompt\\n\\nanswer')"
            )
        return _pair(prompt, answer)
    raise DataError(
        f"row {index}: cannot tell prompt from answer; its columns are {', '.join(sorted(row)) or '(none)'}. "
        "Expected one of: instruction+output (+input), prompt+completion, prompt+response, "
        "question+answer, input+output, text (prompt, blank line, answer), messages, conversations; "
        "or set input_template and output_template"
    )


def _pair(prompt: str, answer: str) -> list[Message]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def _text(row: Mapping[str, Any], column: str, index: int) -> str:
    value = row[column]
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"row {index}: column {column!r} must be text, got {type(value).__name__}")


def _conversation(value: Any, index: int, column: str) -> list[Message]:
    """Messages ({role, content}) or ShareGPT turns ({from, value}), ending with an answer."""
    if not isinstance(value, list) or not value:
        raise DataError(f"row {index}: column {column!r} must be a non-empty list of messages")
    messages: list[Message] = []
    for turn_no, turn in enumerate(value):
        if not isinstance(turn, Mapping):
            raise DataError(
                f"row {index}: {column}[{turn_no}] must be an object with role and content"
            )
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        role = SHAREGPT_ROLES.get(str(role).lower()) if role is not None else None
        if role is None or not isinstance(content, str):
            raise DataError(
                f"row {index}: {column}[{turn_no}] needs a role (system/user/assistant) and text content, "
                f"got keys {sorted(turn)}"
            )
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "assistant":
        raise DataError(
            f"row {index}: the last message in {column!r} must be from the assistant (the answer to learn)"
        )
    if not any(m["role"] == "user" for m in messages):
        raise DataError(f"row {index}: {column!r} has no user message")
    return messages
