"""Layering: the library (``capsa``) never imports the server (``service``); ``capsa publish`` works without it."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import capsa

REPO = Path(__file__).resolve().parents[2]


def test_no_capsa_source_imports_service() -> None:
    """Old code: capsa/cli.py imported service.registry (inside ``capsa publish``'s handler) to publish."""
    offenders = []
    for path in sorted((REPO / "capsa").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            offenders += [f"{path.relative_to(REPO)}:{node.lineno} imports {n}" for n in names
                          if n == "service" or n.startswith("service.")]
    assert not offenders, offenders


def test_importing_every_capsa_module_loads_no_service_module() -> None:
    modules = sorted(m.name for m in pkgutil.walk_packages(capsa.__path__, "capsa."))
    assert "capsa.registry" in modules and "capsa.cli" in modules
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m == 'service' or m.startswith('service.')))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                         check=True).stdout
    assert out.strip() == "[]", f"capsa imported the server: {out}"


def test_service_registry_publishes_with_the_library_code() -> None:
    """The server re-exports the library's publishing: one definition, both import paths work."""
    import capsa.registry
    import service.registry

    assert service.registry.publish is capsa.registry.publish
    assert service.registry.RegistryError is capsa.registry.RegistryError
