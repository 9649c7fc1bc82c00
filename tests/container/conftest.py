"""Fixtures of the container tests (helpers live in helpers.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .helpers import Container, check_engine, k8s_run_options


@pytest.fixture(scope="session", autouse=True)
def engine() -> None:
    """The engine answers and the image exists: every test here needs both (fail in CI, skip elsewhere)."""
    check_engine()


@pytest.fixture(scope="session")
def k8s() -> tuple[list[str], dict[str, str]]:
    """``docker run`` options and environment of the cpu overlay's pod (see `k8s_run_options`)."""
    return k8s_run_options("cpu")


@pytest.fixture(scope="module")
def demo_container(k8s: tuple[list[str], dict[str, str]]) -> Iterator[Container]:
    """``--demo`` run as the cpu overlay's pod runs (read-only root, tmpfs volumes, ConfigMap settings), ready."""
    options, env = k8s
    container = Container([*options, "--health-interval", "2s"], env, ["--demo"], name_prefix="capsa-demo")
    try:
        container.wait_ready(timeout=300)
        yield container
    finally:
        container.remove()
