"""The ``alkey`` command, run as an operator runs it, against real Redis servers.

Most tests call :func:`alkey.cli.main` in this process, capturing its output; those about
what a user sees from a fresh process (a server that is down, ``watch`` stopped with
Ctrl-C, passwords, the help) run ``python -m alkey`` as a subprocess. Servers that go
down, have a password or an ACL are private redis-servers of the test's own.
"""

from __future__ import annotations

import io
import json
import os
import re
import selectors
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO
from urllib.parse import quote

import pytest
import redis

from alkey import cli
from alkey.constants import GLOBAL_WRITE_TOKEN, UNKNOWN_WRITES
from alkey.keys import CacheKeyGenerator
from alkey.testing import EmbeddedRedis
from alkey.tokens import RedisClient, RedisTokenStore

from .conftest import token_keys, tokens_of

#: A password with every character a URL reserves, and a space.
AWKWARD_PASSWORD = "p/a#s?s@w:o%r&d x"


@pytest.fixture
def private_redis() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.endswith("REDIS_URL") and not key.startswith("ALKEY_")
    }
    env.update(extra)
    return env


def run_alkey(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "alkey", *args],
        env=clean_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def alkey(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str], list[str]]:
    """Run the command in this process: its exit code, stdout lines, stderr lines."""
    code = cli.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err.splitlines()


def down_url() -> str:
    """The URL of a redis-server that was just stopped: nothing listens there."""
    with EmbeddedRedis() as server:
        url = server.url
    return url


def acl_server(server: EmbeddedRedis, user: str, *rules: str) -> str:
    """Add ``user`` (password ``pw``) with ``rules`` to ``server``; its URL."""
    admin: RedisClient = redis.Redis(port=server.port)
    try:
        admin.acl_setuser(user, enabled=True, passwords=["+pw"], reset=True)
        admin.execute_command("ACL", "SETUSER", user, *rules)  # type: ignore[no-untyped-call]
    finally:
        admin.close()
    return f"redis://{user}:pw@127.0.0.1:{server.port}/0"


#: What alkey's keys and commits need (docs/deploying.md, "A least-privilege Redis user").
LEAST_PRIVILEGE = ("~alkey:*", "resetchannels", "+eval", "+evalsha", "+mget", "+set", "+ping")


# -- help and usage ----------------------------------------------------------------------------


def test_help_has_no_rest_markup(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_alkey("--help")
    assert result.returncode == 0, result.stderr
    pages = [result.stdout]
    for command in ("check", "inspect", "token", "bump", "watch", "stats"):
        code, out, _ = alkey(capsys, command, "--help")
        assert code == 0
        pages.append("\n".join(out))
    for page in pages:
        assert "``" not in page
        assert not re.search(r":(func|class|mod|data|meth):", page)
        assert "\n.. " not in page
    top = pages[0]
    for command in ("demo", "check", "inspect", "bump", "watch", "stats"):
        assert command in top
    for code, meaning in cli.EXIT_CODES.items():
        assert f"{code} " in top
        assert meaning in top
    assert "deprecated alias of inspect" in top


def test_no_command_is_a_usage_error_with_exit_2() -> None:
    result = run_alkey()
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_the_console_script_runs_the_same_command() -> None:
    script = Path(sys.executable).parent / "alkey"
    if not script.exists():
        pytest.skip("the alkey console script is not installed in this environment")
    result = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, timeout=60, env=clean_env()
    )
    assert result.returncode == 0
    assert "exit codes:" in result.stdout


def test_a_url_of_another_scheme_is_a_configuration_error_with_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = alkey(capsys, "check", "--url", "http://example.invalid/")
    assert code == cli.EXIT_USAGE
    assert out == []
    assert len(err) == 1
    assert "is not a Redis URL" in err[0]


# -- check ---------------------------------------------------------------------------------------


def test_check_reports_each_check_on_a_line_and_exits_0_for_a_usable_redis(
    capsys: pytest.CaptureFixture[str], redis_url: str, redis_client: RedisClient
) -> None:
    code, out, err = alkey(capsys, "check", "--url", redis_url)
    assert code == cli.EXIT_OK, out
    text = "\n".join(out)
    assert re.search(r"redis: .* answers PING in [\d.]+ ms", text)
    assert re.search(r"server: (Redis|Valkey) \d+\.\d+", text)
    assert re.search(r"replication: primary, epoch [0-9a-f]{16}", text)
    assert "scripts: alkey's 5 Lua scripts load" in text
    assert re.search(r"permissions: user 'default' may run what it needs", text)
    assert re.search(r"durable mode: off; ", text)
    assert re.search(r"local cache: off; ", text)
    assert out[-1] == "alkey can use this Redis"
    assert err == []
    assert token_keys(redis_client) == set(), "check leaves no token behind"


def test_check_exits_1_with_one_line_when_redis_is_down() -> None:
    url = down_url()
    result = run_alkey("check", "--url", url)
    assert result.returncode == 1
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == 1, lines
    assert "cannot reach Redis at" in lines[0]
    assert url in lines[0]
    assert "is it running?" in lines[0]


@pytest.mark.parametrize("dry_run", [True, False], ids=["acl-dryrun", "tried-harmlessly"])
def test_check_names_the_missing_acl_permission(
    capsys: pytest.CaptureFixture[str], private_redis: EmbeddedRedis, dry_run: bool
) -> None:
    rules = [rule for rule in LEAST_PRIVILEGE if rule != "+set"] + ["+info"]
    if dry_run:
        rules += ["+acl|dryrun", "+acl|whoami"]
    url = acl_server(private_redis, "app", *rules)
    code, out, _ = alkey(capsys, "check", "--url", url)
    assert code == cli.EXIT_FAILED
    [line] = [line for line in out if "permissions:" in line]
    method = "ACL DRYRUN" if dry_run else "tried harmlessly"
    assert f"user 'app' may not run SET ({method}): grant +set" in line
    assert out[-1].startswith("alkey cannot use this Redis")
    admin: RedisClient = redis.Redis(port=private_redis.port)
    try:
        assert admin.keys("*") == [], "the harmless tries leave nothing behind"
    finally:
        admin.close()


def test_check_names_a_key_prefix_the_acl_does_not_cover(
    capsys: pytest.CaptureFixture[str], private_redis: EmbeddedRedis
) -> None:
    url = acl_server(private_redis, "app", *LEAST_PRIVILEGE, "+info", "+acl|dryrun")
    code, out, _ = alkey(capsys, "check", "--url", url, "--prefix", "myapp:")
    assert code == cli.EXIT_FAILED
    [line] = [line for line in out if "permissions:" in line]
    assert "grant ~myapp:alkey:*" in line


def test_check_reports_durable_mode_and_local_cache_requirements_separately(
    capsys: pytest.CaptureFixture[str], private_redis: EmbeddedRedis
) -> None:
    url = acl_server(private_redis, "app", *LEAST_PRIVILEGE, "+info")
    code, out, _ = alkey(capsys, "check", "--url", url)
    assert code == cli.EXIT_OK, out
    [durable] = [line for line in out if "durable mode:" in line]
    [local] = [line for line in out if "local cache:" in line]
    assert "off; turning it on would need +time +zrangebyscore +zadd" in durable
    assert "off; turning it on would need +client|id +client|tracking" in local
    assert "&__redis__:invalidate" in local

    code, out, _ = alkey(capsys, "check", "--url", url + "?alkey_durable=true")
    assert code == cli.EXIT_FAILED
    [durable] = [line for line in out if "durable mode:" in line]
    assert "on, but user 'app' may not run TIME" in durable
    assert not any("local cache:" in line and "may not" in line for line in out)

    durable_rules = ("+time", "+zadd", "+zrangebyscore", "+zrem", "+hset", "+hget", "+hdel")
    acl_server(private_redis, "app", *LEAST_PRIVILEGE, "+info", *durable_rules)
    code, out, _ = alkey(capsys, "check", "--url", url + "?alkey_durable=true")
    assert code == cli.EXIT_OK, out
    [durable] = [line for line in out if "durable mode:" in line]
    assert durable.split(" ", 1)[1].startswith("durable mode: on; user 'app' may run")


def test_check_warns_when_the_replication_id_is_hidden(
    capsys: pytest.CaptureFixture[str], private_redis: EmbeddedRedis
) -> None:
    url = acl_server(private_redis, "app", *LEAST_PRIVILEGE)  # no +info
    code, out, _ = alkey(capsys, "check", "--url", url)
    assert code == cli.EXIT_OK, out
    [line] = [line for line in out if "replication:" in line]
    assert "hidden" in line
    assert "grant +info" in line
    assert any("scripts: EVAL runs Lua" in line for line in out)


def test_check_prints_json_with_the_verdict(
    capsys: pytest.CaptureFixture[str], redis_url: str
) -> None:
    code, out, _ = alkey(capsys, "check", "--url", redis_url, "--json")
    assert code == cli.EXIT_OK
    report = json.loads("\n".join(out))
    assert report["usable"] is True
    assert report["role"] == "master"
    assert len(report["epoch"]) == 16
    assert {check["status"] for check in report["checks"]} <= {"ok", "off", "warn"}
    assert report["acl"]["user"] == "default"


# -- inspect ------------------------------------------------------------------------------------


def test_inspect_shows_missing_tokens_without_creating_them(
    capsys: pytest.CaptureFixture[str], redis_url: str, redis_client: RedisClient
) -> None:
    RedisTokenStore(redis_client).fetch(["alkey:users#1"])
    before = tokens_of(redis_client, "alkey:users#1")["alkey:users#1"]
    code, out, err = alkey(
        capsys, "inspect", "--url", redis_url, "alkey:users#1", "alkey:users#2", "alkey:users#*"
    )
    assert code == cli.EXIT_OK
    assert err == []
    lines = {line.split()[0]: line.split()[1:] for line in out}
    assert lines["alkey:users#1"][0] == before.decode()
    assert re.fullmatch(r"ttl 23h59m\d+s", " ".join(lines["alkey:users#1"][1:]))
    assert lines["alkey:users#2"] == ["missing"]
    assert lines["alkey:users#*"] == ["missing"]
    assert token_keys(redis_client) == {"alkey:users#1"}


def test_inspect_deps_shows_the_tokens_a_row_key_depends_on(
    capsys: pytest.CaptureFixture[str], redis_url: str, redis_client: RedisClient
) -> None:
    code, out, _ = alkey(capsys, "inspect", "--url", redis_url, "--deps", "alkey:users#1")
    assert code == cli.EXIT_OK
    assert [line.split()[0] for line in out] == ["alkey:users#1", "alkey:users#?", UNKNOWN_WRITES]
    assert token_keys(redis_client) == set()


def test_inspect_honours_the_configured_key_prefix_and_the_prefix_option(
    capsys: pytest.CaptureFixture[str],
    redis_url: str,
    redis_client: RedisClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    RedisTokenStore(redis_client, key_prefix="app1:").fetch(["alkey:users#1"])
    RedisTokenStore(redis_client, key_prefix="app2:").fetch(["alkey:users#1"])
    app1, app2 = (
        tokens_of(redis_client, f"app{n}:alkey:users#1")[f"app{n}:alkey:users#1"].decode()
        for n in (1, 2)
    )
    monkeypatch.setenv("ALKEY_KEY_PREFIX", "app1:")
    code, out, _ = alkey(capsys, "inspect", "--url", redis_url, "alkey:users#1", "--json")
    assert code == cli.EXIT_OK
    [row] = json.loads("\n".join(out))
    assert row["key"] == "app1:alkey:users#1"
    assert row["token"] == app1
    assert 86000 < row["ttl"] <= 86400
    code, out, _ = alkey(
        capsys, "--prefix", "app2:", "inspect", "--url", redis_url, "alkey:users#1"
    )
    assert out[0].split()[1] == app2
    monkeypatch.delenv("ALKEY_KEY_PREFIX")
    code, out, _ = alkey(
        capsys, "inspect", "--url", f"{redis_url}?alkey_key_prefix=app2:", "alkey:users#1"
    )
    assert out[0].split()[1] == app2


@pytest.mark.parametrize("bad", ["alkey:users", "alkey:users#%2c", "users#1"])
def test_inspect_rejects_a_bad_identifier_in_one_line_naming_it(
    capsys: pytest.CaptureFixture[str], bad: str
) -> None:
    # Checked before connecting: the server may as well be down.
    code, out, err = alkey(capsys, "inspect", "--url", down_url(), "alkey:users#1", bad)
    assert code == cli.EXIT_USAGE
    assert out == []
    assert len(err) == 1
    assert repr(bad) in err[0]
    assert "is not a valid alkey identifier" in err[0]


def test_inspect_exits_3_with_one_line_when_redis_is_down() -> None:
    url = down_url()
    result = run_alkey("inspect", "--url", url, "alkey:users#1")
    assert result.returncode == cli.EXIT_UNREACHABLE
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"alkey: cannot reach Redis at {url}")


# -- bump ---------------------------------------------------------------------------------------


def keys_of(store: RedisTokenStore, *targets: str) -> dict[str, str]:
    generator = CacheKeyGenerator(tokens=store)
    return {target: generator(target) for target in targets}


TARGETS = ("alkey:users#1", "alkey:users#2", "alkey:users#*", "alkey:posts#1", GLOBAL_WRITE_TOKEN)


def test_bump_a_row_changes_its_keys_its_tables_and_the_global_ones_only(
    capsys: pytest.CaptureFixture[str], redis_url: str, redis_client: RedisClient
) -> None:
    store = RedisTokenStore(redis_client)
    before = keys_of(store, *TARGETS)
    code, out, _ = alkey(capsys, "invalidate", "--url", redis_url, "alkey:users#1")
    assert code == cli.EXIT_OK
    after = keys_of(store, *TARGETS)
    changed = {target for target in TARGETS if before[target] != after[target]}
    assert changed == {"alkey:users#1", "alkey:users#*", GLOBAL_WRITE_TOKEN}
    assert any(line.startswith("bumped alkey:users#1") for line in out)


def test_bump_a_table_changes_the_keys_of_all_its_rows_but_no_stored_row_token(
    capsys: pytest.CaptureFixture[str], redis_url: str, redis_client: RedisClient
) -> None:
    store = RedisTokenStore(redis_client)
    before = keys_of(store, *TARGETS)
    stored = tokens_of(redis_client, "alkey:users#1", "alkey:users#2")
    code, out, _ = alkey(capsys, "bump", "--url", redis_url, "alkey:users#*")
    assert code == cli.EXIT_OK
    after = keys_of(store, *TARGETS)
    changed = {target for target in TARGETS if before[target] != after[target]}
    assert changed == {"alkey:users#1", "alkey:users#2", "alkey:users#*", GLOBAL_WRITE_TOKEN}
    assert tokens_of(redis_client, "alkey:users#1", "alkey:users#2") == stored
    assert any("every key of a row of users" in line for line in out)
    assert any("--rows also replaces each stored row token" in line for line in out)


def test_bump_rows_replaces_every_stored_row_token_of_the_table_in_batches(
    capsys: pytest.CaptureFixture[str],
    redis_url: str,
    redis_client: RedisClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rows = [f"alkey:users#{n}" for n in range(12_000)]  # more than two batches
    store = RedisTokenStore(redis_client)
    store.fetch([*rows, "alkey:posts#1", "alkey:users2#1"])
    before = dict(zip(rows, redis_client.mget(rows), strict=True))
    others = tokens_of(redis_client, "alkey:posts#1", "alkey:users2#1")
    terminal = io.StringIO()
    terminal.isatty = lambda: True  # type: ignore[method-assign]
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(cli._Progress, "delay", 0.0)
    code = cli.main(["bump", "--url", redis_url, "alkey:users#*", "--rows", "--yes"])
    out = capsys.readouterr().out
    assert code == cli.EXIT_OK
    after = dict(zip(rows, redis_client.mget(rows), strict=True))
    assert all(after[row] != before[row] for row in rows)
    assert tokens_of(redis_client, "alkey:posts#1", "alkey:users2#1") == others
    assert "bumped 12,000 stored row tokens (--rows)" in out
    assert "bumping row tokens [" in terminal.getvalue(), "a progress bar on the terminal"


def test_bump_rows_needs_a_table(capsys: pytest.CaptureFixture[str], redis_url: str) -> None:
    code, _, err = alkey(capsys, "bump", "--url", redis_url, "alkey:users#1", "--rows", "--yes")
    assert code == cli.EXIT_USAGE
    assert len(err) == 1
    assert "--rows" in err[0]


def test_bump_all_changes_every_key(
    capsys: pytest.CaptureFixture[str], redis_url: str, redis_client: RedisClient
) -> None:
    store = RedisTokenStore(redis_client)
    before = keys_of(store, *TARGETS)
    code, out, _ = alkey(capsys, "bump", "--url", redis_url, "--all", "--yes")
    assert code == cli.EXIT_OK
    after = keys_of(store, *TARGETS)
    assert all(before[target] != after[target] for target in TARGETS)
    assert [line.split()[1] for line in out] == [GLOBAL_WRITE_TOKEN, UNKNOWN_WRITES]


def test_bump_all_without_yes_and_without_a_terminal_bumps_nothing(
    redis_url: str, redis_client: RedisClient
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "alkey", "bump", "--url", redis_url, "--all"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
    )
    assert result.returncode == cli.EXIT_USAGE
    assert "pass --yes to confirm" in result.stderr
    assert result.stderr.count("\n") == 1
    assert token_keys(redis_client) == set()


@pytest.mark.parametrize(("answer", "code"), [("yes\n", 0), ("no\n", 5), ("\n", 5)])
def test_bump_all_asks_for_confirmation_on_a_terminal(
    capsys: pytest.CaptureFixture[str],
    redis_url: str,
    redis_client: RedisClient,
    monkeypatch: pytest.MonkeyPatch,
    answer: str,
    code: int,
) -> None:
    terminal = io.StringIO(answer)
    terminal.isatty = lambda: True  # type: ignore[method-assign]
    monkeypatch.setattr(sys, "stdin", terminal)
    result, _, err = alkey(capsys, "bump", "--url", redis_url, "--all")
    assert result == code
    assert "every cache key built on alkey tokens changes" in err[0]
    assert bool(token_keys(redis_client)) is (code == 0)
    if code:
        assert err[-1].endswith("alkey: aborted: nothing was bumped")


def test_bump_refused_by_the_acl_exits_4_with_one_line(
    capsys: pytest.CaptureFixture[str], private_redis: EmbeddedRedis
) -> None:
    url = acl_server(private_redis, "app", *[r for r in LEAST_PRIVILEGE if r != "+set"])
    code, out, err = alkey(capsys, "bump", "--url", url, "alkey:users#1")
    assert code == cli.EXIT_REFUSED
    assert out == []
    assert len(err) == 1
    assert "ACL denies alkey's user a command or key it needs" in err[0]


# -- watch ---------------------------------------------------------------------------------------


def read_line(stream: IO[str] | None, timeout: float) -> str:
    assert stream is not None
    selector = selectors.DefaultSelector()
    selector.register(stream, selectors.EVENT_READ)
    try:
        if not selector.select(timeout):
            raise AssertionError(f"nothing printed within {timeout} s")
        return stream.readline()
    finally:
        selector.close()


def test_watch_prints_a_bump_made_by_another_process(
    redis_url: str, redis_client: RedisClient
) -> None:
    watcher = subprocess.Popen(
        [sys.executable, "-m", "alkey", "watch", "--url", redis_url, "--prefix", "app:"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    try:
        banner = read_line(watcher.stderr, 30)
        assert "watching tokens under 'app:alkey:'" in banner
        bump = run_alkey("bump", "--url", redis_url, "--prefix", "app:", "alkey:users#7")
        assert bump.returncode == 0, bump.stderr
        RedisTokenStore(redis_client).bump(["alkey:users#8"])  # another prefix: not shown
        line = read_line(watcher.stdout, 10)
        assert re.fullmatch(
            r"\d\d:\d\d:\d\d\.\d{3}  alkey:\*#\* alkey:users#\* alkey:users#7\n", line
        )
        redis_client.flushdb()
        assert "every token (the database was flushed)" in read_line(watcher.stdout, 10)
    finally:
        watcher.send_signal(signal.SIGINT)
        out, err = watcher.communicate(timeout=10)
    assert watcher.returncode == 0
    assert "Traceback" not in err
    assert "users#8" not in out


def test_watch_exits_3_when_redis_is_down() -> None:
    result = run_alkey("watch", "--url", down_url())
    assert result.returncode == cli.EXIT_UNREACHABLE
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


# -- stats ---------------------------------------------------------------------------------------


def test_stats_counts_tokens_by_table_memory_and_pending_intents(
    capsys: pytest.CaptureFixture[str], redis_url: str, redis_client: RedisClient
) -> None:
    store = RedisTokenStore(redis_client, key_prefix="app:", durable=True)
    store.fetch([f"alkey:users#{n}" for n in range(30)] + ["alkey:posts#1", "alkey:posts#*"])
    CacheKeyGenerator(tokens=store)("alkey:users#0")  # adds alkey:users#? and alkey:*#?
    store.intend(["alkey:users#1"])
    redis_client.set("unrelated", "1")
    code, out, _ = alkey(capsys, "stats", "--url", redis_url, "--prefix", "app:", "--json")
    assert code == cli.EXIT_OK
    report = json.loads("\n".join(out))
    assert report["tokens"] == 34
    assert report["tables"]["users"] == {
        "rows": 30,
        "table_token": False,
        "unknown_rows_token": True,
    }
    assert report["tables"]["posts"] == {
        "rows": 1,
        "table_token": True,
        "unknown_rows_token": False,
    }
    assert report["unknown_writes_token"] is True
    assert report["global_token"] is False
    assert report["keys_in_database"] == 34 + 2 + 1  # the intent's two keys, "unrelated"
    assert report["durable_intents"]["pending"] == 1
    assert 40 < report["memory"]["bytes_per_token"] < 400
    code, out, _ = alkey(capsys, "stats", "--url", redis_url, "--prefix", "app:")
    assert out[0].startswith("34 tokens under 'app:alkey:' of 37 keys in db 0")
    assert any(re.fullmatch(r"users\s+30  no\s+yes", line) for line in out)
    assert any(line.startswith("memory: ") and "bytes per token" in line for line in out)
    assert "durable intents: 1 pending, 0 older than the 5 s lease" in out


# -- secrets -------------------------------------------------------------------------------------


def assert_no_password(shown: str) -> None:
    for form in (AWKWARD_PASSWORD, quote(AWKWARD_PASSWORD, safe=""), quote(AWKWARD_PASSWORD)):
        assert form not in shown, shown
    for piece in ("a#s?s@w", "w:o%r&d", "o%25r%26d"):
        assert piece not in shown, shown
    assert "Traceback" not in shown


def test_no_command_output_shows_a_password_with_reserved_characters(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    encoded = quote(AWKWARD_PASSWORD, safe="")
    with EmbeddedRedis(password=AWKWARD_PASSWORD) as server:
        url = server.url
        assert encoded in url
        wrong = url.replace(encoded, quote(AWKWARD_PASSWORD[::-1], safe=""))
        for args, expected in [
            (("check", "--url", url), cli.EXIT_OK),
            (("check", "--url", url, "--json"), cli.EXIT_OK),
            (("inspect", "--url", url, "alkey:users#1"), cli.EXIT_OK),
            (("bump", "--url", url, "alkey:users#1", "--json"), cli.EXIT_OK),
            (("stats", "--url", url), cli.EXIT_OK),
            (("check", "--url", wrong), cli.EXIT_FAILED),
            (("bump", "--url", wrong, "--all", "--yes"), cli.EXIT_REFUSED),
        ]:
            code, out, err = alkey(capsys, *args)
            assert code == expected, (args, out, err)
            assert_no_password("\n".join(out + err))
        # The URL from the environment, as a deployment sets it: a wrong password, then
        # one that is not percent-encoded (refused as a bad URL), from a fresh process.
        result = run_alkey("inspect", "alkey:users#1", env=clean_env(REDIS_URL=wrong))
        assert result.returncode == cli.EXIT_REFUSED
        assert result.stderr.startswith("alkey: Redis at redis://:***@127.0.0.1:")
        assert "refused alkey's credentials" in result.stderr
        assert result.stderr.count("\n") == 1
        assert_no_password(result.stdout + result.stderr)
        monkeypatch.setenv("REDIS_URL", url.replace(encoded, AWKWARD_PASSWORD))
        code, out, err = alkey(capsys, "inspect", "alkey:users#1")
        assert code == cli.EXIT_USAGE
        assert "percent-encoded" in err[0]
        assert_no_password("\n".join(out + err))
    code, out, err = alkey(capsys, "inspect", "--url", url, "alkey:users#1")  # server gone
    assert code == cli.EXIT_UNREACHABLE
    assert_no_password("\n".join(out + err))
