"""Rewrite a command's block in a docs page: the text between `<!-- NAME -->` and `<!-- /NAME -->`."""

from __future__ import annotations

from pathlib import Path


def rewrite(path: Path, name: str, text: str) -> None:
    """Replace the block `name` of `path` with `text`; SystemExit when the page has no such block."""
    begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    page = path.read_text(encoding="utf-8")
    if begin not in page or end not in page:
        raise SystemExit(f"{path}: no {begin} ... {end} block to rewrite")
    head, rest = page.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{text}\n{end}{tail}", encoding="utf-8")
