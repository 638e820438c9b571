"""The README's two newcomer commands stay true: CI runs exactly the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    return re.findall(r"```(?:bash|sh)\n(.+?)\n```", text, flags=re.S)


def test_readme_has_demo_and_test_commands():
    commands = _readme_commands()
    assert any("facetrain demo" in c and "torch==2.13.0" in c for c in commands), commands
    assert any("pytest" in c for c in commands), commands


def test_ci_runs_the_readme_test_command_verbatim():
    test_command = next(c for c in _readme_commands() if "pytest" in c)
    pytest_part = test_command[test_command.index("python -m pytest") :].strip()
    ci_lines = [line.strip() for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines()]
    assert pytest_part in ci_lines, f"README test command {pytest_part!r} is not a line of .ci/run"
