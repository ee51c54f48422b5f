"""The ``alkey`` command for operators: check, inspect, bump, watch and count tokens.

Why a command line: the people who run an application that caches with alkey need to
answer a few questions without writing Python -- can this Redis (and this Redis user) run
alkey at all, what token does this row have right now, how do I invalidate a table after a
migration, is anything bumping tokens, how much memory do the tokens take -- and to answer
them in scripts too, through exit codes and ``--json``. Every command reads its Redis and
key prefix as the application does, through :func:`alkey.settings.configure`
(``REDIS_URL``, ``ALKEY_KEY_PREFIX``...), unless ``--url`` or ``--prefix`` say otherwise.

The commands (``alkey COMMAND --help`` says more; the "Command line" guide shows sample
output):

* ``check`` -- Redis reachable (round-trip time), server and version, replication role
  and epoch, alkey's Lua scripts loadable, and the ACL of the current user sufficient for
  alkey, for durable mode and for the local token cache, each on a line of its own;
* ``inspect IDENTIFIER...`` -- current tokens and their remaining lifetime, without
  creating missing ones (``token`` is its deprecated alias);
* ``bump IDENTIFIER...`` (alias ``invalidate``) -- what :func:`alkey.manual.invalidate`
  does to the same identifiers; ``--all`` for everything, ``--rows`` to replace every
  stored row token of a table as well;
* ``watch`` -- every change of a token, live, through Redis's client-side caching
  invalidations (the local token cache's mechanism, :mod:`alkey.invalidations`);
* ``stats`` -- tokens per table, memory per token, durable intents pending.

An operational failure -- Redis down, a wrong password, an ACL that denies a command, a
bad URL or identifier -- is one line on stderr naming what was wrong and how to fix it,
any password masked, with an exit code of its own (:data:`EXIT_CODES`); never a
traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import random
import secrets
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from alkey.constants import (
    ALL_ROWS,
    GLOBAL_WRITE_TOKEN,
    NAMESPACE,
    ROW_SEPARATOR,
    UNKNOWN_ROWS,
    UNKNOWN_WRITES,
)
from alkey.errors import ConfigurationError, TokenStoreError, redacted
from alkey.identity import dependencies, parse_identifier
from alkey.invalidations import CHANNEL, tracking_commands
from alkey.scripts import BUMP, CLAIM, CLEAR, FETCH, INTEND, Script
from alkey.settings import (
    DEFAULT_CLIENT_OPTIONS,
    REDIS_SCHEMES,
    SENTINEL_SCHEMES,
    Configuration,
    configure,
    redis_client,
)
from alkey.tokens import RedisClient, RedisTokenStore, tracking_connection
from alkey.transports import misconfiguration
from alkey.writes import invalidation_identifiers

__all__ = [
    "EXIT_ABORTED",
    "EXIT_CODES",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "CommandError",
    "main",
]

#: Success; for ``check``: alkey can use this Redis.
EXIT_OK: Final = 0
#: ``check``: alkey cannot use this Redis; any other command: Redis answered an error.
EXIT_FAILED: Final = 1
#: A usage or configuration error: a bad option, URL, setting or identifier.
EXIT_USAGE: Final = 2
#: Redis could not be reached: connection refused, timed out, name not resolved.
EXIT_UNREACHABLE: Final = 3
#: Redis refused: authentication failed, or the user's ACL denies a command or a key.
EXIT_REFUSED: Final = 4
#: The confirmation that ``bump --all`` or ``--rows`` asks for was declined.
EXIT_ABORTED: Final = 5
#: Interrupted with Ctrl-C (``watch`` exits with :data:`EXIT_OK` instead: that is how it
#: is meant to end).
EXIT_INTERRUPTED: Final = 130

#: Every exit code and what it means, as ``alkey --help`` lists them.
EXIT_CODES: Final = {
    EXIT_OK: "success (check: alkey can use this Redis)",
    EXIT_FAILED: "check: alkey cannot use this Redis; other commands: Redis answered an error",
    EXIT_USAGE: "usage or configuration error: a bad option, URL, setting or identifier",
    EXIT_UNREACHABLE: "Redis cannot be reached: refused, timed out, name not resolved",
    EXIT_REFUSED: "Redis refused: authentication failed, or the ACL denies a command or key",
    EXIT_ABORTED: "the confirmation of bump --all or --rows was declined",
    EXIT_INTERRUPTED: "interrupted with Ctrl-C (watch exits 0 then)",
}

#: Key names no application's identifier can take (a table part is never ``~...``):
#: ``check`` writes such a scratch key, with a one-second expiry, to try ``SET``.
_SCRATCH_TABLE = "~alkey-check"
#: Keys per bump while ``bump --rows`` goes through a table (several script calls, one
#: round trip), and keys per ``SCAN`` step.
_ROWS_BATCH = 5000
_SCAN_COUNT = 1000
#: Keys whose ``MEMORY USAGE`` ``stats`` samples.
_MEMORY_SAMPLE = 200
#: The Lua no-op ``check`` runs with ``EVAL`` (and then ``EVALSHA``).
_NOOP = Script("return 1")
#: Seconds between ``watch``'s pings, and how long it waits for the answer.
_WATCH_PING = 5.0
_WATCH_PATIENCE = 10.0


class CommandError(Exception):
    """An operational error a command reports as one line on stderr, with ``code`` as the
    exit code (one of :data:`EXIT_CODES`): the message says what was wrong and how to
    fix it, and holds no password."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        #: The process's exit code.
        self.code = code
        #: The line printed after ``alkey:``.
        self.message = message


# -- output ------------------------------------------------------------------------------


def _out(line: str = "") -> None:
    print(line, file=sys.stdout, flush=True)


def _err(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _json(value: object) -> None:
    _out(json.dumps(value, indent=2, sort_keys=False))


def _marks() -> dict[str, str]:
    """The mark of each status: check marks where stdout can print them, else ASCII."""
    encoding = getattr(sys.stdout, "encoding", None) or "ascii"
    try:
        "\u2713\u2717".encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return {"ok": "[ok]  ", "fail": "[FAIL]", "warn": "[warn]", "off": "[--]  "}
    return {"ok": "\u2713", "fail": "\u2717", "warn": "!", "off": "-"}


class _Progress:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal, at most
    ten times a second; :meth:`done` clears it."""

    #: Seconds before the bar first shows: a short run draws nothing.
    delay = 0.3

    def __init__(self, label: str, total: int | None) -> None:
        self.label = label
        self.total = total
        self.shown = False
        self._enabled = sys.stderr.isatty()
        self._next = time.monotonic() + self.delay

    def update(self, done: int, note: str = "") -> None:
        if not self._enabled or time.monotonic() < self._next:
            return
        self._next = time.monotonic() + 0.1
        if self.total:
            share = min(done / self.total, 1.0)
            bar = "#" * int(share * 30)
            text = f"{self.label} [{bar:<30}] {share:4.0%} {note}"
        else:
            text = f"{self.label} {done:,} {note}"
        sys.stderr.write("\r" + text[:200].ljust(60))
        sys.stderr.flush()
        self.shown = True

    def done(self) -> None:
        if self.shown:
            sys.stderr.write("\r" + " " * 79 + "\r")
            sys.stderr.flush()
            self.shown = False


def _duration(milliseconds: int) -> str:
    """``1d2h``, ``23h59m58s``, ``4.2s``: a remaining lifetime, readably."""
    seconds = milliseconds / 1000
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    days, whole = divmod(whole, 86400)
    hours, whole = divmod(whole, 3600)
    minutes, whole = divmod(whole, 60)
    if days:
        return f"{days}d{hours}h{minutes}m"
    if hours:
        return f"{hours}h{minutes}m{whole}s"
    return f"{minutes}m{whole}s"


def _size(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GB"  # pragma: no cover


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _command(client: RedisClient, *args: Any) -> Any:
    """Send one command (redis-py leaves ``execute_command`` untyped)."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


# -- connecting ------------------------------------------------------------------------------


@dataclass
class _Context:
    """The configuration a command runs with, and its Redis client."""

    configuration: Configuration
    client: RedisClient
    #: The server as the messages name it: the URL with its password masked.
    where: str
    #: Where the URL came from, as the user would spell it (``--url``, ``REDIS_URL``).
    origin: str
    prefix: str
    as_json: bool
    closers: list[Callable[[], None]] = field(default_factory=list)

    @property
    def namespace(self) -> str:
        """The start of every token key: ``<key_prefix>alkey:``."""
        return f"{self.prefix}{NAMESPACE}:"

    def store(self) -> RedisTokenStore:
        """A token store on this client that raises instead of degrading, and logs
        nothing: the command reports errors itself."""
        return RedisTokenStore(
            self.client,
            key_prefix=self.prefix,
            ttl=self.configuration.store_options.ttl,
            on_error="raise",
            observers=[],
        )

    def explain(self, error: BaseException) -> CommandError:
        """The one line an operational ``error`` of this server is reported as."""
        return explain(error, self.where)


def explain(error: BaseException, where: str) -> CommandError:
    """A :class:`CommandError` for a client library's error (or alkey's, whose cause is
    the client library's) met at ``where``: which exit code, and a message that says what
    to fix, with passwords masked by :func:`alkey.errors.redacted`. A misconfiguration
    reads as the store's own log line says it
    (:func:`alkey.transports.misconfiguration`)."""
    cause: BaseException = error
    if isinstance(error, TokenStoreError) and error.__cause__ is not None:
        cause = error.__cause__
    text = redacted(str(cause)).strip() or type(cause).__name__
    found = misconfiguration(cause)
    if found is not None:
        code = EXIT_REFUSED if found.kind in ("credentials", "permissions") else EXIT_FAILED
        if found.kind == "permissions":
            return CommandError(
                code, f"Redis at {where}: {found.problem} ('alkey check' lists what alkey needs)"
            )
        return CommandError(code, f"Redis at {where}: {found.problem}: {found.fix}")
    if isinstance(cause, redis.exceptions.ReadOnlyError):
        return CommandError(
            EXIT_FAILED,
            f"Redis at {where} is a read-only replica: {text} (point --url at the primary)",
        )
    if isinstance(cause, redis.ConnectionError | redis.TimeoutError | OSError):
        return CommandError(
            EXIT_UNREACHABLE,
            f"cannot reach Redis at {where}: {text} (is it running? check --url or REDIS_URL)",
        )
    return CommandError(EXIT_FAILED, f"Redis at {where} answered an error: {text}")


def _configuration(args: argparse.Namespace) -> Configuration:
    options: dict[str, Any] = {
        # One attempt: an operator wants to know at once, not after redis-py's backoff.
        "retry": Retry(NoBackoff(), 0),
        "socket_timeout": args.timeout,
        "socket_connect_timeout": args.timeout,
    }
    try:
        configuration = configure(url=args.url, key_prefix=args.prefix, client_options=options)
    except ConfigurationError as error:
        raise CommandError(EXIT_USAGE, f"{error}") from None
    if configuration.scheme not in (*REDIS_SCHEMES, *SENTINEL_SCHEMES):
        raise CommandError(
            EXIT_USAGE,
            f"{configuration.redacted_url}: the alkey command speaks redis://, rediss://, "
            "unix:// and redis+sentinel:// URLs",
        )
    return configuration


@contextlib.contextmanager
def _connected(args: argparse.Namespace) -> Iterator[_Context]:
    configuration = _configuration(args)
    source = configuration.sources["url"]
    origin = "--url" if args.url else (source.name or "the default")
    try:
        client = redis_client(configuration)
    except (ValueError, redis.RedisError) as error:  # a malformed URL redis-py refuses
        raise CommandError(
            EXIT_USAGE, f"{configuration.redacted_url}: {redacted(str(error))}"
        ) from None
    context = _Context(
        configuration=configuration,
        client=client,
        where=configuration.redacted_url,
        origin=origin,
        prefix=configuration.store_options.key_prefix,
        as_json=bool(args.json),
    )
    try:
        yield context
    except (redis.RedisError, TokenStoreError, OSError) as error:
        raise context.explain(error) from None
    finally:
        for close in reversed(context.closers):
            with contextlib.suppress(Exception):
                close()
        with contextlib.suppress(Exception):
            client.close()


def _username(context: _Context) -> str:
    """The ACL user the client authenticates as: ``ACL WHOAMI``, else the URL's."""
    with contextlib.suppress(redis.RedisError):
        return _text(_command(context.client, "ACL", "WHOAMI"))
    user = urlsplit(context.configuration.url).username
    return unquote(user) if user else "default"


# -- identifiers -------------------------------------------------------------------------------


def _valid(identifier: str, *, unknown: bool = False) -> str:
    """``identifier`` if alkey's parser takes it (and, with ``unknown``, the tokens that
    unknown writes bump: ``alkey:*#?``, ``alkey:<table>#?``); a usage error naming it."""
    if unknown and identifier == UNKNOWN_WRITES:
        return identifier
    checked = identifier
    if unknown and identifier.endswith(ROW_SEPARATOR + UNKNOWN_ROWS):
        checked = identifier[: -len(UNKNOWN_ROWS)] + ALL_ROWS
    try:
        parse_identifier(checked)
    except ValueError as error:
        problem = str(error).split(". Build identifiers", 1)[0]
        if checked != identifier:
            problem = f"{identifier!r} is not a valid alkey identifier ({problem})"
        raise CommandError(EXIT_USAGE, problem) from None
    return identifier


def _meaning(identifier: str) -> str:
    """What bumping ``identifier`` changes, in a few words."""
    if identifier == GLOBAL_WRITE_TOKEN:
        return "the global token: keys that name alkey:*#*"
    if identifier == UNKNOWN_WRITES:
        return "the unknown-writes token: every key that names any token"
    table = identifier[len(NAMESPACE) + 1 : identifier.index(ROW_SEPARATOR)]
    if identifier.endswith(ROW_SEPARATOR + ALL_ROWS):
        return f"the table token: keys that name table {table}"
    if identifier.endswith(ROW_SEPARATOR + UNKNOWN_ROWS):
        return f"the unknown-rows token: every key of a row of {table}"
    return "the row token: keys of this row"


def _glob(text: str) -> str:
    """``text`` with Redis's glob characters escaped, for ``SCAN MATCH``."""
    return "".join("\\" + char if char in "*?[]\\" else char for char in text)


# -- check -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Need:
    """A command alkey sends, as ``check`` tries it: ``command`` (harmless to run as
    written, or with ``kind``'s care), and the ACL rule that grants it."""

    command: tuple[str, ...]
    grant: str
    kind: str = "plain"  # "plain", "set", "hset", "tracking", "subscribe"

    @property
    def name(self) -> str:
        words = self.command[:2] if self.command[0] in ("CLIENT", "ACL") else self.command[:1]
        return " ".join(words)


@dataclass
class _Result:
    name: str
    status: str  # "ok", "fail", "warn", "off"
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"check": self.name, "status": self.status, "detail": self.detail}


def _needs(context: _Context) -> dict[str, list[_Need]]:
    """The commands alkey sends, by feature: keys and commits, durable mode, and the local
    token cache -- with the keys and channels they touch, under the configured prefix."""
    scratch = f"{context.namespace}{_SCRATCH_TABLE}{ROW_SEPARATOR}{secrets.token_hex(8)}"
    intents = f"{context.namespace}{{intents}}"
    data = f"{intents}:data"
    absent = f"alkey-check-{secrets.token_hex(8)}"  # an intent id no writer uses
    core = [
        _Need(("PING",), "+ping"),
        _Need(("EVAL", _NOOP.source, "0"), "+eval"),
        # The no-op that EVAL just ran (and so loaded): harmless to run again.
        _Need(("EVALSHA", _NOOP.sha, "0"), "+evalsha", "script"),
        _Need(("MGET", scratch), "+mget"),
        _Need(("SET", scratch, "1", "PX", "1000"), "+set", "set"),
    ]
    if context.configuration.db:
        core.append(_Need(("SELECT", str(context.configuration.db)), "+select"))
    durable = [
        _Need(("TIME",), "+time"),
        _Need(("ZRANGEBYSCORE", intents, "-inf", "-inf", "LIMIT", "0", "1"), "+zrangebyscore"),
        _Need(("ZADD", intents, "XX", "0", absent), "+zadd"),
        _Need(("ZREM", intents, absent), "+zrem"),
        _Need(("HGET", data, absent), "+hget"),
        _Need(("HDEL", data, absent), "+hdel"),
        _Need(("HSET", data, absent, "1"), "+hset", "hset"),
    ]
    local = [
        _Need(("CLIENT", "ID"), "+client|id"),
        _Need(
            ("CLIENT", "TRACKING", "ON", "BCAST", "PREFIX", context.namespace),
            "+client|tracking",
            "tracking",
        ),
        _Need(("SUBSCRIBE", CHANNEL), f"+subscribe &{CHANNEL}", "subscribe"),
    ]
    return {"core": core, "durable": durable, "local": local}


def _grant_for(need: _Need, problem: str, namespace: str) -> str:
    """The ACL rule that would allow what ``problem`` (a refusal of ``need``) denied."""
    lowered = problem.lower()
    if "channel" in lowered:
        return f"&{CHANNEL}"
    if "key" in lowered:
        return f"~{namespace}*"
    return need.grant


def _dry_run(context: _Context, user: str, need: _Need) -> str | None:
    """``ACL DRYRUN``'s verdict on ``need`` for ``user``: ``None`` if allowed, else why."""
    answer = _text(_command(context.client, "ACL", "DRYRUN", user, *need.command))
    return None if answer == "OK" else answer


def _try(context: _Context, need: _Need) -> str | None:
    """Run ``need``'s command harmlessly: ``None`` if the server allowed it, else why not.

    Harmless: reads, removals of members that do not exist, ``ZADD XX`` of one that does
    not exist; ``SET`` of a scratch key that expires in a second; ``HSET`` of an intent id
    that no writer uses, removed at once (tried only once ``HDEL`` passed); tracking
    turned on and off again; a subscription on a connection of its own."""
    client = context.client
    try:
        if need.kind == "subscribe":
            pubsub = client.pubsub()  # type: ignore[no-untyped-call]
            try:
                pubsub.subscribe(CHANNEL)
                deadline = time.monotonic() + 2
                while time.monotonic() < deadline:
                    message = pubsub.get_message(timeout=0.2)
                    if message is not None and message.get("type") == "subscribe":
                        break
            finally:
                pubsub.close()
        elif need.kind == "tracking":
            _command(client, *need.command)
            with contextlib.suppress(redis.RedisError):
                _command(client, "CLIENT", "TRACKING", "OFF")
        elif need.kind == "script":
            # NOSCRIPT: allowed, the script is just not loaded.
            with contextlib.suppress(redis.exceptions.NoScriptError):
                _command(client, *need.command)
        else:
            _command(client, *need.command)
            if need.kind == "hset":
                _command(client, "HDEL", need.command[1], need.command[2])
    except redis.exceptions.ResponseError as error:
        return redacted(str(error)) or type(error).__name__
    return None


def _permissions(context: _Context) -> tuple[list[_Result], dict[str, Any]]:
    """The ACL lines of ``check``: what alkey needs, then durable mode, then the local
    cache, each allowed or not for the current user -- by ``ACL DRYRUN`` where the server
    has it and the user may run it, else by trying each command harmlessly."""
    user = _username(context)
    needs = _needs(context)
    method = "ACL DRYRUN"
    try:
        _dry_run(context, user, needs["core"][0])
        verdict: Callable[[_Need], str | None] = lambda need: _dry_run(context, user, need)  # noqa: E731
    except redis.exceptions.ResponseError:
        method = "tried harmlessly"

        def verdict(need: _Need) -> str | None:
            return _try(context, need)

    options = context.configuration.store_options
    # name, whether alkey needs it as configured, and its state ("" for what it always needs)
    features: dict[str, tuple[str, bool, str]] = {
        "core": ("permissions", True, ""),
        "durable": ("durable mode", options.durable, "on" if options.durable else "off"),
        "local": (
            "local cache",
            bool(options.local_cache),
            "on" if options.local_cache else "off",
        ),
    }
    results: list[_Result] = []
    report: dict[str, Any] = {"user": user, "method": method}
    for feature, group in needs.items():
        name, required, state = features[feature]
        missing: list[tuple[_Need, str]] = []
        for need in group:
            if need.kind == "hset" and any(m.command[0] == "HDEL" for m, _ in missing):
                missing.append((need, "not tried: HDEL is denied, so it could not be undone"))
                continue
            problem = verdict(need)
            if problem is not None:
                missing.append((need, problem))
        grants = list(
            dict.fromkeys(_grant_for(need, problem, context.namespace) for need, problem in missing)
        )
        report[feature] = {
            "required": required,
            "missing": [
                {
                    "command": need.name,
                    "problem": problem,
                    "grant": _grant_for(need, problem, context.namespace),
                }
                for need, problem in missing
            ],
        }
        who = f"user {user!r}"
        lead = f"{state}; " if state else ""
        if not missing:
            commands = " ".join(dict.fromkeys(need.name for need in group))
            would = "would need" if state == "off" else "needs"
            detail = f"{lead}{who} may run what it {would} ({method}): {commands}"
            results.append(_Result(name, "ok" if required else "off", detail))
            continue
        denied = ", ".join(dict.fromkeys(need.name for need, _ in missing))
        if required:
            lead = f"{state}, but " if state else ""
            detail = (
                f"{lead}{who} may not run {denied} ({method}): grant {' '.join(grants)} "
                f"({missing[0][1]})"
            )
            results.append(_Result(name, "fail", detail))
        else:
            detail = f"{lead}turning it on would need {' '.join(grants)} for {who} ({method})"
            results.append(_Result(name, "off", detail))
    return results, report


def _server(context: _Context) -> tuple[list[_Result], dict[str, Any]]:
    """The server, its version and its replication role: ``INFO server`` and
    ``INFO replication``."""
    client = context.client
    results: list[_Result] = []
    report: dict[str, Any] = {}
    try:
        info: dict[str, Any] = client.info("server")
    except redis.exceptions.ResponseError as error:
        detail = f"unknown: INFO is not permitted ({redacted(str(error))}); grant +info"
        results.append(_Result("server", "warn", detail))
        hidden = (
            "hidden: INFO is not permitted, so alkey cannot see a failover or a restart "
            "that lost writes, nor refuse a replica; keys still work (grant +info)"
        )
        results.append(_Result("replication", "warn", hidden))
        return results, report
    kind = "Valkey" if info.get("server_name") == "valkey" else "Redis"
    version = str(info.get("valkey_version") or info.get("redis_version") or "?")
    mode = str(info.get("redis_mode") or info.get("server_mode") or "standalone")
    report.update(server=kind, version=version, mode=mode)
    major = int(version.split(".")[0]) if version.split(".")[0].isdigit() else 0
    if mode == "sentinel":
        detail = f"{kind} {version} is a Sentinel: use a redis+sentinel:// URL naming it"
        results.append(_Result("server", "fail", detail))
    elif kind == "Redis" and major < 5:
        detail = f"Redis {version}: alkey needs Redis 5 or later"
        results.append(_Result("server", "fail", detail))
    else:
        results.append(_Result("server", "ok", f"{kind} {version}, {mode} mode"))

    replication: dict[str, Any] = client.info("replication")
    role = str(replication.get("role", "?"))
    replid = str(replication.get("master_replid") or "")
    epoch = replid[:16]
    report.update(role=role, epoch=epoch or None)
    if role in ("slave", "replica"):
        primary = f"{replication.get('master_host', '?')}:{replication.get('master_port', '?')}"
        detail = (
            f"a replica of {primary}: alkey reads and bumps tokens on the primary only "
            "(its fetches are refused here: READONLY); point --url at the primary"
        )
        results.append(_Result("replication", "fail", detail))
    elif not epoch:
        detail = (
            f"{role}, epoch hidden (no master_replid in INFO): alkey cannot see a failover "
            "or a restart that lost writes; keys still work"
        )
        results.append(_Result("replication", "warn", detail))
    else:
        replicas = int(replication.get("connected_slaves", 0) or 0)
        detail = f"primary, epoch {epoch}, {replicas} replica{'s' if replicas != 1 else ''}"
        results.append(_Result("replication", "ok", detail))
    try:
        memory: dict[str, Any] = client.info("memory")
    except redis.exceptions.ResponseError:
        return results, report
    policy = str(memory.get("maxmemory_policy", "?"))
    limit = int(memory.get("maxmemory", 0) or 0)
    used = _size(float(memory.get("used_memory", 0) or 0))
    bound = f"maxmemory {_size(limit)}" if limit else "no maxmemory"
    detail = f"{used} used, {bound}, policy {policy}"
    status = "ok"
    if context.configuration.store_options.durable and policy.startswith("allkeys-"):
        status = "warn"
        detail += ": durable mode's intents may be evicted; prefer volatile-lru"
    results.append(_Result("memory", status, detail))
    return results, report


def _scripts(context: _Context) -> _Result:
    """alkey's Lua scripts: loaded with ``SCRIPT LOAD``, or, where the ACL does not allow
    it (alkey itself never sends it), a no-op ``EVAL``."""
    scripts = (FETCH, BUMP, INTEND, CLEAR, CLAIM)
    try:
        for script in scripts:
            loaded = _text(_command(context.client, "SCRIPT", "LOAD", script.source))
            if loaded != script.sha:
                return _Result("scripts", "fail", f"SCRIPT LOAD answered {loaded!r}")
    except redis.exceptions.NoPermissionError:
        try:
            _command(context.client, "EVAL", _NOOP.source, "0")
        except redis.exceptions.ResponseError as error:
            return _Result("scripts", "fail", f"EVAL failed: {redacted(str(error))}")
        return _Result(
            "scripts", "ok", "EVAL runs Lua (SCRIPT LOAD is denied; alkey does not need it)"
        )
    except redis.exceptions.ResponseError as error:
        return _Result("scripts", "fail", f"alkey's scripts do not load: {redacted(str(error))}")
    return _Result("scripts", "ok", f"alkey's {len(scripts)} Lua scripts load (SCRIPT LOAD)")


def _check(args: argparse.Namespace, context: _Context) -> int:
    """``alkey check``: one line per check, exit 0 when alkey can use this Redis."""
    client = context.client
    marks = _marks()

    def emit(results: Sequence[_Result]) -> None:
        if not context.as_json:
            for result in results:
                _out(f"{marks[result.status]} {result.name}: {result.detail}")

    server = f"{context.where} (from {context.origin}, db {context.configuration.db})"
    try:
        client.ping()  # connects: not counted
        times = []
        for _ in range(args.pings):
            started = time.perf_counter()
            client.ping()
            times.append((time.perf_counter() - started) * 1000)
    except (redis.RedisError, OSError) as error:
        failure = context.explain(error)
        result = _Result("redis", "fail", failure.message)
        if context.as_json:
            _json({"usable": False, "url": context.where, "checks": [result.as_dict()]})
        else:
            emit([result])
        return EXIT_FAILED
    median = statistics.median(times)
    reach = _Result(
        "redis",
        "ok",
        f"{server} answers PING in {median:.2f} ms (median of {len(times)}, "
        f"max {max(times):.2f} ms)",
    )
    emit([reach])
    results = [reach]
    found, server_report = _server(context)
    emit(found)
    results += found
    scripts = _scripts(context)
    emit([scripts])
    results.append(scripts)
    found, acl = _permissions(context)
    emit(found)
    results += found
    usable = not any(result.status == "fail" for result in results)
    if context.as_json:
        _json(
            {
                "usable": usable,
                "url": context.where,
                "key_prefix": context.prefix,
                "round_trip_ms": round(median, 3),
                **server_report,
                "acl": acl,
                "checks": [result.as_dict() for result in results],
            }
        )
    elif usable:
        _out("alkey can use this Redis")
    else:
        _out(f"alkey cannot use this Redis: fix what is marked {marks['fail'].strip()} above")
    return EXIT_OK if usable else EXIT_FAILED


# -- inspect -----------------------------------------------------------------------------------


def _inspect(args: argparse.Namespace, context: _Context) -> int:
    """``alkey inspect``: MGET and PTTL of each identifier's key, creating nothing."""
    if args.command == "token":
        _err("alkey: 'token' is deprecated: use 'alkey inspect' (which creates no tokens)")
    identifiers = list(dict.fromkeys(args.identifiers))
    if args.deps:
        named = [i for i in identifiers if i not in (UNKNOWN_WRITES,) and not i.endswith("#?")]
        identifiers += [i for i in [*dependencies(named), UNKNOWN_WRITES] if i not in identifiers]
    keys = [context.prefix + identifier for identifier in identifiers]
    pipeline = context.client.pipeline(transaction=False)
    pipeline.mget(keys)
    for key in keys:
        pipeline.pttl(key)
    values, *lifetimes = pipeline.execute()
    rows = []
    for identifier, key, value, ttl in zip(identifiers, keys, values, lifetimes, strict=True):
        token = None if value is None else _text(value)
        ttl_ms = int(ttl)
        rows.append(
            {
                "identifier": identifier,
                "key": key,
                "token": token,
                "ttl": None if token is None or ttl_ms < 0 else ttl_ms / 1000,
            }
        )
    if context.as_json:
        _json(rows)
        return EXIT_OK
    width = max(len(identifier) for identifier in identifiers)
    for row, ttl in zip(rows, lifetimes, strict=True):
        if row["token"] is None:
            _out(f"{row['identifier']:<{width}}  missing")
            continue
        left = "no expiry" if int(ttl) < 0 else f"ttl {_duration(int(ttl))}"
        _out(f"{row['identifier']:<{width}}  {row['token']}  {left}")
    return EXIT_OK


# -- bump ----------------------------------------------------------------------------------------


def _confirm(args: argparse.Namespace, what: str) -> None:
    """Go on only with ``--yes`` or a "yes" typed at the terminal."""
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise CommandError(EXIT_USAGE, f"{what}: pass --yes to confirm (no terminal to ask on)")
    sys.stderr.write(f"{what}.\nType 'yes' to go on: ")
    sys.stderr.flush()
    if sys.stdin.readline().strip().lower() not in ("y", "yes"):
        raise CommandError(EXIT_ABORTED, "aborted: nothing was bumped")


def _scan(context: _Context, pattern: str) -> Iterator[list[Any]]:
    """The keys matching ``pattern``, a ``SCAN`` step at a time."""
    cursor = 0
    while True:
        cursor, keys = context.client.scan(cursor, match=pattern, count=_SCAN_COUNT)
        yield keys
        if cursor == 0:
            return


def _dbsize(context: _Context) -> int | None:
    try:
        return int(context.client.dbsize())
    except redis.exceptions.ResponseError:
        return None


def _bump_rows(context: _Context, store: RedisTokenStore, patterns: list[str]) -> int:
    """Bump every row token whose key matches one of ``patterns``, in batches of
    :data:`_ROWS_BATCH` (one round trip each), with a progress bar; how many."""
    progress = _Progress("bumping row tokens", _dbsize(context))
    cut = len(context.prefix)
    scanned = bumped = 0
    batch: list[str] = []
    try:
        for pattern in patterns:
            for keys in _scan(context, pattern):
                scanned += len(keys)
                for key in keys:
                    identifier = _text(key)[cut:]
                    part, separator, row = identifier.partition(ROW_SEPARATOR)
                    if (
                        not separator
                        or row in (ALL_ROWS, UNKNOWN_ROWS)
                        or part == f"{NAMESPACE}:*"
                        or part.endswith(_SCRATCH_TABLE)
                    ):
                        continue  # bumped already, durable intents, check's scratch keys
                    batch.append(identifier)
                if len(batch) >= _ROWS_BATCH:
                    store.bump(batch)
                    bumped += len(batch)
                    batch = []
                progress.update(scanned, f"{bumped:,} row tokens bumped")
        if batch:
            store.bump(batch)
            bumped += len(batch)
    except KeyboardInterrupt:
        progress.done()
        raise CommandError(
            EXIT_INTERRUPTED, f"interrupted after bumping {bumped:,} row tokens"
        ) from None
    progress.done()
    return bumped


def _bump(args: argparse.Namespace, context: _Context) -> int:
    """``alkey bump``: what :func:`alkey.manual.invalidate` does, from the command line."""
    identifiers = list(dict.fromkeys(args.identifiers))
    everything = args.all or GLOBAL_WRITE_TOKEN in identifiers
    tables = [
        i for i in identifiers if i != GLOBAL_WRITE_TOKEN and i.endswith(ROW_SEPARATOR + ALL_ROWS)
    ]
    if not identifiers and not args.all:
        raise CommandError(EXIT_USAGE, "name what to bump (e.g. 'alkey:users#1'), or --all")
    if args.rows and not tables and not everything:
        raise CommandError(
            EXIT_USAGE, "--rows needs a table identifier (e.g. 'alkey:users#*') or --all"
        )
    if everything:
        _confirm(
            args,
            f"This bumps {GLOBAL_WRITE_TOKEN} and {UNKNOWN_WRITES} on {context.where} "
            f"(key prefix {context.prefix!r}): every cache key built on alkey tokens changes, "
            "so every cached value misses once",
        )
    elif args.rows:
        _confirm(
            args,
            f"This replaces every stored row token of {', '.join(tables)} on "
            f"{context.where} (key prefix {context.prefix!r}), scanning the whole database",
        )
    targets: set[str] = set()
    for identifier in identifiers:
        targets |= invalidation_identifiers(identifier)
    if args.all:
        targets |= invalidation_identifiers(GLOBAL_WRITE_TOKEN)
    store = context.store()
    ordered = sorted(targets)
    store.bump(ordered)
    rows = 0
    if args.rows:
        namespace = _glob(context.namespace)
        if everything:
            patterns = [f"{namespace}*"]
        else:
            patterns = [f"{namespace}{_glob(t[len(NAMESPACE) + 1 : -1])}*" for t in tables]
        rows = _bump_rows(context, store, patterns)
    if context.as_json:
        _json({"url": context.where, "bumped": ordered, "rows_bumped": rows if args.rows else None})
        return EXIT_OK
    width = max(len(identifier) for identifier in ordered)
    for identifier in ordered:
        _out(f"bumped {identifier:<{width}}  {_meaning(identifier)}")
    if args.rows:
        _out(f"bumped {rows:,} stored row token{'s' if rows != 1 else ''} (--rows)")
    elif tables and not everything:
        _out(
            "A table bump changes every key of the table and of its rows (their keys "
            "depend on the table's unknown-rows token); --rows also replaces each stored "
            "row token."
        )
    return EXIT_OK


# -- watch --------------------------------------------------------------------------------------


def _watch(args: argparse.Namespace, context: _Context) -> int:
    """``alkey watch``: print each change of a token as Redis announces it, until Ctrl-C.

    The connection is made as the local token cache's is (:func:`alkey.tokens.
    tracking_connection`: the client's options, RESP2, outside its pool) and turned into
    a broadcasting tracking connection that redirects to itself
    (:func:`alkey.invalidations.tracking_commands`)."""
    connection = tracking_connection(context.client.connection_pool)
    context.closers.append(connection.disconnect)

    def ask(*command: str) -> Any:
        connection.send_command(*command)
        return connection.read_response()

    client_id = int(ask("CLIENT", "ID"))
    for command in tracking_commands(client_id, context.prefix):
        ask(*command)
    _err(f"watching tokens under {context.namespace!r} on {context.where}; press Ctrl-C to stop")
    cut = len(context.prefix)
    next_ping = time.monotonic() + _WATCH_PING
    ping_sent: float | None = None
    try:
        while True:
            wait = max(next_ping - time.monotonic(), 0.05) if ping_sent is None else 1.0
            if connection.can_read(timeout=wait):
                reply = connection.read_response()
                kind = _text(reply[0]) if isinstance(reply, list) and reply else ""
                if kind == "pong":
                    ping_sent = None
                    next_ping = time.monotonic() + _WATCH_PING
                elif kind == "message":
                    _announce(context, reply[2], cut)
            now = time.monotonic()
            if ping_sent is None and now >= next_ping:
                connection.send_command("PING")
                ping_sent = now
            elif ping_sent is not None and now - ping_sent > _WATCH_PATIENCE:
                raise redis.ConnectionError(f"no answer to PING for {_WATCH_PATIENCE:.0f} s")
    except KeyboardInterrupt:
        _err("alkey: stopped watching")
        return EXIT_OK
    except BrokenPipeError:
        return EXIT_OK


def _announce(context: _Context, keys: Any, cut: int) -> None:
    stamp = time.strftime("%H:%M:%S") + f".{int(time.time() * 1000) % 1000:03d}"
    if keys is None:
        identifiers: list[str] | None = None
    else:
        identifiers = sorted(_text(key)[cut:] for key in keys)
    if context.as_json:
        print(json.dumps({"time": time.time(), "identifiers": identifiers}), flush=True)
    elif identifiers is None:
        _out(f"{stamp}  every token (the database was flushed)")
    else:
        _out(f"{stamp}  {' '.join(identifiers)}")


# -- stats -----------------------------------------------------------------------------------------


@dataclass
class _Table:
    rows: int = 0
    table_token: bool = False
    unknown_rows: bool = False


def _stats(args: argparse.Namespace, context: _Context) -> int:
    """``alkey stats``: count the token keys (``SCAN``), sample their memory, and count
    durable mode's intents."""
    client = context.client
    total = _dbsize(context)
    progress = _Progress("counting tokens", total)
    tables: dict[str, _Table] = {}
    special = {GLOBAL_WRITE_TOKEN: False, UNKNOWN_WRITES: False}
    count = other = scanned = 0
    sample: list[Any] = []
    cut = len(context.prefix)
    for keys in _scan(context, f"{_glob(context.namespace)}*"):
        scanned += len(keys)
        for key in keys:
            identifier = _text(key)[cut:]
            part, separator, row = identifier.partition(ROW_SEPARATOR)
            if not separator or part.endswith(_SCRATCH_TABLE):
                other += 1  # durable intents, check's scratch keys
                continue
            count += 1
            if len(sample) < _MEMORY_SAMPLE:
                sample.append(key)
            elif random.randrange(count) < _MEMORY_SAMPLE:  # a reservoir sample
                sample[random.randrange(_MEMORY_SAMPLE)] = key
            if identifier in special:
                special[identifier] = True
                continue
            table = tables.setdefault(part[len(NAMESPACE) + 1 :], _Table())
            if row == ALL_ROWS:
                table.table_token = True
            elif row == UNKNOWN_ROWS:
                table.unknown_rows = True
            else:
                table.rows += 1
        progress.update(scanned, f"{count:,} tokens")
    progress.done()

    memory: dict[str, Any] = {"sampled": 0}
    if sample:
        pipeline = client.pipeline(transaction=False)
        for key in sample:
            pipeline.memory_usage(key, samples=0)
        try:
            sizes = [int(size) for size in pipeline.execute() if size is not None]
        except redis.exceptions.NoPermissionError as error:
            memory = {"error": f"MEMORY USAGE is denied ({redacted(str(error))}): grant +memory"}
        else:
            if sizes:
                each = statistics.mean(sizes)
                memory = {
                    "sampled": len(sizes),
                    "bytes_per_token": round(each, 1),
                    "estimated_bytes": round(each * count),
                }
    lease = context.configuration.store_options.lease
    intents_key = f"{context.namespace}{{intents}}"
    intents: dict[str, Any]
    try:
        seconds, micros = client.time()
        now = seconds + micros / 1_000_000
        pipeline = client.pipeline(transaction=False)
        pipeline.zcard(intents_key)
        pipeline.zcount(intents_key, "-inf", now - lease)
        pending, due = pipeline.execute()
        intents = {"pending": int(pending), "past_lease": int(due), "lease": lease}
    except redis.exceptions.NoPermissionError as error:
        intents = {"error": f"denied ({redacted(str(error))}): grant +time +zcard +zcount"}

    if context.as_json:
        _json(
            {
                "url": context.where,
                "key_prefix": context.prefix,
                "keys_in_database": total,
                "tokens": count,
                "global_token": special[GLOBAL_WRITE_TOKEN],
                "unknown_writes_token": special[UNKNOWN_WRITES],
                "tables": {
                    name: {
                        "rows": table.rows,
                        "table_token": table.table_token,
                        "unknown_rows_token": table.unknown_rows,
                    }
                    for name, table in sorted(tables.items())
                },
                "other_keys": other,
                "memory": memory,
                "durable_intents": intents,
            }
        )
        return EXIT_OK
    share = f" of {total:,} keys in db {context.configuration.db}" if total is not None else ""
    _out(f"{count:,} tokens under {context.namespace!r}{share} on {context.where}")
    present = {True: "present", False: "absent"}
    _out(
        f"global token {GLOBAL_WRITE_TOKEN}: {present[special[GLOBAL_WRITE_TOKEN]]}; "
        f"unknown-writes token {UNKNOWN_WRITES}: {present[special[UNKNOWN_WRITES]]}"
    )
    if tables:
        ranked = sorted(tables.items(), key=lambda item: (-item[1].rows, item[0]))
        shown = ranked if args.top <= 0 else ranked[: args.top]
        width = max(5, *(len(name) for name, _ in shown))
        _out(f"{'table':<{width}}  {'row tokens':>10}  table token  unknown-rows token")
        for name, table in shown:
            _out(
                f"{name:<{width}}  {table.rows:>10,}  {'yes' if table.table_token else 'no':<11}"
                f"  {'yes' if table.unknown_rows else 'no'}"
            )
        if len(shown) < len(ranked):
            _out(f"... and {len(ranked) - len(shown)} more tables (--top 0 lists them all)")
    if "error" in memory:
        _out(f"memory: {memory['error']}")
    elif memory.get("sampled"):
        _out(
            f"memory: {memory['bytes_per_token']:.0f} bytes per token (MEMORY USAGE of "
            f"{memory['sampled']} sampled), about {_size(memory['estimated_bytes'])} in all"
        )
    if "error" in intents:
        _out(f"durable intents: {intents['error']}")
    else:
        _out(
            f"durable intents: {intents['pending']:,} pending, {intents['past_lease']:,} "
            f"older than the {lease:g} s lease"
        )
    if other:
        _out(f"other keys under the prefix: {other:,} (durable intents, check's scratch keys)")
    return EXIT_OK


# -- the parser ------------------------------------------------------------------------------


_DESCRIPTION = """\
alkey keeps a random token in Redis for each row (alkey:users#1), each table
(alkey:users#*) and everything (alkey:*#*); cache keys are hashed with them, and a
commit that writes a row replaces ("bumps") its tokens. These commands inspect and
manage those tokens.
"""

_EPILOG = """\
Which Redis: --url, else REDIS_URL (or REDISTOGO_URL, OPENREDIS_URL, REDISCLOUD_URL,
REDISGREEN_URL), else redis://localhost:6379/0. Key prefix: --prefix, else
ALKEY_KEY_PREFIX or ?alkey_key_prefix= in the URL. Percent-encode reserved characters
(/ # ? @ : % & and spaces) in a password in the URL. Passwords are never printed.

exit codes:
{codes}
"""


def _epilog() -> str:
    codes = "\n".join(f"  {code:<4} {meaning}" for code, meaning in EXIT_CODES.items())
    return _EPILOG.format(codes=codes)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """The options every command takes, before or after its name."""
    default: Any = None if top else argparse.SUPPRESS
    group = parser.add_argument_group("connection and output")
    group.add_argument(
        "--url",
        default=default,
        help="the Redis URL, e.g. redis://:password@host:6379/0 (default: REDIS_URL)",
    )
    group.add_argument(
        "--prefix",
        default=default,
        metavar="KEY_PREFIX",
        help="the key prefix of the application's tokens (default: ALKEY_KEY_PREFIX, or none)",
    )
    group.add_argument(
        "--timeout",
        type=_positive,
        default=DEFAULT_CLIENT_OPTIONS["socket_timeout"] if top else argparse.SUPPRESS,
        metavar="SECONDS",
        help=(
            "how long to wait for Redis to connect and to answer "
            f"(default: {DEFAULT_CLIENT_OPTIONS['socket_timeout']:g})"
        ),
    )
    group.add_argument(
        "--json",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="print JSON instead of text",
    )


def _build_parser(*, demo: bool = True) -> argparse.ArgumentParser:
    """The ``alkey`` command's argument parser: its commands, their options and a help
    text that reads well in a terminal (plain text, exit codes in the epilog).

    ``demo``: whether to offer ``alkey demo`` (``alkey.__main__`` passes its demo to
    :func:`main`)."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="alkey",
        description=_DESCRIPTION,
        epilog=_epilog(),
        formatter_class=formatter,
    )
    _common(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, details: str, **extra: Any) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=summary,
            description=f"{summary}.\n\n{details}" if details else f"{summary}.",
            epilog=_epilog(),
            formatter_class=formatter,
            **extra,
        )
        _common(sub, top=False)
        return sub

    if demo:
        commands.add_parser(
            "demo",
            help="a guided demo on an embedded Redis (or REDIS_URL) and SQLite",
            description=(
                "A guided demo: keys changing on commit and staying put on rollback, on an\n"
                "embedded redis-server (or the Redis at REDIS_URL, under the key prefix\n"
                "alkey-demo:, cleaned up after) and SQLite in memory."
            ),
            formatter_class=formatter,
        )

    check = command(
        "check",
        "check that alkey can use this Redis",
        "One line per check: Redis reachable (PING round-trip time), server and version,\n"
        "replication role and epoch, memory policy, alkey's Lua scripts loadable, and\n"
        "whether the ACL of the current user allows what alkey needs -- with ACL DRYRUN\n"
        "where the server has it and the user may run it, else by trying each command\n"
        "harmlessly (on a scratch key that expires in a second). What durable mode and the\n"
        "local token cache would need is reported on lines of their own; they fail the\n"
        "check only when configured on (ALKEY_DURABLE, ALKEY_LOCAL_CACHE).\n"
        "Exit code 0 when alkey can use this Redis, 1 when not.",
    )
    check.add_argument(
        "--pings",
        type=int,
        default=5,
        metavar="N",
        help="PINGs to time the round trip with (default: %(default)s)",
    )
    check.set_defaults(run=_check)

    for name in ("inspect", "token"):
        deprecated = name == "token"
        sub = command(
            name,
            "deprecated alias of inspect (it no longer creates missing tokens)"
            if deprecated
            else "print current tokens without creating missing ones",
            "For each identifier: its token as stored in Redis and how long it has left to\n"
            "live (a token expires ttl seconds after its creation or its last bump), or\n"
            "'missing'. Nothing is written: a key generation would create a missing token.\n"
            "Identifiers: alkey:users#1 (a row), alkey:users#* (a table), alkey:*#* (the\n"
            "global token), and the tokens unknown writes bump: alkey:users#? (every row\n"
            "of users) and alkey:*#? (everything).",
        )
        sub.add_argument(
            "identifiers",
            nargs="+",
            metavar="IDENTIFIER",
            help="e.g. 'alkey:users#1' (quote it: # starts a comment in a shell)",
        )
        sub.add_argument(
            "--deps",
            action="store_true",
            help="also show the tokens a key naming these identifiers depends on",
        )
        sub.set_defaults(run=_inspect)

    bump = command(
        "bump",
        "bump tokens: change the cache keys of rows, tables or everything",
        "Does what alkey.invalidate() does with the same identifiers, for writes made\n"
        "behind alkey's back (a migration, another service):\n"
        "  alkey:users#1  bumps the row, its table and the global token: keys of the row,\n"
        "                 of the table and of everything change;\n"
        "  alkey:users#*  bumps the table token, the table's unknown-rows token\n"
        "                 (alkey:users#?), which every key of one of its rows depends on,\n"
        "                 and the global token: keys of the table and of all its rows\n"
        "                 change, yet the row tokens stored in Redis stay as they are;\n"
        "                 --rows replaces each of those too (SCAN of the whole database);\n"
        "  --all          bumps alkey:*#* and the unknown-writes token alkey:*#?, which\n"
        "                 every key that names any token depends on: every key changes.\n"
        "--all and --rows ask for confirmation unless --yes is given.",
        aliases=["invalidate"],
    )
    bump.add_argument(
        "identifiers",
        nargs="*",
        metavar="IDENTIFIER",
        help="e.g. 'alkey:users#1' or 'alkey:users#*' (quote them: # starts a shell comment)",
    )
    bump.add_argument(
        "--all",
        action="store_true",
        help="change every key: bump the global and unknown-writes tokens",
    )
    bump.add_argument(
        "--rows",
        action="store_true",
        help="also replace every stored row token of the tables named (of all, with --all)",
    )
    bump.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    bump.set_defaults(run=_bump)

    watch = command(
        "watch",
        "print token changes live, until Ctrl-C",
        "Subscribes to Redis's invalidation messages for the keys under the key prefix\n"
        "(CLIENT TRACKING BCAST, as the local token cache does; Redis 6 or later, and\n"
        "+client|id +client|tracking +subscribe &__redis__:invalidate in an ACL) and\n"
        "prints one line per change: the time, then the identifiers changed together.\n"
        "Redis announces every change of a token: bumps, tokens created by a first key\n"
        "generation, and tokens that expired. Ctrl-C stops it, with exit code 0.",
    )
    watch.set_defaults(run=_watch)

    stats = command(
        "stats",
        "count tokens by table, their memory, and durable intents pending",
        "SCANs the keys under the key prefix (in steps of 1000, with a progress bar on\n"
        "stderr), samples MEMORY USAGE of up to 200 tokens, and counts durable mode's\n"
        "intents, pending and older than the lease (ALKEY_LEASE).",
    )
    stats.add_argument(
        "--top",
        type=int,
        default=20,
        metavar="N",
        help="tables to list, most row tokens first (default: %(default)s; 0: all)",
    )
    stats.set_defaults(run=_stats)

    listen = command(
        "listen",
        "bump the tokens of every write PostgreSQL commits, from anywhere",
        "Reads PostgreSQL's logical decoding (the built-in pgoutput plugin, through a\n"
        "publication and a replication slot, both created on first use) and bumps each\n"
        "written row's token, its table's and the global one, as the application's own\n"
        "write of that row would: writes from psql, other services, migrations and cron\n"
        "jobs change keys too. A change is confirmed to PostgreSQL only once its bump\n"
        "reached Redis: a listener stopped or killed loses nothing, and resumes from the\n"
        "slot. Needs wal_level=logical and a role with REPLICATION (or a superuser) that\n"
        "owns the tables. A slot nobody reads makes PostgreSQL keep its log: --drop-slot\n"
        "removes the slot and the publication. Ctrl-C stops it, with exit code 0.",
    )
    listen.add_argument(
        "database",
        metavar="DATABASE_URL",
        help="the database, as a SQLAlchemy or libpq URL (postgresql://user@host/db)",
    )
    listen.add_argument("--slot", default="alkey", help="the slot's name (default: alkey)")
    listen.add_argument(
        "--publication", default="alkey", help="the publication's name (default: alkey)"
    )
    listen.add_argument(
        "--drop-slot",
        action="store_true",
        help="drop the slot and the publication, and exit (PostgreSQL keeps no more log)",
    )
    listen.add_argument(
        "--once",
        action="store_true",
        help="bump what the slot holds now, then exit (for a cron job, or a test)",
    )
    listen.add_argument(
        "--metadata",
        metavar="MODULE:NAME",
        help="the application's SQLAlchemy MetaData (myapp.models:Base.metadata): tables "
        "and keys named as the application names them, mapped subclasses included",
    )
    listen.add_argument(
        "--outbox",
        action="store_true",
        help="drain the trigger outbox (alkey install-triggers) instead of a slot: "
        "no REPLICATION needed",
    )
    listen.set_defaults(run=_listen)

    triggers = command(
        "install-triggers",
        "record writes in an outbox by triggers, for alkey listen --outbox",
        "Where logical decoding is not available (no REPLICATION privilege, wal_level\n"
        "cannot be changed): creates an outbox table and, on each table that has a primary\n"
        "key, triggers that record the keys of the rows written -- in the writing\n"
        "transaction itself -- and NOTIFY. alkey listen --outbox drains it, and deletes what\n"
        "it drained only once the bump reached Redis. Run it again after creating tables.\n"
        "--uninstall drops the triggers, their function and the outbox.",
    )
    triggers.add_argument(
        "database",
        metavar="DATABASE_URL",
        help="the database, as a SQLAlchemy or libpq URL (postgresql://owner@host/db)",
    )
    triggers.add_argument(
        "--uninstall", action="store_true", help="drop the triggers, their function and the outbox"
    )
    triggers.set_defaults(run=_install_triggers)
    return parser


# -- listen ---------------------------------------------------------------------------------------


def _database_url(text: str) -> str:
    """A libpq URL as SQLAlchemy's, with psycopg 3 (``postgresql://`` -> ``+psycopg``)."""
    for scheme in ("postgresql://", "postgres://"):
        if text.startswith(scheme):
            return "postgresql+psycopg://" + text[len(scheme) :]
    return text


def _listen(args: argparse.Namespace, context: _Context) -> int:
    """``alkey listen``: bump the tokens of the changes PostgreSQL decodes, until Ctrl-C
    (or, with ``--once``, until the slot holds nothing more)."""
    from sqlalchemy import exc as sqlalchemy_errors
    from sqlalchemy.engine import make_url

    from alkey.cdc import ChangeListener, ListenerStoppedError
    from alkey.outbox import OutboxListener

    if args.outbox and args.drop_slot:
        raise CommandError(
            EXIT_USAGE,
            "--drop-slot drops a slot, which --outbox does not use: remove the outbox "
            "with alkey install-triggers --uninstall",
        )
    url = _database_url(args.database)
    listener: ChangeListener | OutboxListener
    try:
        where = make_url(url).render_as_string(hide_password=True)
        metadata = _metadata(args.metadata) if args.metadata else None
        if args.outbox:
            listener = OutboxListener(url, tokens=context.store(), metadata=metadata)
        else:
            listener = ChangeListener(
                url,
                tokens=context.store(),
                slot=args.slot,
                publication=args.publication,
                metadata=metadata,
            )
    except (ValueError, ImportError, AttributeError, sqlalchemy_errors.ArgumentError) as error:
        raise CommandError(EXIT_USAGE, redacted(str(error))) from None
    # A listener runs for long: what goes wrong meanwhile is said on stderr, once.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("alkey: %(message)s"))
    for name in ("alkey.cdc", "alkey.outbox"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        context.closers.append(functools.partial(logger.removeHandler, handler))
    try:
        if isinstance(listener, OutboxListener):
            _err(
                f"draining the outbox of {where}, bumping tokens under "
                f"{context.namespace!r} on {context.where}"
                + ("" if args.once else "; press Ctrl-C to stop")
            )
            return _keep_listening(listener.drain, listener.run, args.once, "recorded write(s)")
        if args.drop_slot:
            listener.drop()
            _out(f"dropped slot {args.slot!r} and publication {args.publication!r} of {where}")
            return EXIT_OK
        tables = listener.create()
        _err(
            f"listening to {where} (slot {args.slot!r}, {len(tables)} table(s) published), "
            f"bumping tokens under {context.namespace!r} on {context.where}"
            + ("" if args.once else "; press Ctrl-C to stop")
        )
        return _keep_listening(listener.poll, listener.run, args.once, "transaction(s)")
    except ListenerStoppedError as error:
        raise CommandError(EXIT_FAILED, f"the database {where}: {error}") from None
    except sqlalchemy_errors.DBAPIError as error:
        original = getattr(error, "orig", None) or error
        raise CommandError(
            EXIT_FAILED, f"the database {where}: {redacted(str(original)).strip()}"
        ) from None
    finally:
        listener.close()


def _keep_listening(
    step: Callable[[], int], run: Callable[[threading.Event], None], once: bool, what: str
) -> int:
    """``--once``: ``step`` until it finds nothing, then the total of ``what``; else
    ``run`` until Ctrl-C."""
    if once:
        total = 0
        while found := step():
            total += found
        _out(f"bumped the tokens of {total} {what}")
        return EXIT_OK
    try:
        run(threading.Event())
    except KeyboardInterrupt:
        _err("alkey: stopped listening")
    return EXIT_OK


def _metadata(spec: str) -> Any:
    """The object ``module:attribute.path`` names (``--metadata``)."""
    import importlib

    module, _, path = spec.partition(":")
    if not module or not path:
        raise ValueError(
            f"--metadata {spec!r}: give it as module:name, e.g. myapp.models:Base.metadata"
        )
    found: Any = importlib.import_module(module)
    for part in path.split("."):
        found = getattr(found, part)
    from sqlalchemy import MetaData

    if not isinstance(found, MetaData):
        raise ValueError(f"--metadata {spec!r} is a {type(found).__name__}, not a MetaData")
    return found


def _install_triggers(args: argparse.Namespace, context: _Context) -> int:
    """``alkey install-triggers``: the trigger outbox, installed (or removed)."""
    from sqlalchemy import exc as sqlalchemy_errors
    from sqlalchemy.engine import make_url

    from alkey.outbox import OutboxListener

    url = _database_url(args.database)
    try:
        where = make_url(url).render_as_string(hide_password=True)
        outbox = OutboxListener(url, tokens=context.store())
    except (ValueError, ImportError, sqlalchemy_errors.ArgumentError) as error:
        raise CommandError(EXIT_USAGE, redacted(str(error))) from None
    try:
        if args.uninstall:
            outbox.uninstall()
            _out(f"removed alkey's outbox, its triggers and their function from {where}")
            return EXIT_OK
        tables = outbox.install()
        _out(f"installed alkey's outbox triggers on {len(tables)} table(s) of {where}")
        for table in tables:
            _out(f"  {table}")
        return EXIT_OK
    except sqlalchemy_errors.DBAPIError as error:
        original = getattr(error, "orig", None) or error
        raise CommandError(
            EXIT_FAILED, f"the database {where}: {redacted(str(original)).strip()}"
        ) from None
    finally:
        outbox.close()


def _quiet_logging() -> None:
    """alkey's loggers say nothing here: the commands report what goes wrong themselves
    (and Python's last-resort handler would print warnings on stderr)."""
    logger = logging.getLogger(NAMESPACE)
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())


def main(argv: Sequence[str] | None = None, *, demo: Callable[[], None] | None = None) -> int:
    """Run the ``alkey`` command with ``argv`` (default: the process's arguments); return
    its exit code (:data:`EXIT_CODES`).

    Operational errors are one line on stderr, never a traceback. ``demo`` runs ``alkey
    demo``; ``alkey.__main__.main``, the console script, passes the guided demo.
    """
    parser = _build_parser(demo=demo is not None)
    try:
        args = parser.parse_args(argv)
    except SystemExit as leaving:  # --help, or a usage error argparse printed
        return leaving.code if isinstance(leaving.code, int) else EXIT_USAGE
    if args.command == "demo":
        assert demo is not None
        try:
            demo()
        except (ValueError, RuntimeError, redis.RedisError) as error:
            _err(f"alkey: {redacted(str(error))}")
            return EXIT_USAGE
        return EXIT_OK
    _quiet_logging()
    identifiers: list[str] = getattr(args, "identifiers", [])
    try:
        # Checked before connecting: a bad identifier is a usage error whatever Redis does.
        for identifier in identifiers:
            _valid(identifier, unknown=args.command in ("inspect", "token"))
    except CommandError as error:
        _err(f"alkey: {error.message}")
        return error.code
    run: Callable[[argparse.Namespace, _Context], int] = args.run
    try:
        with _connected(args) as context:
            return run(args, context)
    except CommandError as error:
        _err(f"alkey: {error.message}")
        return error.code
    except KeyboardInterrupt:
        if args.command == "watch":
            return EXIT_OK
        _err("alkey: interrupted")
        return EXIT_INTERRUPTED
