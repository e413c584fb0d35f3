"""`faissq acl`: print the Redis ACL user of one role, as an ACL SETUSER command or aclfile line."""

from __future__ import annotations

import argparse
import os
import shlex

from faissq.cli import acl_roles as acl
from faissq.config import Settings
from faissq.errors import InvalidParameter


def add_acl_args(p: argparse.ArgumentParser) -> None:
    """Arguments of `faissq acl`."""
    p.add_argument("--role", required=True, choices=[r.value for r in acl.Role])
    p.add_argument(
        "--index",
        action="append",
        metavar="NAME",
        help="index the role is limited to: a name, or a glob of names with '*' (repeatable, "
        "all in one user; default '*': every index); no effect on monitor and flower, which "
        "read every key",
    )
    p.add_argument(
        "--sharded",
        action="append",
        metavar="NAME:S",
        type=sharded_arg,
        help="a sharded index and its shard count: its S shard indexes, and for searcher and "
        "producer the read of its definition (repeatable)",
    )
    p.add_argument(
        "--db", type=int, default=0, help="Redis database of FAISSQ_REDIS__URL (default 0)"
    )
    p.add_argument("--user", help="ACL user name (default: faissq-<role>)")
    p.add_argument(
        "--password-env",
        default="FAISSQ_ACL_PASSWORD",
        metavar="VAR",
        help="environment variable holding the user's password; only its sha256 is printed "
        "(default FAISSQ_ACL_PASSWORD)",
    )
    p.add_argument(
        "--format",
        choices=["setuser", "aclfile"],
        default="setuser",
        help="an ACL SETUSER command for redis-cli (default) or a line of a Redis aclfile",
    )


def sharded_arg(value: str) -> tuple[str, int]:
    """NAME:S of --sharded as (name, shard count)."""
    name, _, count = value.rpartition(":")
    if not name or not count.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r}: give NAME:S, e.g. products:4")
    return name, int(count)


def run_acl(args: argparse.Namespace, settings: Settings) -> int:
    """Print the user's definition; the password comes from the environment, never argv."""
    user = args.user or f"faissq-{args.role}"
    if not acl.INDEX_NAME.fullmatch(user):
        raise InvalidParameter(f"user {user!r}: use letters, digits, '_', '.', '-'")
    password = os.environ.get(args.password_env, "")
    if not password:
        raise InvalidParameter(f"set the user's password in ${args.password_env}")
    sharded = dict(args.sharded or [])
    indexes = args.index or ([] if sharded else [acl.ALL])
    words = acl.setuser(user, args.role, indexes, password, args.db, sharded)
    if args.format == "aclfile":
        print("user " + " ".join(words))
    else:
        print(" ".join(shlex.quote(w) for w in ["ACL", "SETUSER", *words]))
    return 0
