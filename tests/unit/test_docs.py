"""Docs stay true to the code: the README's settings table and its two quick-start commands."""

from __future__ import annotations

import re
from pathlib import Path

from faissq.cli.settings_table import BEGIN, END, settings_table

ROOT = Path(__file__).resolve().parents[2]


def test_readme_settings_table_matches_the_settings_model() -> None:
    readme = (ROOT / "README.md").read_text()
    start, stop = readme.index(BEGIN), readme.index(END) + len(END)
    assert readme[start:stop] == settings_table(), "run: python -m faissq.cli.settings_table"


def test_quick_start_has_exactly_two_commands_that_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None
    commands = [ln.split("#")[0].strip() for ln in block.group(1).splitlines() if ln.strip()]
    assert len(commands) == 2
    for cmd in commands:
        script = ROOT / cmd.split()[0]
        assert script.is_file() and script.stat().st_mode & 0o111, cmd
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/check" in ci
