"""`import faissq`, the pure engine and `faissq --help` stay light: no Celery, kombu or redis."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from faissq.cli.main import COMMANDS

HEAVY = ("celery", "kombu", "redis")


def loaded_after(code: str) -> set[str]:
    """Top-level module names a fresh interpreter holds after running `code`."""
    tail = "import json, sys\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    probe = f"{code}\n{tail}"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize(
    "code",
    ["import faissq", "import faissq.index.engine, faissq.index.builder, faissq.index.tuning",
     "from faissq import Settings, InvalidVectors"],
)  # fmt: skip
def test_the_package_and_the_engine_import_no_queue_stack(code: str) -> None:
    """In-process engine users pay for FAISS and numpy, not for Celery, kombu or redis."""
    assert not loaded_after(code) & set(HEAVY)


def test_the_public_names_still_resolve_lazily() -> None:
    """Every name in __all__ resolves, and a client pulls its own stack in when first used."""
    import faissq

    for name in faissq.__all__:
        assert getattr(faissq, name) is not None, name
    assert "celery" in loaded_after("from faissq import JobClient")
    with pytest.raises(AttributeError):
        faissq.NoSuchThing  # noqa: B018


def test_help_imports_nothing_heavy() -> None:
    """`faissq --help` loads no pydantic, numpy, faiss or queue stack (answering in ~0.1 s)."""
    code = "import contextlib\nfrom faissq.cli.main import main\n"
    code += "with contextlib.suppress(SystemExit):\n    main(['--help'])"
    assert not loaded_after(code) & {"pydantic", "numpy", "faiss", *HEAVY}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_help_imports_nothing_heavy(command: str) -> None:
    """`faissq CMD --help` reads only the command's arguments, never the command's own stack."""
    code = "import contextlib, io\nfrom faissq.cli.main import main\n"
    code += "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
    code += f"    main([{command!r}, '--help'])"
    heavy = {"numpy", "faiss", *HEAVY}
    if command != "acl":  # acl's arguments sit beside its Settings-reading runner
        heavy.add("pydantic")
    assert not loaded_after(code) & heavy
