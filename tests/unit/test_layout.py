"""The package layout stays readable: folders per part, one name per module, short modules."""

from __future__ import annotations

import ast
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


# The parts of faissq/ top to bottom: a folder, or a root module. A part imports only parts below
# it: the picture in README.md ("Folders, and who calls whom") and docs/architecture.md.
LAYERS = [
    "__main__",
    "cli",
    "faissq",  # the public surface (faissq/__init__.py), imported lazily
    "tasks",  # the jobs call the worker's runtime
    "worker",
    "rpc",
    "telemetry",  # metric families that rpc, tasks and worker record into
    "storage",
    "index",
    "shards",
    "codec",
    "keys",
    "config",
    "errors",
]


def module_name(path: Path) -> str:
    """faissq/rpc/server.py -> faissq.rpc.server; a package's __init__ is the package."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str:
    """The part a faissq module belongs to: its folder under faissq/, or the root module."""
    names = module.split(".")
    if len(names) > 1 and any(PACKAGE.joinpath(f"{names[1]}{ext}").exists() for ext in ("", ".py")):
        return names[1]
    return "faissq"  # the package itself, or a name it exports


def rank(part: str) -> int:
    """How far down the picture `part` sits (a new part must be placed in LAYERS first)."""
    assert part in LAYERS, f"{part!r}: add it to LAYERS and to the pictures in the docs"
    return LAYERS.index(part)


def imported_modules(path: Path) -> set[str]:
    """Every faissq module `path` imports, at the top or inside a function."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package upward
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, *([node.module] if node.module else [])])
            if base == "faissq":  # `from faissq import keys` names the module faissq.keys
                found.update(f"{base}.{alias.name}" for alias in node.names)
            found.add(base)
    return {m for m in found if m.startswith("faissq.")}


def test_package_imports_follow_the_documented_arrows() -> None:
    """No import goes against the picture, function-level imports included."""
    against = sorted(
        f"{p.relative_to(PACKAGE.parent)} imports {target}"
        for p in modules()
        for target in imported_modules(p)
        if rank(part_of(target)) < rank(part_of(module_name(p)))
    )
    assert against == []


def celery_names(path: Path) -> set[str]:
    """Celery signal names and bootstep hooks that `path` uses (`signals.X`, `steps`, ...)."""
    tree = ast.parse(path.read_text())
    used: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in {"celery", "celery.signals"}:
            used.update(a.name for a in node.names if a.name in {"signals", "bootsteps"})
            if node.module == "celery.signals":
                used.update(f"signals.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            used.update(a.name[7:] for a in node.names if a.name.startswith("celery.signals"))
        elif isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "signals":
                used.add(f"signals.{node.attr}")
            if node.attr == "steps":
                used.add("steps")
    return used


def test_only_the_lifecycle_touches_worker_signals_and_steps() -> None:
    """Start and stop have one owner (worker/lifecycle.py), readable top to bottom.

    Worker signals and bootsteps appear in the lifecycle only. A job signal (counting jobs,
    releasing the heap after one) is used only by a worker/ component that the lifecycle
    imports, and so starts and stops, never by a module elsewhere.
    """
    lifecycle = "worker/lifecycle.py"
    imported = [m for m in imported_modules(PACKAGE / lifecycle) if m.startswith("faissq.worker.")]
    started = {m.removeprefix("faissq.").replace(".", "/") + ".py" for m in imported}
    users = {str(p.relative_to(PACKAGE)): names for p in modules() if (names := celery_names(p))}
    owning = {"bootsteps", "steps"}
    owners = {path for path, names in users.items()
              if any(n.startswith("signals.worker_") or n in owning for n in names)}  # fmt: skip
    assert owners == {lifecycle}
    assert set(users) - {lifecycle, *started} == set()
