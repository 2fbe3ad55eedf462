"""pyproject.toml and environment.yml agree: the conda environment installs everything the package needs."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    """Normalised distribution name of a requirement string (PEP 503): "Foo_Bar[x]>=1" -> "foo-bar"."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, f"cannot read a package name from {requirement!r}"
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def _environment_entries() -> tuple[list[str], list[str]]:
    """(conda dependencies, pip dependencies) of environment.yml, by simple line parsing (no PyYAML needed)."""
    conda, pip = [], []
    section = None
    in_pip = False
    for raw in (ROOT / "environment.yml").read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent == 0:
            section = line.split(":", 1)[0].strip()
            in_pip = False
            continue
        if section != "dependencies":
            continue
        item = line.strip()
        if not item.startswith("- "):
            continue
        item = item[2:].strip().strip("'\"")
        if item == "pip:":
            in_pip, pip_indent = True, indent
            continue
        if in_pip and indent > pip_indent:
            pip.append(item)
        else:
            in_pip = False
            conda.append(item)
    return conda, pip


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_environment_yml_parses():
    conda, pip = _environment_entries()
    assert conda and pip, "environment.yml should list conda dependencies and a pip: section"


def test_python_versions(pyproject):
    conda, _ = _environment_entries()
    pythons = [c for c in conda if _name(c) == "python"]
    assert pythons == ["python=3.11"], f"environment.yml should pin python=3.11, found {pythons}"
    spec = pyproject["project"]["requires-python"]
    match = re.fullmatch(r">=\s*3\.(\d+)", spec.strip())
    assert match and int(match.group(1)) >= 10, f"requires-python should be >=3.10 or newer, got {spec!r}"
    assert int(match.group(1)) <= 11, "environment.yml's python 3.11 must satisfy requires-python"


def test_environment_names_every_runtime_dependency_and_extra(pyproject):
    conda, pip = _environment_entries()
    env_names = {_name(x) for x in conda + pip if not x.startswith(("-", "."))}
    project = pyproject["project"]
    wanted = {_name(r) for r in project["dependencies"]}
    for extra in ("test", "notebooks"):
        wanted |= {_name(r) for r in project["optional-dependencies"].get(extra, [])}
    missing = sorted(wanted - env_names)
    assert not missing, f"environment.yml does not name {missing}: add them to its pip: section"


def test_environment_installs_the_package_itself():
    _, pip = _environment_entries()
    assert any(p.startswith("-e") and "." in p for p in pip), "environment.yml should pip install -e the package"


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", text, re.S)
    assert block, "README.md must open with a code block holding the two commands"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def test_readme_opens_with_two_commands_and_ci_runs_the_test_one():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    main_job, tests = commands
    assert "rmu-analysis" in main_job and "pip install" in main_job
    assert "pytest" in tests and "--nbval" in tests and "notebooks" in tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install --quiet torch==2.13.0" in ci or "pip install torch==2.13.0" in ci
    # the README command installs torch itself; CI installs it first and then runs the rest verbatim
    tail = tests.split("&&", 1)[1].strip()
    assert tail in ci, f"{tail!r} is not in .ci/run"
