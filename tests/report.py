"""pytest plugin: the per-model report of a run of the per-model suite (tests/test_models.py).

One row per model (the parametrize id): synthetic max |Δ|, release max |Δ|, probabilities vs
`expected/`, preprocessing, the published-model audit when tests/test_audit.py ran, and each test's
result. The tests record the figures with `record_property` (`synthetic_max_abs_diff`,
`release_max_abs_diff`, `probabilities`, `preprocessing`, `audit`); this plugin reads them from the
reports, so it works the same under pytest-xdist. The table is printed in the terminal summary,
written by `--report FILE` (Markdown, or JSON when FILE ends in .json) and appended to
`$GITHUB_STEP_SUMMARY` when that is set (GitHub Actions' job summary).
"""

from __future__ import annotations

import json
import os
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
        for line in text_table(rows):
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
            except ConverterError as err:
                terminalreporter.write_line(str(err), red=True)
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
    """Why a test skipped or failed, in one short line."""
    if report.passed:
        return ""
    if report.skipped and isinstance(report.longrepr, tuple):
        text = str(report.longrepr[2]).removeprefix("Skipped: ")
    else:
        text = getattr(report.longrepr, "reprcrash", None)
        text = text.message if text is not None else str(report.longrepr or "")
    text = " ".join(text.split())
    return text if len(text) <= 160 else text[:157] + "..."


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.2e}"
    if isinstance(value, dict | list):
        value = json.dumps(value, default=str)
    return " ".join(str(value).split())


def _cells(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    shown = [k for k in COLUMNS if k != "audit" or any(k in r.values for r in rows)]
    header = ["model", *(COLUMNS[k] for k in shown), "result"]
    return header, [[r.model, *(_cell(r.values.get(k)) for k in shown), r.result()] for r in rows]


def to_markdown(rows: list[Row]) -> str:
    header, body = _cells(rows)

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([f"## {TITLE}", "", line(header), line(["---"] * len(header)), *map(line, body)]) + "\n"


def to_json(rows: list[Row]) -> str:
    return json.dumps({"models": [r.as_dict() for r in rows]}, indent=2, default=str) + "\n"


def text_table(rows: list[Row]) -> list[str]:
    header, body = _cells(rows)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = [
        " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
        for cells in [header, *body]
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return lines
