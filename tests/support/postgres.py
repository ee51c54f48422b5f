"""A private PostgreSQL server with logical decoding on, for the change listener's tests.

The machine's PostgreSQL (``ALKEY_TEST_DATABASE_URL``) runs with ``wal_level=replica``,
and a test must not change its settings; this starts a throwaway one of its own -- initdb
into a temporary directory (about a second), ``wal_level=logical``, a free port, no fsync
-- and stops it by its PID. initdb refuses to run as root, so as root the server runs as
the ``postgres`` user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

import psycopg

from alkey.embedded import _free_port


def postgres_binaries() -> Path | None:
    """The directory of PostgreSQL's server programs (``initdb``, ``postgres``), if any."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))  # Debian's layout
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("postgres")
    return Path(found).parent if found and (Path(found).parent / "initdb").exists() else None


class LogicalPostgres:
    """A PostgreSQL server of a test's own with ``wal_level=logical``; ``url`` reaches its
    ``postgres`` database as the superuser ``postgres`` (trust authentication)."""

    def __init__(self) -> None:
        binaries = postgres_binaries()
        if binaries is None:
            raise RuntimeError("no PostgreSQL server programs (initdb) on this machine")
        self.binaries = binaries
        self.port = _free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="alkey-pg-"))
        self.process: subprocess.Popen[bytes] | None = None
        self._log: BinaryIO | None = None

    @property
    def url(self) -> str:
        """A SQLAlchemy URL of its ``postgres`` database (psycopg 3)."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self) -> tuple[int | None, int | None]:
        """The user and group to run the server as: ``postgres`` when this is root."""
        if os.geteuid() != 0:
            return None, None
        user = pwd.getpwnam("postgres")
        os.chown(self.directory, user.pw_uid, user.pw_gid)
        return user.pw_uid, user.pw_gid

    def start(self) -> LogicalPostgres:
        uid, gid = self._as_postgres()
        data = self.directory / "data"
        subprocess.run(
            [
                str(self.binaries / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            user=uid,
            group=gid,
        )
        self._log = open(self.directory / "server.log", "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [
                str(self.binaries / "postgres"),
                "-D",
                str(data),
                "-p",
                str(self.port),
                "-k",
                str(self.directory),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "wal_level=logical",
                "-c",
                "max_replication_slots=8",
                "-c",
                "max_wal_senders=8",
                "-c",
                "fsync=off",
                "-c",
                "full_page_writes=off",
            ],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            user=uid,
            group=gid,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(
                    f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"
                ).close()
            except psycopg.OperationalError:
                pass
            else:
                return self
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = (self.directory / "server.log").read_text(errors="replace")
                self.stop()
                raise RuntimeError(f"the private PostgreSQL did not start:\n{log}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the server (fast shutdown, by PID) and remove its files."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> LogicalPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
