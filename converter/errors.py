"""The two kinds of failure the CLI tells apart (exit 1 and 2), and the helpers that keep messages on
one honest line."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from converter.verify import Verification


class ConverterError(Exception):
    """Bad input the user can act on (exit 2): the message names the file, key, shape or flag and what
    to do, and no traceback is shown."""


class VerificationError(Exception):
    """The converted model does not reproduce the original forward pass (exit 1); `verification` holds
    the figures, and the message ends with its first divergent site."""

    def __init__(self, message: str, verification: Verification | None = None):
        divergence = verification.divergence() if verification is not None else ""
        super().__init__(f"{message}; {divergence}" if divergence else message)
        self.verification = verification


def escape(text: str) -> str:
    """`text` on one printable line: control characters (ANSI escapes, newlines) shown escaped, so a
    name from a file or a user cannot forge output lines."""
    return text if text.isprintable() else repr(text)[1:-1]


def listed(items: Iterable[str], limit: int = 20) -> list[str]:
    """At most `limit` items, then "... and N more" (20,000 unknown keys must not make a 500 KB message)."""
    items = list(items)
    if len(items) <= limit:
        return items
    return [*items[:limit], f"... and {len(items) - limit:,} more"]


def reason(err: BaseException | None) -> str:
    """An exception as one short line: its first line, white space folded, or its type when it says
    nothing."""
    text = str(err).strip() if err is not None else "unknown error"
    return escape(" ".join(text.splitlines()[0].split()))[:300] if text else type(err).__name__
