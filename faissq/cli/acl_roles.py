"""Redis ACL roles (searcher, producer, worker, monitor, flower) built from `faissq.keys`.

Each role is the least a party needs on a Redis 7 server: the commands it sends and the keys and
pub/sub channels it touches. Keys named by `faissq.keys` come from its functions; Celery's and
kombu's own names (its binding sets, the ``unacked`` hash, result keys, event and control
channels) are listed here once, with why each is needed. Scripts run with the caller's rights,
so every command the search submit script calls is granted to the searcher.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

from faissq import keys
from faissq.errors import InvalidParameter

ALL = "*"  # the index argument that grants a role on every index
INDEX_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")  # no glob or ACL syntax inside a key pattern
# an index name or a glob of names: '*' is the one glob character, since '?', '[' or '\\' and
# ACL syntax (spaces, parentheses, ~ % &) could reach keys no index name can have
INDEX_GLOB = re.compile(r"[A-Za-z0-9_.*-]{1,128}")

# kombu's Redis transport (kombu/transport/redis.py), shared by every queue on the server
# one set per exchange (which queues it routes to), and the set of its members that never expire
BINDING_SETS = ("_kombu.binding.{}", "_kombu.binding_permanent.{}")
# the exchanges of Celery's own expiring queues: events, control inboxes, control replies
CELERY_EXCHANGES = ("celeryev", "celery.pidbox", "reply.celery.pidbox")
UNACKED = ("unacked", "unacked_index", "unacked_mutex")  # delivered, not yet acked jobs
RESULT_KEYS = "celery-task-meta-*"  # the Redis result backend: one key (and channel) per task
PIDBOX_QUEUES = "*.celery.pidbox"  # a node's control inbox; *.reply.celery.pidbox: the replies
REPLY_QUEUES = "*.reply.celery.pidbox"  # the reply queue of one inspect or control call
EVENT_QUEUES = "celeryev.*"  # a consumer's own fanout queue of events (gossip, monitors)
BINDING_DEADLINES = "_kombu.binding_deadlines"  # when an expiring queue's binding is swept
# kombu's fanout exchanges are pub/sub channels /<db>.<exchange>/<routing key>; it consumes
# them with PSUBSCRIBE, whose pattern Redis checks literally, so those patterns are exact here
EVENT_CHANNELS = "/{db}.celeryev/*"  # task and worker events; also Flower's PSUBSCRIBE
SENT_CHANNEL = "/{db}.celeryev/task.sent"  # the event a producer sends with each job
GOSSIP_CHANNELS = "/{db}.celeryev/worker.*"  # a worker's PSUBSCRIBE to other workers' events
PIDBOX_CHANNEL = "/{db}.celery.pidbox"  # control broadcasts (revoke, ping, shutdown, ...)

# what kombu runs to declare a queue's binding: a transaction, or a script for an expiring queue
BINDING_WRITES = ("+multi", "+exec", "+sadd", "+evalsha", "+eval", "+script|load",
                  "+script|exists", "+time", "+zadd")  # fmt: skip
SUBSCRIBER = ("+subscribe", "+psubscribe", "+unsubscribe", "+punsubscribe")

# every client may check its connection; redis-py's CLIENT SETINFO handshake is left refused
# (redis-py ignores its failure, and Redis before 7.2 would reject the rule as unknown)
CONNECTION = ("+ping", "+echo")


class Role(StrEnum):
    """A party that talks to the faissq Redis, each with its own ACL user."""

    searcher = "searcher"
    """SearchClient / AsyncSearchClient / `faissq search`: the RPC of given indexes only."""
    producer = "producer"
    """JobClient and the job commands of the CLI: enqueue jobs and read their results."""
    worker = "worker"
    """The writer (Celery worker + search loops) and search-only replicas."""
    monitor = "monitor"
    """`faissq status`: reads keys, listens to events, changes no job, index or worker."""
    flower = "flower"
    """Flower: the monitor's reads plus control broadcasts, which its event capture sends."""


@dataclass(frozen=True)
class RuleSet:
    """The parts of one ACL user: commands, key patterns (~ any, %R~ read-only), channels,
    and selectors (Redis 7): further command and key sets, each allowed only together."""

    commands: tuple[str, ...]
    keys: tuple[str, ...]
    channels: tuple[str, ...] = ()
    selectors: tuple[tuple[str, ...], ...] = ()

    def rules(self, db: int = 0) -> list[str]:
        """The ACL rules in order, starting from nothing; db: the Redis database Celery uses."""
        head = ["resetkeys", "resetchannels", "-@all"]
        # "{db}" by replace, not str.format: key patterns hold the index's {hash tag} braces
        channels = [f"&{c.replace('{db}', str(db))}" for c in self.channels]
        selectors = [
            "(" + " ".join(rules).replace("{db}", str(db)) + ")" for rules in self.selectors
        ]
        return head + list(self.commands) + list(self.keys) + channels + selectors


def check_index(index: str) -> str:
    """Return the index name or glob, or raise InvalidParameter when it cannot go into a key
    pattern."""
    if not INDEX_GLOB.fullmatch(index):
        raise InvalidParameter(f"index {index!r}: use letters, digits, '_', '.', '-' or '*'")
    return index


def merge(sets: Sequence[RuleSet]) -> RuleSet:
    """One user's rules on several indexes: a role's commands, every index's patterns.

    A role's rule sets differ only in their patterns, so the n-th selector of each gives one
    selector: its commands once, the patterns of all.
    """
    first = sets[0]
    selectors = tuple(
        tuple(dict.fromkeys(w for s in sets for w in s.selectors[i]))
        for i in range(len(first.selectors))
    )
    return RuleSet(
        first.commands,
        tuple(dict.fromkeys(k for s in sets for k in s.keys)),
        tuple(dict.fromkeys(c for s in sets for c in s.channels)),
        selectors,
    )


def bindings(exchange: str) -> tuple[str, ...]:
    """The ~patterns of kombu's binding sets of one exchange (Celery names it as its queue)."""
    return tuple(f"~{k.format(exchange)}" for k in BINDING_SETS)


def searcher(index: str) -> RuleSet:
    """Submit script on the request list, the alive key, its reply keys, BRPOP; heartbeats read."""
    index = check_index(index)
    rpc, replies = keys.rpc_queue(index), f"{keys.reply_prefix(index)}*"
    return RuleSet(
        # Redis checks the keys an EVAL declares for read and write, so the script's three
        # keys are granted here with nothing that writes; the selectors below grant the
        # writes the script makes, each on its own key
        commands=(*CONNECTION, "+eval", "+evalsha", "+get", "+exists"),
        keys=(f"~{rpc}", f"~{keys.alive_key(index)}", f"~{replies}", f"%R~{keys.shard_map(index)}"),
        selectors=(
            ("+lpush", "+llen", f"~{rpc}"),  # the request, below the bound
            ("+lpush", "+expire", "+brpop", f"~{replies}"),  # busy/no worker answers; the wait
            ("+scan", "+mget", f"%R~{keys.heartbeat_pattern(index)}"),  # workers()
        ),
    )


def producer(index: str) -> RuleSet:
    """Celery's send_task onto the index queues and the result backend's reads; nothing else."""
    index = check_index(index)
    queue = keys.task_queue(index)
    return RuleSet(
        # reads only: each write below is a selector, allowed on its own keys alone
        commands=(*CONNECTION, "+get", "+mget", "+scan", *SUBSCRIBER),
        keys=(
            f"%R~{RESULT_KEYS}",  # AsyncResult.get
            f"%R~{keys.heartbeat_pattern(index)}",  # the CLI warns when no worker beats
            f"%R~{keys.shard_map(index)}",  # JobClient asks once whether the index is sharded
        ),
        channels=(RESULT_KEYS,),  # result notifications
        selectors=(
            ("+lpush", "+llen", f"~{queue}"),  # the job, and the queue declare; never a pop
            # kombu declares the queue's binding (a transaction) and routes by reading it
            ("+sadd", "+smembers", "+multi", "+exec", *bindings(queue)),
            ("+publish", f"&{SENT_CHANNEL}"),  # the task-sent event, for Flower's task list
        ),
    )


def worker(index: str) -> RuleSet:
    """The Celery worker, its search loops and replicas: their queues, kombu's and Celery's keys."""
    index = check_index(index)
    queue = keys.task_queue(index)
    return RuleSet(
        # kombu, Celery and redis-py locks use lists, hashes, sorted sets, sets, strings,
        # transactions, scripts and pub/sub; nothing that administers the server or its scripts
        commands=(
            *CONNECTION,
            "+@read",
            "+@write",
            "+@list",
            "+@hash",
            "+@sortedset",
            "+@set",
            "+@string",
            "+@keyspace",
            "+@transaction",
            "+eval",
            "+evalsha",
            "+script|load",
            "+script|exists",
            "+@pubsub",
            "+@connection",
            "-@admin",
            "-@dangerous",
            "+info",
            "+time",
        ),
        keys=(
            f"~{keys.index_pattern(index)}",  # request list, replies, alive, heartbeats, dead list
            f"~{queue}",  # its job queue
            f"~{keys.inflight_list(queue)}",  # the at-least-once fetch
            f"~{keys.delivery_key('*')}",  # delivery counters (by task id)
            *bindings(queue),  # its queue's, and those of Celery's event and control queues
            *(b for exchange in CELERY_EXCHANGES for b in bindings(exchange)),
            f"~{BINDING_DEADLINES}",  # when its expiring queues' bindings are swept
            *(f"~{k}" for k in UNACKED),
            f"~{RESULT_KEYS}",
            f"~{PIDBOX_QUEUES}",
            f"~{EVENT_QUEUES}",
        ),
        channels=(RESULT_KEYS, EVENT_CHANNELS, GOSSIP_CHANNELS, PIDBOX_CHANNEL),
    )


def monitor(index: str) -> RuleSet:
    """Read-only: heartbeats, queue depths, results, events; no control, no jobs, no writes."""
    check_index(index)
    return RuleSet(
        commands=(*CONNECTION, "+@read", "-@dangerous", *SUBSCRIBER),
        keys=("%R~*",),
        channels=(EVENT_CHANNELS, RESULT_KEYS),
    )


def flower(index: str) -> RuleSet:
    """The monitor, plus what Flower's event capture and worker pages write and broadcast.

    Flower's event receiver registers its own fanout queue in kombu's binding table, and its
    capture broadcasts a ``heartbeat`` control command; Redis cannot tell that PUBLISH from a
    ``shutdown`` one, so this user can control workers: give it to Flower alone, behind its
    authentication.
    """
    base = monitor(index)
    # its event queue's binding: declared and refreshed by kombu's script, swept when overdue,
    # removed at close (exact keys: a glob here could also match an index's job binding)
    listener = (*BINDING_WRITES, "+srem", "+zrem", "+del", *bindings("celeryev"),
                f"~{EVENT_QUEUES}", f"~{BINDING_DEADLINES}")  # fmt: skip
    control = ("+publish", f"&{PIDBOX_CHANNEL}")
    # an inspect call's reply queue: declared, read, deleted, and its binding removed
    replies = (*BINDING_WRITES, "+srem", "+zrem", "+brpop", "+lpop", "+rpop", "+del",
               f"~{REPLY_QUEUES}", *bindings("reply.celery.pidbox"),
               f"~{BINDING_DEADLINES}")  # fmt: skip
    return RuleSet(base.commands, base.keys, base.channels, (listener, control, replies))


BUILDERS = {
    Role.searcher: searcher,
    Role.producer: producer,
    Role.worker: worker,
    Role.monitor: monitor,
    Role.flower: flower,
}


Indexes = str | Sequence[str]  # one index name or glob, or several


def rules(
    role: Role | str, index: Indexes = ALL, db: int = 0, sharded: Mapping[str, int] | None = None
) -> list[str]:
    """The ACL rules of a role on some indexes (names or globs; "*": every index) and Redis
    database; sharded: each sharded index's name and shard count (its shards are indexes)."""
    if not 0 <= db < 1 << 16:
        raise InvalidParameter(f"db must be a Redis database number, got {db}")
    from faissq.shards import shard_names  # numpy-backed: kept off `faissq acl --help`

    names = [index] if isinstance(index, str) else list(index)
    for name, count in (sharded or {}).items():
        if not INDEX_NAME.fullmatch(name):
            raise InvalidParameter(f"sharded index {name!r}: give its declared name, not a glob")
        names += shard_names(name, count)
    if not names:
        raise InvalidParameter("name at least one index (or '*')")
    build = BUILDERS[Role(role)]
    ruleset = merge([build(name) for name in dict.fromkeys(names)])
    if sharded and Role(role) in (Role.searcher, Role.producer):
        # their clients read a sharded index's definition before they reach its shards
        maps = tuple(f"%R~{keys.shard_map(name)}" for name in sharded)
        ruleset = replace(ruleset, keys=ruleset.keys + maps)
    return ruleset.rules(db)


def password_hash(password: str) -> str:
    """The ``#<sha256>`` ACL form of a password, so no clear text is printed or stored."""
    if not password:
        raise InvalidParameter("an empty password is not accepted")
    return "#" + hashlib.sha256(password.encode()).hexdigest()


def setuser(
    user: str,
    role: Role | str,
    index: Indexes,
    password: str,
    db: int = 0,
    sharded: Mapping[str, int] | None = None,
) -> list[str]:
    """The ACL SETUSER arguments of one user: reset, enabled, password, the role's rules."""
    return [user, "reset", "on", password_hash(password), *rules(role, index, db, sharded)]
