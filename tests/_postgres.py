"""A real PostgreSQL server on 127.0.0.1 with a throwaway data directory, for integration tests.

Debian's `postgresql` package (the binaries in /usr/lib/postgresql/<major>/bin). PostgreSQL
refuses to run as root, so as root the server runs as the `postgres` user (FIELD-NOTES). Like
the official image, `user` is the superuser (password auth, scram-sha-256) and owns `databases`.
The server process is started by this class and stopped by PID (SIGINT: fast shutdown).
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

from _services import ServiceError, _popen, _Service, _tail, _wait_for, free_port, stop_processes

PG_START_TIMEOUT_S = 60.0  # ready in ~1-3 s here
PG_STOP_GRACE_S = 10.0


def postgres_bin_dir() -> Path:
    """The directory of initdb/postgres/psql: $KLSTUDY_PG_BIN, else the newest Debian install."""
    if os.environ.get("KLSTUDY_PG_BIN"):
        return Path(os.environ["KLSTUDY_PG_BIN"])
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    raise ServiceError("PostgreSQL not found: install Debian's `postgresql` (bash .ci/run does) "
                       "or set KLSTUDY_PG_BIN")


class PostgresServer(_Service):
    """PostgreSQL on 127.0.0.1:`port`; `url(db)` gives an SQLAlchemy URL (password included)."""

    def __init__(self, tmp_dir: str | os.PathLike[str], *, user: str = "klstudy",
                 password: str = "klstudy-test-pw", databases: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.tmp_dir = Path(tmp_dir)
        self.user, self.password, self.databases = user, password, databases
        self.bin_dir = postgres_bin_dir()
        self.port = free_port()
        self.host = "127.0.0.1"
        self.root: Path | None = None  # data dir + socket dir; removed by stop()
        # as root, run every server-side binary as `postgres` (initdb/postgres refuse root)
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def url(self, database: str, *, with_password: bool = True) -> str:
        auth = f"{self.user}:{self.password}" if with_password else self.user
        return f"postgresql://{auth}@{self.host}:{self.port}/{database}"

    def client_env(self) -> dict[str, str]:
        """Environment for libpq clients (psql, psycopg) of this server: PGPASSWORD etc."""
        env = dict(os.environ)
        env.update(PGHOST=self.host, PGPORT=str(self.port), PGUSER=self.user,
                   PGPASSWORD=self.password)
        return env

    def _owned_tempdir(self) -> Path:
        # pytest's tmp dirs are 0700 root: the postgres user could not reach a data dir there
        root = Path(tempfile.mkdtemp(prefix="kpg-", dir="/tmp"))
        if self._as:
            pw = pwd.getpwnam("postgres")
            os.chown(root, pw.pw_uid, pw.pw_gid)
        return root

    def start(self) -> PostgresServer:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.root = self._owned_tempdir()
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        if self._as:
            pw = pwd.getpwnam("postgres")
            os.chown(pwfile, pw.pw_uid, pw.pw_gid)
        pwfile.chmod(0o600)
        subprocess.run(
            [*self._as, str(self.bin_dir / "initdb"), "-D", str(self.root / "data"),
             "-A", "scram-sha-256", f"--pwfile={pwfile}", "-U", self.user, "--no-sync"],
            check=True, capture_output=True, timeout=120, cwd=self.root,  # readable by postgres
        )
        pwfile.unlink()
        cmd = [*self._as, str(self.bin_dir / "postgres"), "-D", str(self.root / "data"),
               "-c", f"listen_addresses={self.host}", "-p", str(self.port),
               "-k", str(self.root), "-c", "fsync=off"]
        self._procs.append(_popen(cmd, os.environ.copy(), self.tmp_dir / "postgres.log",
                                  cwd=self.root))
        _wait_for(self.is_ready, timeout_s=PG_START_TIMEOUT_S, what="PostgreSQL",
                  procs=self._procs, logs=lambda: _tail(self.tmp_dir / "postgres.log"))
        for database in self.databases:
            self.psql(f'CREATE DATABASE "{database}"', database="postgres")
        return self

    def is_ready(self) -> bool:
        """What the compose health check asks: `pg_isready` against this server."""
        return subprocess.run(
            [str(self.bin_dir / "pg_isready"), "-h", self.host, "-p", str(self.port),
             "-U", self.user, "-d", "postgres"], capture_output=True, timeout=10,
        ).returncode == 0

    def psql(self, sql: str, *, database: str = "postgres") -> str:
        """Run SQL with psql as `user`; returns the unaligned, tuples-only output."""
        proc = subprocess.run(
            [str(self.bin_dir / "psql"), "-X", "-v", "ON_ERROR_STOP=1", "-At", "-d", database,
             "-c", sql], env=self.client_env(), capture_output=True, text=True, timeout=60,
        )
        if proc.returncode != 0:
            raise ServiceError(f"psql {sql!r} failed: {proc.stderr.strip()}")
        return proc.stdout

    def psql_file(self, path: Path, *, database: str) -> None:
        """Run an SQL file (e.g. docker/postgres/init.sql) as the official image would."""
        subprocess.run(
            [str(self.bin_dir / "psql"), "-X", "-v", "ON_ERROR_STOP=1", "-q", "-d", database,
             "-f", str(path)], env=self.client_env(), check=True, capture_output=True, timeout=60,
        )

    def stop(self) -> None:
        if self._procs:
            for proc in self._procs:  # SIGINT = fast shutdown: disconnect clients, checkpoint
                try:
                    os.killpg(proc.pid, signal.SIGINT)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + PG_STOP_GRACE_S
            while time.monotonic() < deadline and any(p.poll() is None for p in self._procs):
                time.sleep(0.2)
            stop_processes(self._procs)  # SIGKILL whatever is left
            self._procs.clear()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None
