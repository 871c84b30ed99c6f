"""The reliability suite's counts: tests record one line each and pytest prints them at the end of the run.

Use the `reliability_report` fixture: `reliability_report("kill/resume", "10/10 runs, 8 phases hit, ...")`. The
lines are printed under "repnas reliability counts" in the terminal summary (so CI's log shows them), in the order
the tests recorded them; a later line with the same key replaces the earlier one.
"""

from __future__ import annotations

import pytest

COUNTS: dict[str, str] = {}


@pytest.fixture
def reliability_report():
    def record(key: str, line: str) -> None:
        COUNTS[key] = line
    return record
