"""Helpers of the bad-input tests: run the real CLI in-process, check its refusal, and count the rules that held.

A refusal is exit code 2 with exactly one stderr line `repnas COMMAND: error: ...` holding every expected part
(file, field, value, fix). `record_rule` adds a rule id to RULES once its case has passed and re-records the
"bad input" count line, so the line printed at the end of the run counts the distinct rules that held in it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from nas.cli import main

RULES: set[str] = set()
COUNT_KEY = "bad input"


def run_cli(argv: list[str], capsys) -> tuple[int, str, list[str]]:
    """(exit code, stdout, stderr lines) of `repnas ARGV` run in this process (argparse's exits included)."""
    try:
        code = main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


def refusal(argv: list[str], capsys, parts: Iterable[str]) -> str:
    """Run `repnas ARGV`; assert exit 2, one stderr line starting `repnas COMMAND: error: ` and holding `parts`."""
    code, _, err = run_cli(argv, capsys)
    assert code == 2, (argv, code, err)
    assert len(err) == 1, err
    line = err[0]
    assert line.startswith(f"repnas {argv[0]}: error: "), line
    missing = [part for part in parts if part not in line]
    assert not missing, f"{missing} not in: {line}"
    return line


def record_rule(rule: str, report: Callable[[str, str], None]) -> None:
    """Count `rule` as held (call once its assertions passed) and refresh the count line."""
    RULES.add(rule)
    report(COUNT_KEY, f"{len(RULES)} distinct rules, each exit 2 with one line, nothing written")


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root` with its size and mtime: compare two snapshots to prove nothing was written."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}
