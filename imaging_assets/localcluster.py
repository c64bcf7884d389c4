"""A whole Dagster deployment on one machine, for trying the cluster set-up, its tests and benchmarks/scale.py.

Real servers, started here on loopback with free ports, each in a folder of its own, stopped together:
PostgreSQL (Debian's ``postgresql``: ``initdb`` into the folder) for Dagster's run, event-log and schedule
storage; Redis (``redis-server``) as the Celery broker and result backend; N Celery workers
(``dagster-celery worker start``, one process each, one step at a time); the Dagster daemon (queued runs,
backfills, run retries, run monitoring); optionally the web UI. The instance is ``dagster-postgres.yaml``,
the same profile a real deployment uses with its own servers.

``python -m imaging_assets.localcluster up --workers 2`` (``make cluster``) runs it in the foreground and
writes ``<folder>/env.sh`` for other shells. No Dagster import at module level: the processes are Dagster's
own command lines.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
INSTANCE_PROFILE = PROJECT_ROOT / "dagster-postgres.yaml"
CELERY_CONFIG = PROJECT_ROOT / "deploy" / "celery.yaml"
WORKSPACE = PROJECT_ROOT / "workspace.yaml"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> str:
    """A program from the virtualenv of this interpreter, else from PATH."""
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else (shutil.which(name) or name)


def _wait_port(port: int, proc: subprocess.Popen | None, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before listening on port {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


def postgres_bindir() -> Path:
    """The folder of PostgreSQL's server programs (``initdb``, ``pg_ctl``, ``postgres``)."""
    for candidate in [os.environ.get("PG_BINDIR", ""), *sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]:
        if candidate and (Path(candidate) / "initdb").exists():
            return Path(candidate)
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    raise FileNotFoundError("PostgreSQL's initdb not found: install Debian's `postgresql` (or set PG_BINDIR)")


def redis_binary() -> str:
    """``redis-server``'s path."""
    found = shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)
    if not found:
        raise FileNotFoundError("redis-server not found: install Debian's `redis-server`")
    return found


def _as_server_user() -> tuple[list[str], int | None, int | None]:
    """PostgreSQL refuses to run as root: as root, run it as the ``postgres`` user (Debian's package makes
    it), else as ourselves. Returns (command prefix, uid, gid) to own its folder."""
    if os.geteuid() != 0:
        return [], None, None
    import pwd

    pw = pwd.getpwnam("postgres")
    return ["runuser", "-u", "postgres", "--"], pw.pw_uid, pw.pw_gid


@dataclass
class Service:
    """A started server or worker: its process (own process group) and where it logs."""

    name: str
    proc: subprocess.Popen
    log: Path

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to its process group (the program and what it started), SIGKILL to what is left after
        ``timeout``."""
        pgid = self.proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.proc.poll()
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


def _spawn(name: str, cmd: Sequence[str], log: Path, env: Mapping[str, str] | None = None,
           cwd: Path | None = None) -> Service:
    log.parent.mkdir(parents=True, exist_ok=True)
    fh = open(log, "ab")  # noqa: SIM115 - the child keeps it
    proc = subprocess.Popen(list(cmd), stdout=fh, stderr=subprocess.STDOUT, env=dict(env) if env else None,
                            cwd=str(cwd) if cwd else None, start_new_session=True)
    fh.close()
    return Service(name, proc, log)


@dataclass
class Postgres:
    """A PostgreSQL server in ``folder`` on 127.0.0.1:``port`` (trust authentication, loopback only)."""

    folder: Path
    port: int
    data: Path
    user: str = "dagster"
    db: str = "dagster"
    services: list[Service] = field(default_factory=list)
    #: a folder made for the server's files (as root), removed on stop
    scratch: Path | None = None

    @property
    def env(self) -> dict[str, str]:
        """The variables ``dagster-postgres.yaml`` reads."""
        return {"DAGSTER_PG_HOST": "127.0.0.1", "DAGSTER_PG_PORT": str(self.port), "DAGSTER_PG_USER": self.user,
                "DAGSTER_PG_PASSWORD": "", "DAGSTER_PG_DB": self.db}

    @property
    def url(self) -> str:
        """A libpq URL of the database."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{self.db}"

    def stop(self) -> None:
        """Fast shutdown (``pg_ctl stop -m fast``), then the process group."""
        prefix, _, _ = _as_server_user()
        subprocess.run([*prefix, str(postgres_bindir() / "pg_ctl"), "-D", str(self.data), "-m", "fast",
                        "-w", "stop"], capture_output=True, timeout=60, check=False)
        for s in self.services:
            s.stop()
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


def start_postgres(folder: Path, port: int | None = None) -> Postgres:
    """initdb into ``folder/data`` and start a server on loopback; the ``dagster`` database is created."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    prefix, uid, gid = _as_server_user()
    scratch = None
    if uid is not None:  # as root the server runs as `postgres`, which may not enter our (0700) folders
        import tempfile

        scratch = Path(tempfile.mkdtemp(prefix="imaging-assets-pg-"))
        os.chown(scratch, uid, gid)
    bindir = postgres_bindir()
    data = (scratch or folder) / "data"
    sockets = scratch or folder
    pg = Postgres(folder, port or free_port(), data, scratch=scratch)
    if not (data / "PG_VERSION").exists():
        r = subprocess.run([*prefix, str(bindir / "initdb"), "-D", str(data), "-U", pg.user, "--auth=trust",
                            "-E", "UTF8", "--locale=C.UTF-8"], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"initdb into {data} failed:\n{r.stdout}\n{r.stderr}")
    log = folder / "postgres.log"
    pg.services.append(_spawn("postgres", [*prefix, str(bindir / "postgres"), "-D", str(data), "-p", str(pg.port),
                                           "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={sockets}",
                                           "-c", "fsync=off", "-c", "max_connections=200"], log))
    _wait_port(pg.port, pg.services[0].proc, f"PostgreSQL ({log})")
    import psycopg2  # dagster-postgres' driver

    for attempt in range(50):
        try:
            con = psycopg2.connect(host="127.0.0.1", port=pg.port, user=pg.user, dbname="postgres")
            break
        except psycopg2.OperationalError:  # still starting up
            if attempt == 49:
                raise
            time.sleep(0.2)
    con.autocommit = True
    with con.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", [pg.db])
        if cur.fetchone() is None:
            cur.execute(f'CREATE DATABASE "{pg.db}"')
    con.close()
    return pg


@dataclass
class Redis:
    """A Redis server on 127.0.0.1:``port``, nothing persisted."""

    port: int
    service: Service

    @property
    def env(self) -> dict[str, str]:
        """Broker and result backend of the Celery executor (``deploy/celery.yaml``)."""
        return {"DAGSTER_CELERY_BROKER_URL": f"redis://127.0.0.1:{self.port}/0",
                "DAGSTER_CELERY_BACKEND_URL": f"redis://127.0.0.1:{self.port}/1"}

    def stop(self) -> None:
        """Stop the server."""
        self.service.stop()


def start_redis(folder: Path, port: int | None = None) -> Redis:
    """Start ``redis-server`` on loopback with no persistence."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    svc = _spawn("redis", [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                           "--appendonly", "no", "--dir", str(folder), "--protected-mode", "yes"],
                 folder / "redis.log")
    _wait_port(port, svc.proc, f"redis-server ({svc.log})")
    return Redis(port, svc)


def write_instance(dagster_home: Path) -> Path:
    """Make ``dagster_home`` a PostgreSQL instance: a copy of ``dagster-postgres.yaml`` as its dagster.yaml."""
    dagster_home = Path(dagster_home).resolve()
    dagster_home.mkdir(parents=True, exist_ok=True)
    target = dagster_home / "dagster.yaml"
    shutil.copyfile(INSTANCE_PROFILE, target)
    return target


def start_workers(n: int, env: Mapping[str, str], folder: Path, prefix: str = "worker") -> list[Service]:
    """``n`` Celery workers (``dagster-celery worker start``), each one process running one step at a time."""
    # dagster-celery runs `celery` from PATH: this interpreter's virtualenv first
    env = {**env, "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])}
    out = []
    for i in range(1, n + 1):
        name = f"{prefix}{i}"
        out.append(_spawn(name, [_bin("dagster-celery"), "worker", "start", "-n", name, "-A", "dagster_celery.app",
                                 "-y", str(CELERY_CONFIG), "-l", "INFO", "--", "--concurrency", "1",
                                 "--without-gossip", "--without-mingle"],
                          Path(folder) / f"{name}.log", env=env, cwd=PROJECT_ROOT))
    return out


def wait_for_workers(env: Mapping[str, str], n: int, timeout: float = 120.0) -> list[str]:
    """Block until ``n`` Celery workers answer a ping on the broker; their names."""
    from celery import Celery

    app = Celery(broker=env["DAGSTER_CELERY_BROKER_URL"], backend=env["DAGSTER_CELERY_BACKEND_URL"])
    deadline = time.monotonic() + timeout
    names: list[str] = []
    while time.monotonic() < deadline:
        replies = app.control.ping(timeout=1.0) or []
        names = sorted(name for reply in replies for name in reply)
        if len(names) >= n:
            return names
        time.sleep(0.5)
    raise TimeoutError(f"only {len(names)} of {n} Celery workers answered within {timeout:.0f} s: {names}")


def start_daemon(env: Mapping[str, str], folder: Path) -> Service:
    """The Dagster daemon on the instance of ``env['DAGSTER_HOME']`` (queued runs, backfills, retries)."""
    return _spawn("dagster-daemon", [_bin("dagster-daemon"), "run", "-w", str(WORKSPACE)], Path(folder) / "daemon.log",
                  env=env, cwd=PROJECT_ROOT)


@dataclass
class LocalCluster:
    """Everything started by :func:`local_cluster`."""

    folder: Path
    env: dict[str, str]
    postgres: Postgres
    redis: Redis
    workers: list[Service]
    daemon: Service | None
    web: Service | None = None

    def stop(self) -> None:
        """Stop web UI, daemon, workers, Redis, PostgreSQL, in that order."""
        for s in [*( [self.web] if self.web else []), *([self.daemon] if self.daemon else []), *self.workers]:
            s.stop()
        self.redis.stop()
        self.postgres.stop()


@contextlib.contextmanager
def local_cluster(folder: Path, workers: int = 2, daemon: bool = True, web_port: int | None = None,
                  extra_env: Mapping[str, str] | None = None) -> Iterator[LocalCluster]:
    """Start PostgreSQL, Redis, ``workers`` Celery workers and the daemon (and the UI on ``web_port``);
    stop them all on exit. ``env`` holds what a shell needs to use them (DAGSTER_HOME, PG, broker)."""
    folder = Path(folder).resolve()
    pg = start_postgres(folder / "postgres")
    started: list = [pg]
    try:
        redis = start_redis(folder / "redis")
        started.append(redis)
        home = folder / "dagster_home"
        write_instance(home)
        env = {**os.environ, **(extra_env or {}), **pg.env, **redis.env, "DAGSTER_HOME": str(home)}
        ws = start_workers(workers, env, folder / "logs")
        started += ws
        wait_for_workers(env, workers)
        d = start_daemon(env, folder / "logs") if daemon else None
        if d:
            started.append(d)
        web = None
        if web_port:
            web = _spawn("dagster-webserver", [_bin("dagster-webserver"), "-w", str(WORKSPACE), "-h", "127.0.0.1",
                                               "-p", str(web_port)], folder / "logs" / "webserver.log", env=env,
                         cwd=PROJECT_ROOT)
            started.append(web)
        cluster = LocalCluster(folder, {k: env[k] for k in [*pg.env, *redis.env, "DAGSTER_HOME"]}, pg, redis, ws, d,
                               web)
        yield cluster
    finally:
        for s in reversed(started):
            with contextlib.suppress(Exception):
                s.stop()


def _env_script(env: Mapping[str, str]) -> str:
    import shlex

    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())


def main(argv: Sequence[str] | None = None) -> int:
    """``up`` (PostgreSQL + Redis + workers + daemon [+ UI], foreground) or ``workers`` (Celery workers only,
    on the broker of the environment)."""
    ap = argparse.ArgumentParser(prog="python -m imaging_assets.localcluster", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start PostgreSQL, Redis, Celery workers, the daemon and the UI")
    up.add_argument("--dir", type=Path, default=PROJECT_ROOT / ".cluster")
    up.add_argument("--workers", type=int, default=2)
    up.add_argument("--port", type=int, default=3000, help="web UI port (0: no UI)")
    w = sub.add_parser("workers", help="start N Celery workers on DAGSTER_CELERY_BROKER_URL (foreground)")
    w.add_argument("-n", "--workers", type=int, default=2)
    w.add_argument("--dir", type=Path, default=PROJECT_ROOT / ".cluster")
    args = ap.parse_args(argv)
    stop = {"now": False}

    def on_signal(*_: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    if args.cmd == "workers":
        for var in ("DAGSTER_HOME", "DAGSTER_CELERY_BROKER_URL", "DAGSTER_CELERY_BACKEND_URL"):
            if not os.environ.get(var):
                print(f"error: {var} is not set (see README: Running on a cluster)", file=sys.stderr)
                return 2
        ws = start_workers(args.workers, os.environ, args.dir / "logs")
        names = wait_for_workers(os.environ, args.workers)
        print(f"{len(names)} Celery workers: {', '.join(names)} (logs in {args.dir / 'logs'}); Ctrl-C stops them",
              flush=True)
        try:
            while not stop["now"] and all(s.proc.poll() is None for s in ws):
                time.sleep(0.5)
        finally:
            for s in ws:
                s.stop()
        return 0
    with local_cluster(args.dir, workers=args.workers, web_port=args.port or None) as c:
        (args.dir / "env.sh").write_text(_env_script(c.env))
        print(f"PostgreSQL on 127.0.0.1:{c.postgres.port}, Redis on 127.0.0.1:{c.redis.port}, "
              f"{len(c.workers)} Celery workers, the daemon" + (f", the UI on http://127.0.0.1:{args.port}" if
                                                                 args.port else ""), flush=True)
        print(f"in another shell: source {args.dir / 'env.sh'}   (logs in {args.dir / 'logs'}); Ctrl-C stops all",
              flush=True)
        while not stop["now"]:
            time.sleep(0.5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
