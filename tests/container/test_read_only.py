"""The image as a new user runs it: the README's hardened ``docker run`` line with ``--demo``, the one-line error
when nothing is writable, the slim runtime (no installer, no byte code), and ``--help``."""

from __future__ import annotations

import pytest

from .helpers import IMAGE, Container, docker

HARDENED = ["--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]


@pytest.mark.slow
def test_demo_on_a_read_only_root() -> None:
    """`docker run --read-only --tmpfs /tmp IMAGE --demo`: before, exit 1 with `OSError: [Errno 30] Read-only file
    system: '/var/cache/capsa/demo'`; now the cache is a volume of the image and the demo serves."""
    container = Container(HARDENED, {}, ["--demo"], name_prefix="capsa-ro")
    try:
        container.wait_ready(timeout=300)
        mounts = {m["Destination"]: m for m in container.inspect()["Mounts"]}
        assert mounts["/var/cache/capsa"]["Type"] == "volume", mounts
    finally:
        container.remove()


def test_nothing_writable_is_one_error_line() -> None:
    """A cache folder on the read-only root and no tmpfs: exit 1 with one line saying what to mount."""
    proc = docker("run", "--rm", "--network", "host", "--read-only", "--cap-drop", "ALL",
                  "-e", "CAPSA_CACHE_DIR=/home/capsa/cache", "-e", "CAPSA_PORT=1", "-e", "CAPSA_GRPC_PORT=0", IMAGE,
                  "--demo",
                  check=False, timeout=120)
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    plain = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("{")]
    assert len(plain) == 1, proc.stderr
    assert "/home/capsa/cache/demo" in plain[0] and "Read-only file system" in plain[0], plain[0]
    assert "Traceback" not in proc.stderr


def test_runtime_has_no_installer_and_no_byte_code() -> None:
    script = (
        "import importlib.util, pathlib, sys\n"
        "venv = pathlib.Path(sys.prefix)\n"
        "assert str(venv) == '/opt/venv', venv\n"
        "found = [m for m in ('pip', 'setuptools', 'wheel', 'pkg_resources') if importlib.util.find_spec(m)]\n"
        "caches = [str(p) for p in venv.rglob('__pycache__')][:5]\n"
        "tests = [str(p) for p in (venv / 'lib').glob('python3*/site-packages/torch/test')]\n"
        "print(found, caches, tests)\n"
        "sys.exit(1 if found or caches or tests else 0)\n"
    )
    proc = docker("run", "--rm", "--read-only", "--network", "none", "--entrypoint", "python", IMAGE, "-c",
                  script, check=False, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_help_lists_every_setting_with_its_environment_variable() -> None:
    from service.settings import Settings

    proc = docker("run", "--rm", "--network", "none", IMAGE, "--help", check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    missing = [f"CAPSA_{name.upper()}" for name in Settings.model_fields if f"CAPSA_{name.upper()}" not in proc.stdout]
    assert not missing, f"--help does not mention {missing}:\n{proc.stdout}"
