"""Fixtures of the deployment checks (helpers live in helpers.py)."""

from __future__ import annotations

from typing import Any

import pytest

from .helpers import OVERLAYS, render_overlay


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Every overlay, rendered once per session: {"cpu": [...], "gpu": [...]}."""
    return {overlay: render_overlay(overlay) for overlay in OVERLAYS}
