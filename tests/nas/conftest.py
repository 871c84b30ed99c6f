"""Fixtures of the study tests: the tiny study of tests/studyfixtures.py (widths 8|16, 16 synthetic images at 64 px,
one epoch per trial), its files made once per module."""

from __future__ import annotations

from pathlib import Path

import pytest

from nas.study import StudySettings
from tests.studyfixtures import BASELINE, TINY_SPACE, make_tiny_assets, tiny_settings

__all__ = ["BASELINE", "TINY_SPACE", "assets", "settings"]  # BASELINE, TINY_SPACE: for modules that import them here


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """The tiny study's files, plus "other": a second dataset (10 images) for tests that change the data."""
    return make_tiny_assets(tmp_path_factory.mktemp("study-assets"), other=10)


@pytest.fixture
def settings(assets, tmp_path, monkeypatch) -> StudySettings:
    """Study "tiny" (3 trials) on `assets`, run from tmp_path (results/ there) with its own cache folder."""
    monkeypatch.setenv("REPNAS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return tiny_settings(assets)
