"""The Lua scripts behind the token stores, and the script calls of each store call.

Why a module of its own: what a fetch, a bump or an intent *sends* is the same for every
store and every client library (redis-py, its asyncio client, their cluster clients);
only how it travels differs (:mod:`alkey.transports`). Everything here is pure
bookkeeping -- no I/O, no client library -- so the store core (:mod:`alkey.tokens`) can
build its round trips here and hand them to whichever transport it has.

On a Redis Cluster a script may only touch keys of one hash slot (``CROSSSLOT``
otherwise), so a clustered :class:`ScriptCalls` splits every call by slot
(:func:`key_slot`, computed here without a client library); the transport then sends the
calls of each node in one pipeline, to all nodes at once.
"""

from __future__ import annotations

import binascii
import hashlib
import math
import secrets
from collections.abc import Collection, Sequence
from typing import Any, TypeAlias

from alkey.constants import DEFAULT_TOKEN_TTL, TOKEN_BYTES
from alkey.errors import ConfigurationError

__all__ = [
    "CHUNK_SIZE",
    "CLAIM_LIMIT",
    "CLUSTER_SLOTS",
    "EPOCH_LENGTH",
    "Call",
    "Script",
    "ScriptCalls",
    "fresh",
    "key_slot",
    "new_token",
    "slot_groups",
]

#: The hash slots of a Redis Cluster.
CLUSTER_SLOTS = 16384


def key_slot(key: str) -> int:
    """The Redis Cluster hash slot of ``key``, as the server computes it.

    CRC16 (the XMODEM variant, which :func:`binascii.crc_hqx` computes in C) of the key's
    UTF-8 bytes, modulo 16384 -- or, if the key holds a non-empty hash tag (the text
    between its first ``{`` and the next ``}``), of the tag alone, so that keys sharing a
    tag share a slot (durable mode's ``alkey:{intents}`` keys do; so would every key under
    a ``key_prefix`` such as ``{myapp}:``). Why here and not the client library's: what a
    call sends is worked out without one, and the grouping must match the server's
    exactly whichever client carries the calls (``tests/test_cluster.py`` checks it
    against ``CLUSTER KEYSLOT``).
    """
    data = key.encode()
    start = data.find(b"{")
    if start != -1:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    return binascii.crc_hqx(data, 0) % CLUSTER_SLOTS


def slot_groups(keys: Sequence[str]) -> list[list[int]]:
    """The positions of ``keys`` grouped by hash slot -- slots in the order they first
    appear, positions in order within each: how a clustered call is split."""
    groups: dict[int, list[int]] = {}
    for position, key in enumerate(keys):
        slot = key_slot(key)
        group = groups.get(slot)
        if group is None:
            groups[slot] = [position]
        else:
            group.append(position)
    return list(groups.values())


#: Hex digits of the server's replication id kept in a token's epoch: 64 bits, so that two
#: dataset histories never share one by chance.
EPOCH_LENGTH = 16


def new_token() -> str:
    """A fresh random token (128 bits, URL-safe text)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def fresh(identifiers: Sequence[str]) -> list[str]:
    """Tokens for a call that cannot use Redis's: new random ones, a guaranteed miss."""
    return [new_token() for _ in identifiers]


# KEYS: token keys. ARGV[1]: TTL in seconds, ARGV[2]: a fresh random base. Returns the
# server's epoch (see below), then the token of every key, creating missing ones as
# <base>.<position>: unique per key and call, and unpredictable, because the base is 128
# random bits drawn for this call.
#
# The epoch is the server's replication id (INFO replication: master_replid), which Redis
# defines as "a history of the dataset": it is drawn anew whenever this server's data may
# have lost or diverged from acknowledged writes -- a restart (from an RDB snapshot or an
# AOF, or empty), a replica promoted to primary (by hand, by Sentinel, by a cluster
# failover) -- and never otherwise, but for one harmless case (a primary whose replicas
# were all gone for repl-backlog-ttl). Folded into every token, it makes the keys built
# after such an event differ from every key built before it, instead of reverting to the
# keys of tokens the lost writes had replaced. Read in the same script as the tokens, it
# is the epoch of exactly the data they come from. A replica is refused (its tokens may
# lag the primary's acknowledged bumps): the error starts with READONLY, which clients
# read as "not the primary (any more)". A server that hides the id (a proxy, an ACL
# without +info) gives an empty epoch, which the store reports once.
FETCH_SCRIPT = """
local info = redis.pcall('INFO', 'replication')
local epoch = ''
if type(info) == 'string' then
  if string.find(info, 'role:slave', 1, true) or string.find(info, 'role:replica', 1, true) then
    return redis.error_reply('READONLY alkey reads tokens only from the primary')
  end
  epoch = string.match(info, 'master_replid:(%x+)') or ''
end
local tokens = redis.call('MGET', unpack(KEYS))
for i = 1, #KEYS do
  if not tokens[i] then
    tokens[i] = ARGV[2] .. '.' .. i
    redis.call('SET', KEYS[i], tokens[i], 'EX', ARGV[1])
  end
end
table.insert(tokens, 1, epoch)
return tokens
"""

# KEYS: token keys. ARGV as above. Gives every key a new token.
BUMP_SCRIPT = """
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], ARGV[2] .. '.' .. i, 'EX', ARGV[1])
end
return #KEYS
"""

# Durable mode. KEYS[1]: the intents (a sorted set: intent id -> server time it was
# written), KEYS[2]: their identifiers (a hash: intent id -> identifiers, one per line).
# Both names share a hash tag, so a cluster would keep them on one node.

# ARGV[1]: intent id, ARGV[2]: identifiers. Written just before the database COMMIT.
INTEND_SCRIPT = """
local now = redis.call('TIME')
redis.call('ZADD', KEYS[1], now[1] + now[2] / 1000000, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
"""

# ARGV: intent ids whose bump has been done. Sent in the bump's own pipeline, which is
# not a transaction: it must fail whenever the bump does. The one failure they would not
# share is a full Redis (maxmemory, noeviction), which refuses the bump's SET but not
# ZREM. So the script starts with a ZADD that adds nothing (XX: only existing members)
# yet, like SET, may grow memory: Redis refuses it in a full Redis and stops the script
# there, leaving the intent for a claimer.
CLEAR_SCRIPT = """
redis.call('ZADD', KEYS[1], 'XX', 0, '')
redis.call('ZREM', KEYS[1], unpack(ARGV))
redis.call('HDEL', KEYS[2], unpack(ARGV))
return #ARGV
"""

# ARGV[1]: lease in seconds, ARGV[2]: most intents to claim. Returns id, identifiers, ...
# of the intents older than the lease, and leases them again to the caller, who bumps
# them and clears them; if the caller dies too, they fall due again a lease later.
CLAIM_SCRIPT = """
local now = redis.call('TIME')
now = now[1] + now[2] / 1000000
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]),
                       'LIMIT', 0, tonumber(ARGV[2]))
local claimed = {}
for _, id in ipairs(due) do
  local identifiers = redis.call('HGET', KEYS[2], id)
  if identifiers then
    redis.call('ZADD', KEYS[1], now, id)
    claimed[#claimed + 1] = id
    claimed[#claimed + 1] = identifiers
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return claimed
"""

#: Intents one claim takes at most: the size of one batch of a recovery, so that no single
#: script run or round trip grows with the backlog.
CLAIM_LIMIT = 100

#: Keys per script call. Larger bumps are split into several calls sent in one pipeline
#: (still one round trip), which bounds the size of each command and of each script run.
CHUNK_SIZE = 1000


def _with_epoch(values: list[Any]) -> list[str]:
    """One fetch call's tokens (``values[1:]``), each with the call's epoch (``values[0]``)."""
    epoch = values[0]
    if type(epoch) is bytes:  # redis-py's default: bytes
        tail = b"@" + epoch[:EPOCH_LENGTH]
        tokens = values[1:]
        # One join, one decode and one split, in C, however many tokens; per token only
        # if one holds a NUL (alkey's never do).
        joined = ((tail + b"\0").join(tokens) + tail).decode("ascii").split("\0")
        if len(joined) == len(tokens):
            return joined
        return [(v + tail).decode("ascii") for v in tokens]
    text = "@" + str(epoch)[:EPOCH_LENGTH]  # a client built with decode_responses=True
    return [str(v) + text for v in values[1:]]


class Script:
    """A Lua script and its SHA1, the name ``EVALSHA`` runs it by once Redis has it."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        #: The Lua source.
        self.source = source
        #: The source's SHA1, hex: the name ``EVALSHA`` runs the script by.
        self.sha = hashlib.sha1(source.encode("ascii")).hexdigest()


# The name alkey used before the scripts had a module of their own.
_Script = Script

FETCH = Script(FETCH_SCRIPT)
BUMP = Script(BUMP_SCRIPT)
INTEND = Script(INTEND_SCRIPT)
CLEAR = Script(CLEAR_SCRIPT)
CLAIM = Script(CLAIM_SCRIPT)

#: One script call: the script, its keys, its other arguments. A round trip is a list of
#: them; a transport decides how they travel (``EVAL``/``EVALSHA``, one pipeline).
Call: TypeAlias = "tuple[Script, list[str], tuple[Any, ...]]"


class ScriptCalls:
    """Builds the script calls of a fetch or bump, and reads a fetch's answer.

    Pure bookkeeping, no I/O: the sync and asyncio stores send the calls through their
    transports. ``clustered``: for a Redis Cluster, each call's keys are of one hash slot
    (a call per slot, and per :data:`CHUNK_SIZE` keys within it); otherwise calls are cut
    by size alone, and a single Redis pays nothing for the cluster's needs.
    """

    def __init__(
        self, ttl: int = DEFAULT_TOKEN_TTL, key_prefix: str = "", *, clustered: bool = False
    ) -> None:
        if ttl <= 0:
            raise ConfigurationError(f"ttl must be a positive number of seconds, not {ttl!r}")
        self.ttl = ttl
        self.key_prefix = key_prefix
        self.clustered = clustered
        #: Where durable mode keeps intents. No identifier can take these names: every
        #: identifier has a ``#``.
        self.intent_keys = [f"{key_prefix}alkey:{{intents}}", f"{key_prefix}alkey:{{intents}}:data"]

    def _keys(self, identifiers: Collection[str]) -> list[str]:
        prefix = self.key_prefix
        return [prefix + identifier for identifier in identifiers] if prefix else list(identifiers)

    def _calls(self, script: Script, identifiers: Collection[str]) -> list[Call]:
        keys = self._keys(identifiers)
        if self.clustered:
            return [
                (script, [keys[position] for position in chunk], (self.ttl, new_token()))
                for chunk in self._chunks(keys)
            ]
        return [
            (script, keys[start : start + CHUNK_SIZE], (self.ttl, new_token()))
            for start in range(0, len(keys), CHUNK_SIZE)
        ]

    @staticmethod
    def _chunks(keys: Sequence[str]) -> list[list[int]]:
        """A clustered call's positions: by slot, then at most :data:`CHUNK_SIZE` each."""
        return [
            group[start : start + CHUNK_SIZE]
            for group in slot_groups(keys)
            for start in range(0, len(group), CHUNK_SIZE)
        ]

    def bump(self, identifiers: Collection[str], intents: Collection[str] = ()) -> list[Call]:
        """The bump, then the clearing of the intents it carries out."""
        calls = self._calls(BUMP, identifiers) if identifiers else []
        if intents:
            calls.append((CLEAR, self.intent_keys, tuple(intents)))
        return calls

    def intend(self, intent: str, identifiers: Collection[str]) -> list[Call]:
        """Durable mode's record that ``identifiers`` are about to be bumped, as
        ``intent``: a store that finds it older than the lease bumps them itself."""
        return [(INTEND, self.intent_keys, (intent, "\n".join(identifiers)))]

    def claim(self, lease: float) -> Call:
        """Take over up to :data:`CLAIM_LIMIT` intents older than ``lease`` seconds --
        their writers died, or lost Redis, between COMMIT and bump -- to bump them
        (:meth:`claimed` reads the answer)."""
        return (CLAIM, self.intent_keys, (lease, CLAIM_LIMIT))

    @staticmethod
    def claimed(result: list[Any]) -> dict[str, list[str]]:
        """The identifiers of each intent a claim returned, by intent id."""
        text = [v.decode("ascii") if type(v) is bytes else str(v) for v in result]
        return {text[i]: text[i + 1].split("\n") for i in range(0, len(text) - 1, 2)}

    def fetch(self, identifiers: Sequence[str], replay: Collection[str]) -> list[Call]:
        """The replayed bumps first, then the fetch."""
        return [*self.bump(replay), *self._calls(FETCH, identifiers)]

    def tokens(self, results: list[Any], identifiers: Sequence[str]) -> list[str]:
        """The fetched tokens, in order, from the results of :meth:`fetch`'s calls, each
        with its server's epoch folded in (``<token>@<epoch>``: see ``FETCH_SCRIPT``).

        On a cluster every call carries the epoch of the node that answered it, so each
        token gets the epoch of the node that holds it: a failover changes the keys of
        the promoted node's rows, and only those.
        """
        if self.clustered:
            return self._clustered_tokens(results, identifiers)
        tokens: list[str] = []
        for values in results[-math.ceil(len(identifiers) / CHUNK_SIZE) :]:
            tokens.extend(_with_epoch(values))
        return tokens

    def _clustered_tokens(self, results: list[Any], identifiers: Sequence[str]) -> list[str]:
        """:meth:`tokens` of a clustered fetch, whose calls hold the keys by slot: put
        back in the order asked (the grouping computed again, as :meth:`fetch` did)."""
        chunks = self._chunks(self._keys(identifiers))
        tokens: list[str] = [""] * len(identifiers)
        for chunk, values in zip(chunks, results[len(results) - len(chunks) :], strict=True):
            for position, token in zip(chunk, _with_epoch(values), strict=True):
                tokens[position] = token
        return tokens

    @staticmethod
    def loaded_after(loaded: frozenset[str], calls: list[Call]) -> frozenset[str]:
        """The scripts Redis holds once ``calls`` ran: ``loaded`` itself, unless they
        brought a new one (after the first calls, every call: nothing to build)."""
        for script, _, _ in calls:
            if script.sha not in loaded:
                return loaded.union(script.sha for script, _, _ in calls)
        return loaded

    @staticmethod
    def commands(calls: list[Call], loaded: frozenset[str]) -> list[tuple[Any, ...]]:
        """The Redis commands for ``calls``: ``EVALSHA`` for scripts in ``loaded``, else
        ``EVAL`` with the source (which also loads it)."""
        return [
            ("EVALSHA", script.sha, len(keys), *keys, *args)
            if script.sha in loaded
            else ("EVAL", script.source, len(keys), *keys, *args)
            for script, keys, args in calls
        ]

    @staticmethod
    def checked(results: list[Any]) -> list[Any]:
        """A pipeline's results, raising the first error among them."""
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results
