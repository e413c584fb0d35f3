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

from faissq import keys, shards
from faissq.cli import acl_roles as acl
from faissq.cli.main import main
from faissq.errors import InvalidParameter
from faissq.worker.embedded_redis import find_redis_server, free_port


def patterns(role: str, index: acl.Indexes, sharded: dict[str, int] | None = None) -> list[str]:
    """The key patterns (without ~ or %R~) of a role's rules, selectors included."""
    rules = acl.rules(role, index, sharded=sharded)
    words = " ".join(rules).replace("(", " ").replace(")", " ").split()
    return [w.split("~", 1)[1] for w in words if "~" in w]


def allowed(role: str, index: acl.Indexes, key: str, sharded: dict[str, int] | None = None) -> bool:
    """Whether some key pattern of the role matches the key (as Redis's glob would)."""
    return any(fnmatch.fnmatchcase(key, p) for p in patterns(role, index, sharded))


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


@pytest.mark.parametrize(
    "index", ["", "a b", "a?", "[ab]", "a\\*", "x]", "a\nb", "p:q", "{p}", "x" * 129, "~x", "(a"]
)
def test_an_index_that_could_widen_a_pattern_is_refused(index: str) -> None:
    with pytest.raises(InvalidParameter):
        acl.rules("searcher", index)
    with pytest.raises(InvalidParameter):
        acl.rules("searcher", ["products", index])


def test_several_indexes_and_a_pattern_in_one_user() -> None:
    rules = acl.rules("searcher", ["products", "tenant-*"])
    assert rules.count("resetkeys") == 1  # one user, not one reset per index
    assert len([r for r in rules if r.startswith("(")]) == len(
        [r for r in acl.rules("searcher", "products") if r.startswith("(")]
    )  # each selector once, with the patterns of every index
    for index in ("products", "tenant-a", "tenant-eu.2"):
        assert allowed("searcher", ["products", "tenant-*"], keys.rpc_queue(index)), index
        assert allowed("searcher", ["products", "tenant-*"], keys.reply_key(index, "r1")), index
    for index in ("other", "tenant", "products2"):
        assert not allowed("searcher", ["products", "tenant-*"], keys.rpc_queue(index)), index
    assert allowed("producer", ["products", "tenant-*"], keys.task_queue("tenant-a"))
    assert not allowed("producer", ["products", "tenant-*"], keys.task_queue("other"))


def test_a_sharded_index_grants_its_shards_and_its_definition() -> None:
    names = shards.shard_names("products", 3)
    for role in ("searcher", "producer", "worker"):
        rules = acl.rules(role, [], sharded={"products": 3})
        own = keys.rpc_queue if role == "searcher" else keys.task_queue  # what each must reach
        for name in names:
            assert allowed(role, [], own(name), sharded={"products": 3}), (role, name)
        for name in ("products", "products.s0of4", "products.s3of3"):
            assert not allowed(role, [], own(name), sharded={"products": 3}), (role, name)
        assert (f"%R~{keys.shard_map('products')}" in rules) == (role != "worker")
    # with other indexes in the same user
    both = acl.rules("searcher", ["plain"], sharded={"products": 2})
    assert f"~{keys.rpc_queue('plain')}" in both and f"~{keys.rpc_queue(names[0])}" not in both
    assert f"~{keys.rpc_queue('products.s1of2')}" in both
    with pytest.raises(InvalidParameter):
        acl.rules("searcher", [], sharded={"prod*": 2})  # a glob has no declared shard count
    with pytest.raises(InvalidParameter):
        acl.rules("searcher", [], sharded={"products": 0})
    with pytest.raises(InvalidParameter):
        acl.rules("searcher", [])


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


def test_cli_gives_one_user_several_indexes_a_glob_and_a_sharded_index(
    acl_redis: tuple[int, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    port, _ = acl_redis
    monkeypatch.setenv("FAISSQ_ACL_PASSWORD", "pw-2")
    argv = ["acl", "--role", "searcher", "--index", "plain", "--index", "tenant-*"]
    assert main([*argv, "--sharded", "products:2"]) == 0
    admin = redis.Redis(port=port)
    assert admin.execute_command(*shlex.split(capsys.readouterr().out)) in (b"OK", "OK", True)
    user = redis.Redis(port=port, username="faissq-searcher", password="pw-2")
    for index in ("plain", "tenant-7", "products.s0of2", "products.s1of2"):
        assert user.exists(keys.alive_key(index)) == 0
    assert user.get(keys.shard_map("products")) is None
    for index in ("other", "products", "products.s2of4"):
        with pytest.raises(redis.exceptions.NoPermissionError):
            user.exists(keys.alive_key(index))
    admin.close()
    user.close()


@pytest.mark.parametrize("value", ["products", "products:x", ":4", "products:-1"])
def test_cli_refuses_a_sharded_index_without_its_count(
    value: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAISSQ_ACL_PASSWORD", "pw")
    with pytest.raises(SystemExit):
        main(["acl", "--role", "searcher", "--sharded", value])
    assert "give NAME:S" in capsys.readouterr().err
