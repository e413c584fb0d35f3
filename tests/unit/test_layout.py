"""The package layout stays readable: folders per part, one name per module, short modules."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "faissq"
# shards: shard names and the id-to-shard hash, shared by writes (tasks), fan-out (rpc) and cli
ROOT_MODULES = {
    "__init__.py",
    "__main__.py",
    "codec.py",
    "config.py",
    "errors.py",
    "keys.py",
    "shards.py",
}
MAX_LINES = 400


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_the_root_holds_only_what_every_layer_uses() -> None:
    """Everything else lives in a folder named for its part (index, storage, rpc, ...)."""
    assert {p.name for p in PACKAGE.glob("*.py")} == ROOT_MODULES


def test_every_module_name_is_unique_in_the_package() -> None:
    """`search_client`, not a second `client`: a name says which module it is."""
    names = Counter(p.name for p in modules() if p.name not in {"__init__.py", "__main__.py"})
    assert [n for n, c in names.items() if c > 1] == []


def test_no_module_is_over_400_lines() -> None:
    long = {str(p.relative_to(PACKAGE)): n for p in modules()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}  # fmt: skip
    assert long == {}
