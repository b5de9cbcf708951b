"""A throwaway PostgreSQL cluster for the tests: initdb into a temporary directory, pg_ctl
start on a free port of 127.0.0.1 (trust authentication; its unix socket in the same
directory), stop and delete at the end. PostgreSQL refuses to run as root, so as root (this
machine, CI) the server runs as the ``postgres`` system user, which owns the directory.

The server comes from deploy/tools/install-postgres.sh (``make install``); a missing one
fails the tests that need it, saying so.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

INSTALL = "run: bash deploy/tools/install-postgres.sh (or make install)"


def bindir() -> Path:
    """The directory of initdb and pg_ctl: ERASER_PG_BINDIR, PATH, or Debian's newest
    /usr/lib/postgresql/<version>/bin."""
    if os.environ.get("ERASER_PG_BINDIR"):
        return Path(os.environ["ERASER_PG_BINDIR"])
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        return Path(os.path.realpath(initdb)).parent
    found = [Path(d) for d in glob.glob("/usr/lib/postgresql/*/bin")
             if all(os.access(Path(d) / exe, os.X_OK) for exe in ("initdb", "pg_ctl", "postgres"))]
    if not found:
        raise RuntimeError(f"no PostgreSQL server (initdb, pg_ctl) on this machine; {INSTALL}")
    return max(found, key=lambda d: [int(x) for x in re.findall(r"\d+", d.parent.name)] or [0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresCluster:
    """One cluster; ``new_database()`` gives a fresh, empty database's connection string."""

    def __init__(self):
        self.bin = bindir()
        self.as_root = os.geteuid() == 0
        self.dir = Path(tempfile.mkdtemp(prefix="eraser-pg-"))  # not under pytest's 0700 root-only tree
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self.port = 0
        if self.as_root:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError(f"PostgreSQL does not run as root and there is no postgres user; {INSTALL}") from None
            os.chown(self.dir, user.pw_uid, user.pw_gid)

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [str(a) for a in args]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.dir)
        if out.returncode:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}\n{log}")
        return out

    def start(self) -> "PostgresCluster":
        self._run(self.bin / "initdb", "-D", self.data, "-U", "postgres", "-A", "trust", "-E", "UTF8",
                  "--locale=C", "--no-sync")
        for attempt in range(3):  # the free port may be taken between the probe and the start
            self.port = _free_port()
            self.opts = f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.dir}"
            try:
                self._run(self.bin / "pg_ctl", "start", "-D", self.data, "-l", self.log, "-w", "-t", "60", "-o", self.opts)
                return self
            except RuntimeError:
                if attempt == 2:
                    raise
        return self

    def restart(self) -> None:
        """Stop (fast: every session is ended) and start again on the same port and data."""
        self._run(self.bin / "pg_ctl", "restart", "-D", self.data, "-l", self.log, "-m", "fast", "-w", "-t", "60",
                  "-o", self.opts)

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run(self.bin / "pg_ctl", "stop", "-D", self.data, "-m", "fast", "-w", "-t", "60")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname}"

    def new_database(self, uri: bool = False) -> str:
        """A fresh database: its key=value connection string, or its postgresql:// URI (the
        form the sidecar's --jobs takes)."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:16]
        with psycopg.connect(self.dsn(), autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}")
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}" if uri else self.dsn(name)

    def __enter__(self) -> "PostgresCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
