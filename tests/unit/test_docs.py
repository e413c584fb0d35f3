"""Docs stay true to the code: the README's settings table, its two quick-start commands and
the ACL user that docs/operations.md shows."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from faissq.cli import acl_roles
from faissq.cli.main import main
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


def test_operations_acl_example_matches_faissq_acl(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = (ROOT / "docs" / "operations.md").read_text()
    command = "faissq acl --role searcher --index products --user search-api"
    assert command in doc
    monkeypatch.setenv("FAISSQ_ACL_PASSWORD", "any-password")
    assert main(command.split()[1:]) == 0
    printed = capsys.readouterr().out.strip()
    shown = printed.replace(acl_roles.password_hash("any-password"), "#<sha256>")
    blocks = re.findall(r"```text\n(ACL SETUSER .*?)\n```", doc, re.S)
    assert blocks == [shown]
