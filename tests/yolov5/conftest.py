"""The YOLOv5 environment the bridge is tested against: a venv built by tests/yolov5env/build.sh (PyPI yolov5 7.0.14
with the design document's RepVGG block patched in), found through REPNAS_YOLOV5_PYTHON. Tests that need it take
the `yolov5_python` fixture and are marked `yolov5`: they skip, with the reason, where it is absent, and fail instead
when CI=true (CI builds it). Figures the tests measure are printed at the end of the run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ENV = "REPNAS_YOLOV5_PYTHON"
FIGURES: dict[str, str] = {}


def pytest_configure(config):
    config.addinivalue_line("markers", "yolov5: runs the bridge against real YOLOv5 code (REPNAS_YOLOV5_PYTHON, "
                                       "built by tests/yolov5env/build.sh); skipped where absent, failed under CI")


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.section("repnas yolov5 bridge figures")
        for key, line in FIGURES.items():
            terminalreporter.write_line(f"{key}: {line}")


@pytest.fixture(scope="session")
def yolov5_python() -> Path:
    """The YOLOv5 environment's python."""
    value = os.environ.get(ENV)
    problem = None
    if not value:
        problem = (f"{ENV} is not set: build the YOLOv5 environment with `bash tests/yolov5env/build.sh VENV` and "
                   f"export {ENV}=VENV/bin/python")
    elif not Path(value).is_file():
        problem = f"{ENV}={value}: no such file; build it with `bash tests/yolov5env/build.sh VENV`"
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{problem} (CI=true: the YOLOv5 bridge tests must run there)")
        pytest.skip(problem)
    return Path(value)
