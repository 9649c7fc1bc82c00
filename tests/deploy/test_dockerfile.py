"""The Dockerfile and .dockerignore: hadolint, checkov, and the properties the issue asks of the image.

No container engine runs here, so the image is never built in CI; everything that can be read off the files is
checked instead.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

from .helpers import DOCKERFILE, ROOT, dockerfile_env, dockerfile_instructions, exec_form, run, tool

REASON_MIN = 20  # characters: a skip or ignore needs a sentence of justification, not a token


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, args in dockerfile_instructions():
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, args))
    return stages


def test_hadolint_passes() -> None:
    hadolint = tool("hadolint")
    with tempfile.TemporaryDirectory() as tmp:
        # An empty config: the default rules at the default (strictest, "info") failure threshold, whatever
        # .hadolint.yaml a developer may have in their home.
        config = Path(tmp) / "hadolint.yaml"
        config.write_text("{}\n")
        run([hadolint, "--no-color", "--config", str(config), str(DOCKERFILE)])


def test_hadolint_really_lints() -> None:
    """The checker is live: a Dockerfile with known problems fails."""
    hadolint = tool("hadolint")
    with tempfile.TemporaryDirectory() as tmp:
        bad = Path(tmp) / "Dockerfile"
        bad.write_text("FROM python:latest\nRUN pip install flask\n")
        config = Path(tmp) / "hadolint.yaml"
        config.write_text("{}\n")
        proc = run([hadolint, "--no-color", "--config", str(config), str(bad)], check=False)
    assert proc.returncode != 0
    assert "DL3007" in proc.stdout and "DL3013" in proc.stdout, proc.stdout


def test_every_lint_ignore_is_justified() -> None:
    """`# hadolint ignore=` and `# checkov:skip=` only with a reason (hadolint: on the comment line just above)."""
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        if re.search(r"#\s*hadolint\s+(ignore|global\s+ignore)=", line):
            above = lines[number - 1].strip() if number else ""
            assert above.startswith("#") and len(above.lstrip("# ")) >= REASON_MIN, (
                f"Dockerfile:{number + 1}: a hadolint ignore needs a justification comment on the line above")
        match = re.search(r"checkov:skip=(\w+)(?::\s*(.*))?", line)
        if match:
            assert match.group(2) and len(match.group(2)) >= REASON_MIN, (
                f"Dockerfile:{number + 1}: checkov:skip={match.group(1)} needs a reason after the colon")


@pytest.mark.slow
def test_checkov_dockerfile_no_failed_checks() -> None:
    checkov = tool("checkov")
    proc = run([checkov, "--file", str(DOCKERFILE), "--framework", "dockerfile", "--skip-download", "--compact",
                "--quiet", "--output", "cli"], check=False, timeout=300)
    # checkov exits 1 when a check fails (and prints the failures), 0 when none does.
    assert proc.returncode == 0, f"checkov failed checks on the Dockerfile:\n{proc.stdout}\n{proc.stderr}"
    assert "Passed checks:" in proc.stdout, proc.stdout  # it really scanned something
    assert re.search(r"Failed checks: 0\b", proc.stdout), proc.stdout


def test_multistage_pinned_bases() -> None:
    assert len(_stages()) >= 2, "the Dockerfile must be multi-stage (a builder and a slim runtime stage)"
    args: dict[str, str] = {}
    stage_names: set[str] = set()
    for keyword, value in dockerfile_instructions():
        if keyword == "ARG" and "=" in value:
            name, _, default = value.partition("=")
            args.setdefault(name, default.strip('"'))
        if keyword != "FROM":
            continue
        words = value.split()
        image = words[0]
        if len(words) == 3 and words[1].upper() == "AS":
            stage_names.add(words[2])
        if image in stage_names:
            continue  # an earlier stage
        resolved = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), "?"), image)
        if "@sha256:" in resolved:
            continue
        _, _, tag = resolved.rpartition(":")
        assert tag and "/" not in tag and tag != "latest" and re.search(r"\d", tag), (
            f"FROM {image} resolves to {resolved!r}: pin a versioned tag (or a digest)")


def test_runtime_stage() -> None:
    runtime = _stages()[-1]
    keywords = [keyword for keyword, _ in runtime]
    users = [args for keyword, args in runtime if keyword == "USER"]
    assert users, "the runtime stage must switch to a non-root USER"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) >= 10000, (
        f"USER {users[-1]}: use a numeric UID >= 10000 (Kubernetes runAsNonRoot can only verify a numeric user)")
    assert "EXPOSE" in keywords and "HEALTHCHECK" in keywords and "ENTRYPOINT" in keywords
    # Nothing after USER switches back to root.
    last_user = max(i for i, k in enumerate(keywords) if k == "USER")
    assert "RUN" not in keywords[last_user + 1:], "no RUN after the final USER (it would run as the app user)"


def test_healthcheck_hits_live_without_curl() -> None:
    runtime = _stages()[-1]
    (health,) = [args for keyword, args in runtime if keyword == "HEALTHCHECK"]
    _, _, command = health.partition("CMD ")
    argv = exec_form(command.strip())
    assert argv[0] == "python", "slim images have no curl/wget: the healthcheck must use python"
    assert "/v2/health/live" in " ".join(argv)
    # The command is valid Python (it is run by the image's interpreter).
    compile(argv[argv.index("-c") + 1], "<HEALTHCHECK>", "exec")


def _pip_install_args(command: str) -> list[str]:
    """The arguments of the first ``pip ... install`` in a RUN command, up to the next ``&&``."""
    segment = re.split(r"\bpip\b(?:\s+--python\s+\S+)?\s+install\b", command, maxsplit=1)[1].split("&&")[0]
    return shlex.split(segment)


def test_installs_from_pyproject_only() -> None:
    """The project is installed with `pip install .`; torch is the only package named (for its index)."""
    runs = [args for keyword, args in dockerfile_instructions() if keyword == "RUN"]
    installs = [r for r in runs if re.search(r"\bpip\b.*\binstall\b", r)]
    assert installs, runs
    with_values = {"--index-url", "--extra-index-url", "--python", "--find-links", "-i"}
    named_by_install = []
    for command in installs:
        assert "-r " not in command and "requirements" not in command, f"a second dependency list: {command}"
        assert "--no-cache-dir" in command, f"pip cache left in the layer: {command}"
        args, named = _pip_install_args(command), []
        skip = False
        for token in args:
            if skip:
                skip = False
            elif token in with_values:
                skip = True
            elif not token.startswith("-"):
                named.append(token)
        named_by_install.append(named)
        assert all(tok == "." or tok.startswith("torch==") for tok in named), (
            f"only torch may be named (from the PyTorch index); everything else comes from pyproject.toml: {command}")
    assert ["."] in named_by_install, f"no `pip install .`: {installs}"
    args = dict(a.partition("=")[::2] for k, a in dockerfile_instructions() if k == "ARG")
    assert args.get("TORCH_VARIANT") == "cpu", "the default image is the CPU one"


def test_package_indexes_are_build_arguments() -> None:
    """Air-gapped builds: every package comes from PIP_INDEX_URL (PyPI by default) or TORCH_INDEX_URL (the
    PyTorch index of TORCH_VARIANT by default); no URL is written into an install command."""
    args = dict(a.partition("=")[::2] for k, a in dockerfile_instructions() if k == "ARG")
    assert args.get("PIP_INDEX_URL") == "https://pypi.org/simple"
    assert args.get("TORCH_INDEX_URL") == "https://download.pytorch.org/whl/${TORCH_VARIANT}"
    installs = [a for k, a in dockerfile_instructions() if k == "RUN" and re.search(r"\bpip\b.*\binstall\b", a)]
    for command in installs:
        install = _pip_install_args(command)
        assert "--index-url" in install, f"an install without an explicit index: {command}"
        index = install[install.index("--index-url") + 1]
        expected = "${TORCH_INDEX_URL}" if any(t.startswith("torch==") for t in install) else "${PIP_INDEX_URL}"
        assert index == expected, command


def test_no_syntax_directive() -> None:
    """`# syntax=...` makes BuildKit pull a frontend image from Docker Hub: the build fails offline."""
    for line in DOCKERFILE.read_text().splitlines():
        if not line.startswith("#"):
            break  # parser directives are only recognised before the first instruction or blank line
        assert not re.match(r"#\s*syntax\s*=", line, re.I), line


def test_no_secrets_baked_in() -> None:
    secret_like = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL)", re.I)
    for name in dockerfile_env():
        assert not secret_like.search(name), f"ENV {name}: secrets come from the environment at run time"
    for keyword, args in dockerfile_instructions():
        if keyword == "ARG":
            assert not secret_like.search(args.split("=")[0]), f"ARG {args}: build args end up in the image history"
        if keyword in ("COPY", "ADD"):
            assert not re.search(r"\.env\b|\.aws|credentials|id_rsa|\.pem\b", args), f"{keyword} {args}"


def test_model_repository_is_a_volume() -> None:
    env = dockerfile_env()
    volumes = []
    for keyword, args in dockerfile_instructions():
        if keyword == "VOLUME":
            volumes += exec_form(args) if args.startswith("[") else args.split()
    assert env["CAPSA_MODEL_REPOSITORY"] in volumes, (env.get("CAPSA_MODEL_REPOSITORY"), volumes)


# --- .dockerignore ------------------------------------------------------------------------------------------------

def _glob_regex(pattern: str) -> str:
    """A .dockerignore pattern (Go filepath.Match plus "**") as a regular expression."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out.append(pattern[i:end + 1])
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


def _dockerignore_excludes(path: str) -> bool:
    """Whether docker leaves ``path`` out of the build context (the last matching pattern wins; a pattern that
    matches a parent folder matches what is inside it, as in docker)."""
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.strip().startswith("#")]
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _glob_regex((pattern[1:] if negate else pattern).strip("/"))
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            excluded = not negate
    return excluded


@pytest.mark.parametrize("path", ["pyproject.toml", "README.md", "capsa/__init__.py", "service/cli.py"])
def test_dockerignore_keeps_what_copy_needs(path: str) -> None:
    assert not _dockerignore_excludes(path), f".dockerignore drops {path}, which the Dockerfile COPYs"


@pytest.mark.parametrize("path", [".env", "deploy/compose/.env", ".git/config", ".venv/bin/python",
                                  "capsa/__pycache__/x.pyc", "tests/deploy/test_dockerfile.py", "registry/m/1/x",
                                  "credentials.json"])
def test_dockerignore_drops_the_rest(path: str) -> None:
    assert _dockerignore_excludes(path), f".dockerignore lets {path} into the build context"


def test_dockerfile_copies_only_what_dockerignore_lets_in() -> None:
    for keyword, args in dockerfile_instructions():
        if keyword == "COPY" and "--from=" not in args:
            *sources, _dest = args.split()
            for source in sources:
                # README.md too: pyproject.toml's `readme` makes `pip install .` read it.
                assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
                assert not _dockerignore_excludes(source.rstrip("/")), f"COPY {source} is in .dockerignore"


def _build_context(dest: Path) -> list[str]:
    """Copy what docker would send as the build context (everything .dockerignore lets in) to ``dest``."""
    negations = [line.strip()[1:].strip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
                 if line.strip().startswith("!")]
    copied = []
    for folder, dirs, files in os.walk(ROOT):
        rel = Path(folder).relative_to(ROOT)
        # Don't descend into excluded folders that no "!pattern" can re-include (.git, .venv, ...).
        dirs[:] = [d for d in dirs if not (_dockerignore_excludes((rel / d).as_posix().lstrip("./"))
                                           and not any(n.startswith((rel / d).as_posix().lstrip("./") + "/")
                                                       for n in negations))]
        for name in files:
            path = (rel / name).as_posix().lstrip("./") if rel != Path(".") else name
            if not _dockerignore_excludes(path):
                (dest / path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / path, dest / path)
                copied.append(path)
    return copied


@pytest.mark.slow
def test_build_context_installs_with_pip(tmp_path: Path) -> None:
    """What the builder stage's `pip install .` does, on exactly the build context: it builds, and the wheel holds
    both packages and the capsa-serve entry point (no engine needed for that part of the image build)."""
    context = tmp_path / "context"
    copied = _build_context(context)
    assert "pyproject.toml" in copied and not any(p.startswith(("tests/", "deploy/", ".git/")) for p in copied)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(tmp_path / "dist"),
         str(context)], timeout=300)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "service/cli.py" in names and "capsa/__init__.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "capsa-serve = service.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
