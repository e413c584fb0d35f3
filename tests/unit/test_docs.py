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


def test_benchmarks_doc_is_at_most_300_lines() -> None:
    """Per benchmark: the command, the machine, one current table; the history lives in git."""
    assert len((ROOT / "docs" / "benchmarks.md").read_text().splitlines()) <= 300


def anchor(title: str) -> str:
    """A heading's anchor as GitHub spells it: "RPC fast paths" -> "rpc-fast-paths"."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def doc_sections(text: str) -> dict[str, str]:
    """Each heading's anchor -> the text up to the next heading, of any level."""
    parts = re.split(r"^#+ (.+)$", text, flags=re.M)
    return {anchor(title): body for title, body in zip(parts[1::2], parts[2::2], strict=True)}


def test_every_measured_figure_in_the_code_sits_under_the_heading_it_links() -> None:
    """A fast path's "Measured: A vs B" line points at the table that holds both figures."""
    sections = doc_sections((ROOT / "docs" / "benchmarks.md").read_text())
    claim = re.compile(r"Measured: (.*?)docs/benchmarks\.md#([\w-]+)")
    claims = []
    for path in sorted((ROOT / "faissq").rglob("*.py")):
        text = " ".join(path.read_text().split())  # a docstring may wrap the line
        claims += [(path.name, said, link) for said, link in claim.findall(text)]
    assert len(claims) >= 6
    for name, said, link in claims:
        assert link in sections, f"{name}: no heading #{link}"
        pairs = re.findall(r"([\d.,]*\d) vs ([\d.,]*\d)", said)
        assert pairs, f"{name}: {said}"
        for figure in (f for pair in pairs for f in pair):
            assert figure in sections[link], f"{name}: {figure} is not under #{link}"


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
