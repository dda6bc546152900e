"""The errors a user can fix: one base class, so the command line prints them as one line.

Every check that blames the user's input (config, data, template, model, a missing
package or file) raises a subclass of `UserError` whose message names the field, row or
file and what was expected. Anything else is a bug or an environment failure and keeps
its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem in the job's input that the user can fix; the message says how."""


class ConfigError(UserError):
    """A job configuration that cannot run; the message lists every problem found."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            super().__init__(self.problems[0])
        else:
            super().__init__("invalid job configuration: " + "; ".join(p for p in self.problems))


class DataError(UserError):
    """Bad dataset content or files; the message names the file or row and the column."""


class ModelError(UserError):
    """The model does not fit the request (missing, unreadable, wrong method, no mask token)."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (library errors can span many lines)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def one_line(reason: str, limit: int = 1000) -> str:
    """The whole reason as one line: a config error lists its problems on the lines after
    its first, and the first alone ('invalid job configuration:') says nothing."""
    parts = [line.strip().removeprefix("- ") for line in reason.splitlines() if line.strip()]
    text = " ".join(parts) if parts else "unknown error"
    return text if len(text) <= limit else text[: limit - 3] + "..."
