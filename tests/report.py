"""pytest plugin: the per-model report of a run of the per-model suite (tests/test_models.py).

One row per model (the parametrize id): synthetic max |Δ|, release max |Δ|, probabilities vs
`expected/`, preprocessing, the published-model audit when tests/test_audit.py ran, and each test's
result. The tests record the figures with `record_property` (`synthetic_max_abs_diff`,
`release_max_abs_diff`, `probabilities`, `preprocessing`, `audit`); this plugin reads them from the
reports, so it works the same under pytest-xdist. The table is printed in the terminal summary,
written by `--report FILE` (Markdown, or JSON when FILE ends in .json) and appended to
`$GITHUB_STEP_SUMMARY` when that is set (GitHub Actions' job summary).

A skip or failure keeps only what says why: the clause naming the cause, with paths cut to their
last part (a sandbox's temporary folders mean nothing in a report). In the terminal the table fits
the terminal's width: columns with no figure in any row are left out, and long cells wrap onto
continuation lines (which start with spaces, so each model keeps one line that starts with its name).
Files are written as UTF-8 whatever the locale; the terminal gets ASCII stand-ins for Δ and — when
its encoding has no such characters.
"""

from __future__ import annotations

import json
import os
import re
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

SUITE = "test_models.py"
# Test file -> the tests whose figures make a model's row, and the short name for the result column.
SOURCES = {
    "test_models.py": {"test_synthetic": "synthetic", "test_release": "release"},
    "test_audit.py": {"test_published": "audit"},
}
COLUMNS = {  # key in the row -> column title
    "synthetic_max_abs_diff": "synthetic max |Δ|",
    "release_max_abs_diff": "release max |Δ|",
    "probabilities": "probabilities vs expected",
    "preprocessing": "preprocessing",
    "audit": "audit",
}
TITLE = "X-CLIP per-model report"
EMPTY = "—"
_ASCII = str.maketrans({"Δ": "d", "—": "-", "…": "..."})
_REASON_CLAUSES = 60  # characters of a reason's clauses kept after its first
_REASON_MAX = 100
_MIN_WRAPPED = 16  # a word longer than this may break when its column is narrowed
# An absolute path: a slash not inside a word, a URL or a relative path, and what follows it.
_PATH = re.compile(r"(?<![\w.~/:])(?:/[^\s/:;,()'\"]+)+/?")
_OUTCOME_RANK = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}


@dataclass
class Row:
    model: str
    values: dict[str, Any] = field(default_factory=dict)
    outcomes: dict[str, tuple[str, str]] = field(default_factory=dict)  # short test name -> (outcome, why)

    def result(self) -> str:
        parts = []
        for test, (outcome, why) in self.ordered_outcomes():
            parts.append(f"{test}: {outcome}" + (f" ({why})" if why else ""))
        return "; ".join(parts)

    def ordered_outcomes(self) -> list[tuple[str, tuple[str, str]]]:
        order = [short for tests in SOURCES.values() for short in tests.values()]
        return sorted(self.outcomes.items(), key=lambda item: order.index(item[0]))

    def as_dict(self) -> dict[str, Any]:
        tests = {test: {"outcome": o, "reason": why or None} for test, (o, why) in self.ordered_outcomes()}
        return {"model": self.model, **{k: self.values.get(k) for k in COLUMNS}, "tests": tests}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("xclip", "X-CLIP per-model verification suite").addoption(
        "--report",
        metavar="FILE",
        help="write the per-model report of tests/test_models.py to FILE (Markdown; JSON if named *.json)",
    )


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):  # xdist workers send their reports to the controller
        config.pluginmanager.register(ModelReport(config), "xclip-model-report")


class ModelReport:
    def __init__(self, config: pytest.Config):
        self.config = config
        self.rows: dict[str, Row] = {}
        self.suite_ran = False

    @pytest.hookimpl
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self.session = session

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        path, _, name = report.nodeid.rpartition("::")
        function, _, model = name.partition("[")
        tests = SOURCES.get(Path(path).name, {})
        if function not in tests or not model:
            return
        self.suite_ran |= Path(path).name == SUITE
        row = self.rows.setdefault(model.removesuffix("]"), Row(model.removesuffix("]")))
        row.values.update((k, v) for k, v in report.user_properties if k in COLUMNS)
        outcome = "error" if report.failed and report.when != "call" else report.outcome
        if report.when == "call" or outcome != "passed":
            previous = row.outcomes.get(tests[function], ("passed", ""))
            if _OUTCOME_RANK[outcome] >= _OUTCOME_RANK[previous[0]]:
                row.outcomes[tests[function]] = (outcome, _reason(report))

    @pytest.hookimpl
    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.suite_ran:
            return
        rows = self.ordered()
        terminalreporter.write_sep("=", TITLE)
        for line in text_table(rows, self.config.get_terminal_writer().fullwidth, _stdout_encoding()):
            terminalreporter.write_line(line)
        target = self.config.getoption("--report")
        if target:
            from converter.errors import ConverterError
            from converter.export import write_file
            from converter.paths import caches

            path = Path(self.config.invocation_params.dir, target)
            text = to_json(rows) if path.suffix == ".json" else to_markdown(rows)
            try:
                write_file(path, text, flag="--report", protected=caches())  # checked at configure too
            except ConverterError as err:  # a gate whose report is missing has not passed
                terminalreporter.write_line(str(err), red=True)
                if self.session.exitstatus == pytest.ExitCode.OK:
                    self.session.exitstatus = pytest.ExitCode.TESTS_FAILED
            else:
                terminalreporter.write_line(f"per-model report written to {path}")
        summary = os.environ.get("GITHUB_STEP_SUMMARY")
        if summary:
            with open(summary, "a", encoding="utf-8") as fh:
                fh.write(to_markdown(rows) + "\n")

    def ordered(self) -> list[Row]:
        from converter.registry import VARIANTS

        order = {name: i for i, name in enumerate(VARIANTS)}
        return sorted(self.rows.values(), key=lambda r: (order.get(r.model, len(order)), r.model))


def _reason(report: pytest.TestReport) -> str:
    """Why a test skipped or failed, in one short line: a failure's exception line; a skip's first
    clause that says something (a bare name before a colon does not), and more clauses while short."""
    if report.passed:
        return ""
    if report.skipped and isinstance(report.longrepr, tuple):
        return _why(str(report.longrepr[2]).removeprefix("Skipped: "))
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr or "")
    return _shorten(_without_paths(text.strip().split("\n", 1)[0]), _REASON_MAX)


def _why(text: str) -> str:
    text = " ".join(text.split())
    while (shorter := re.sub(r" ?\([^()]*\)", "", text)) != text:  # asides, innermost first
        text = shorter
    clauses = [c for c in re.split(r"(?<=[:;.]) ", _without_paths(text)) if c]
    while len(clauses) > 1 and " " not in clauses[0].strip():  # "microsoft/xclip-base-patch32:"
        clauses.pop(0)
    kept = clauses[0]
    for clause in clauses[1:]:
        if len(kept) + 1 + len(clause) > _REASON_CLAUSES:
            break
        kept += " " + clause
    return _shorten(kept.rstrip(":;. "), _REASON_MAX)


def _without_paths(text: str) -> str:
    """Absolute paths (a sandbox's temporary folders, a user's home) cut to their last part."""
    return _PATH.sub(lambda m: m.group().rstrip("/").rsplit("/", 1)[-1], text)


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _cell(value: Any) -> str:
    if value is None:
        return EMPTY
    if isinstance(value, float):
        return f"{value:.2e}"
    if isinstance(value, dict | list):
        value = json.dumps(value, default=str)
    return " ".join(str(value).split())


def _cells(rows: list[Row], every_column: bool = True) -> tuple[list[str], list[list[str]]]:
    """Header and body; the audit column only when an audit ran, and with `every_column=False` only
    the columns that hold a figure in some row."""
    shown = [k for k in COLUMNS if any(k in r.values for r in rows) or (every_column and k != "audit")]
    header = ["model", *(COLUMNS[k] for k in shown), "result"]
    return header, [[r.model, *(_cell(r.values.get(k)) for k in shown), r.result()] for r in rows]


def to_markdown(rows: list[Row]) -> str:
    header, body = _cells(rows)

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([f"## {TITLE}", "", line(header), line(["---"] * len(header)), *map(line, body)]) + "\n"


def to_json(rows: list[Row]) -> str:
    return json.dumps({"models": [r.as_dict() for r in rows]}, indent=2, default=str) + "\n"


def text_table(rows: list[Row], width: int = 120, encoding: str = "utf-8") -> list[str]:
    """The terminal's table, at most `width` characters a line where the model name and figures
    leave room: the widest text columns are narrowed and their cells wrapped onto continuation lines."""
    header, body = _cells(rows, every_column=False)
    if not _encodes(header + [c for r in body for c in r], encoding):
        header, body = [c.translate(_ASCII) for c in header], [[c.translate(_ASCII) for c in r] for r in body]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    # The model names stay whole. Text columns (cells with spaces) give way first, widest first, then the
    # figures' headers; each down to its longest word (a figure is one word), words past _MIN_WRAPPED break.
    floors = [widths[0]] + [
        min(_MIN_WRAPPED, max(len(word) for r in [header, *body] for word in r[i].split()))
        for i in range(1, len(header))
    ]
    text = {i for i in range(1, len(header)) if any(" " in r[i] for r in body)}
    while sum(widths) + 3 * (len(widths) - 1) > width:
        narrower = [i for i in range(len(widths)) if widths[i] > floors[i]]
        if not narrower:
            break
        first = [i for i in narrower if i in text] or narrower
        widths[max(first, key=lambda i: widths[i])] -= 1
    lines = []
    for number, cells in enumerate([header, *body]):
        wrapped = [_wrap(cell, w) for cell, w in zip(cells, widths, strict=True)]
        for part in range(max(map(len, wrapped))):
            parts = [(w[part] if part < len(w) else "") for w in wrapped]
            lines.append(" | ".join(p.ljust(w) for p, w in zip(parts, widths, strict=True)).rstrip())
        if number == 0:
            lines.append("-+-".join("-" * w for w in widths))
    return lines


def _wrap(cell: str, width: int) -> list[str]:
    """A cell's lines: a result breaks after each test's outcome first, then between words."""
    if len(cell) <= width:
        return [cell]
    lines: list[str] = []
    for piece in re.split(r"(?<=;) ", cell):
        if lines and len(lines[-1]) + 1 + len(piece) <= width:
            lines[-1] += " " + piece
        else:
            lines.extend(textwrap.wrap(piece, width, break_on_hyphens=False) or [""])
    return lines


def _encodes(cells: list[str], encoding: str) -> bool:
    try:
        "".join(cells).encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def _stdout_encoding() -> str:
    return getattr(sys.stdout, "encoding", None) or "utf-8"
