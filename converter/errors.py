"""The kinds of failure the CLI distinguishes, and the helpers that keep their messages honest.

Exit status: 0 verified and written, 1 `VerificationError` (a verification ran and failed),
2 `ConverterError` (every other refusal), 130/143 interrupted by SIGINT/SIGTERM.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from converter.verify import Verification

MAX_LISTED = 20  # items of a list shown in one message; the rest are counted


class ConverterError(Exception):
    """Bad input: a file, key, shape, flag or network problem the user can act on (exit 2).

    The message is the whole story: which file/key/shape, and what to do. No traceback is shown.
    """


class VerificationError(Exception):
    """The converted model does not reproduce the original forward pass (exit 1).

    `verification` carries the figures that failed, for the CLI to print as a result; the message
    then ends with its first divergent site."""

    def __init__(self, message: str, verification: Verification | None = None):
        if verification is not None and verification.first_divergence is not None:
            message = f"{message}; {verification.divergence()}"
        super().__init__(message)
        self.verification = verification


def escape(text: str) -> str:
    """A name from a file or a user, printable on one line: control characters (ANSI escapes,
    newlines) are shown escaped, so a key name cannot forge output lines."""
    return text if text.isprintable() else repr(text)[1:-1]


def listed(items: Iterable[str], limit: int = MAX_LISTED) -> list[str]:
    """At most `limit` items, then "... and N more" (20,000 unknown keys must not make a 500 KB message)."""
    items = list(items)
    shown = items[:limit]
    if len(items) > limit:
        shown.append(f"... and {len(items) - limit:,} more")
    return shown


def reason(err: BaseException | None) -> str:
    """An exception as one short line: its first line, white space folded, or its type when it says
    nothing."""
    text = str(err).strip() if err is not None else "unknown error"
    return escape(" ".join(text.splitlines()[0].split()))[:300] if text else type(err).__name__
