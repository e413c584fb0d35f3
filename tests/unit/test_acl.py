"""`faissq acl`: rules come from faissq.keys, the output loads into a real redis-server."""

from __future__ import annotations

import fnmatch
import shlex
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from faissq import keys
from faissq.cli import acl_roles as acl
from faissq.cli.main import main
from faissq.errors import InvalidParameter
from faissq.worker.embedded_redis import find_redis_server, free_port


def patterns(role: str, index: str) -> list[str]:
    """The key patterns (without ~ or %R~) of a role's rules, selectors included."""
    words = " ".join(acl.rules(role, index)).replace("(", " ").replace(")", " ").split()
    return [w.split("~", 1)[1] for w in words if "~" in w]


def allowed(role: str, index: str, key: str) -> bool:
    """Whether some key pattern of the role matches the key (as Redis's glob would)."""
    return any(fnmatch.fnmatchcase(key, p) for p in patterns(role, index))


def test_searcher_patterns_follow_the_key_functions() -> None:
    own = (keys.rpc_queue("products"), keys.alive_key("products"),
           keys.reply_key("products", "abc"), keys.heartbeat_key("products", "w1"))  # fmt: skip
    for key in own:
        assert allowed("searcher", "products", key), key
    for key in (keys.reply_key("other", "abc"), keys.task_queue("products"),
                keys.dead_letter_list("products"), keys.rpc_queue("other"), "unacked"):  # fmt: skip
        assert not allowed("searcher", "products", key), key
    assert allowed("searcher", "*", keys.reply_key("any", "abc"))


def test_producer_and_worker_patterns_follow_the_key_functions() -> None:
    assert allowed("producer", "products", keys.task_queue("products"))
    assert not allowed("producer", "products", keys.task_queue("other"))
    assert not allowed("producer", "products", keys.rpc_queue("products"))
    assert not allowed("producer", "products", keys.dead_letter_list("products"))
    queue = keys.task_queue("products")
    for key in (queue, keys.inflight_list(queue), keys.rpc_queue("products"),
                keys.dead_letter_list("products"), keys.delivery_key("t1"), "unacked"):  # fmt: skip
        assert allowed("worker", "products", key), key
    assert not allowed("worker", "products", keys.task_queue("other"))
    # kombu's routing table of each queue: its own index's only
    for role in ("producer", "worker"):
        assert allowed(role, "products", f"_kombu.binding.{keys.task_queue('products')}")
        assert not allowed(role, "products", f"_kombu.binding.{keys.task_queue('other')}"), role
    # it publishes the task-sent event alone, never a result notification or a control command
    publishing = [r for r in acl.rules("producer", "products") if "+publish" in r]
    assert publishing == ["(+publish &/0.celeryev/task.sent)"]


def test_monitor_writes_nothing_and_no_role_gets_admin_commands() -> None:
    assert patterns("monitor", "*") == ["*"] and "%R~*" in acl.rules("monitor")
    for role in acl.Role:
        rules = acl.rules(role, "products")
        assert rules[:3] == ["resetkeys", "resetchannels", "-@all"]
        assert "+@all" not in rules and "+@admin" not in rules and "allkeys" not in rules


@pytest.mark.parametrize("index", ["", "a b", "a*", "x]", "a\nb", "p:q", "x" * 129, "~x"])
def test_an_index_that_could_widen_a_pattern_is_refused(index: str) -> None:
    with pytest.raises(InvalidParameter):
        acl.rules("searcher", index)


def test_a_bad_db_or_empty_password_is_refused() -> None:
    with pytest.raises(InvalidParameter):
        acl.rules("worker", "products", db=-1)
    with pytest.raises(InvalidParameter):
        acl.password_hash("")


@pytest.fixture
def acl_redis(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A redis-server reading users from an aclfile in tmp_path (written before ACL LOAD)."""
    aclfile = tmp_path / "users.acl"
    aclfile.write_text("user default on nopass ~* &* +@all\n")
    port = free_port()
    proc = subprocess.Popen(
        [find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--aclfile", str(aclfile), "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
    yield port, aclfile
    client.close()
    proc.terminate()
    proc.wait(10)


def test_cli_prints_a_setuser_line_redis_accepts_without_the_password(
    acl_redis: tuple[int, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    port, _ = acl_redis
    monkeypatch.setenv("FAISSQ_ACL_PASSWORD", "s3cret-pw")
    assert main(["acl", "--role", "searcher", "--index", "products"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("ACL SETUSER faissq-searcher reset on '#")
    assert "s3cret-pw" not in line
    admin = redis.Redis(port=port)
    assert admin.execute_command(*shlex.split(line)) in (b"OK", "OK", True)
    user = redis.Redis(port=port, username="faissq-searcher", password="s3cret-pw")
    assert user.exists(keys.alive_key("products")) == 0
    with pytest.raises(redis.exceptions.NoPermissionError):
        user.exists(keys.alive_key("other"))
    admin.close()
    user.close()


def test_cli_aclfile_lines_load_into_redis(
    acl_redis: tuple[int, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    port, aclfile = acl_redis
    monkeypatch.setenv("PW", "pw-1")
    lines = []
    for role in acl.Role:
        assert main(["acl", "--role", role, "--format", "aclfile", "--password-env", "PW"]) == 0
        lines.append(capsys.readouterr().out)
    aclfile.write_text(aclfile.read_text() + "".join(lines))
    admin = redis.Redis(port=port)
    assert admin.acl_load()
    assert {f"faissq-{r}" for r in acl.Role} <= set(admin.acl_users())
    admin.close()


def test_cli_without_a_password_fails_with_a_typed_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FAISSQ_ACL_PASSWORD", raising=False)
    assert main(["acl", "--role", "worker"]) == 1
    assert "faissq: invalid_parameter: set the user's password" in capsys.readouterr().err
