"""The warehouse: one :class:`Warehouse` object naming where everything is, DuckDB connections and
transactions, and generic typed row writes.

Storage only (no domain package, no Dagster). Every write happens inside one transaction, so a crash leaves
the previous committed state, never half a batch. Values always travel as parameters or registered Arrow
tables, never formatted into SQL. Table declarations live in :mod:`imaging_assets.store.schema`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from imaging_assets.store import objects as objstore
from imaging_assets.store.objects import S3Options
from imaging_assets.store.schema import TABLES, arrow_table, ensure_schema

logger = logging.getLogger(__name__)

DUCKDB_FILENAME = "warehouse.duckdb"
#: Folder (under the warehouse root) of the private per-reader copies made by :meth:`Warehouse.snapshot`.
SNAPSHOT_DIRNAME = ".snapshots"
#: A snapshot folder older than this is left over from a killed reader and removed by the next snapshot.
STALE_SNAPSHOT_S = 24 * 3600

def duckdb_path(warehouse: str | Path) -> Path:
    """Path of the DuckDB file inside a warehouse folder."""
    return Path(warehouse) / DUCKDB_FILENAME


@dataclass(frozen=True)
class Warehouse:
    """Where one warehouse lives: the local folder of its DuckDB file, the root of its files and the URI of
    its Lance tables.

    The one object every pipeline step takes. Build it from the settings (environment) with
    :meth:`from_settings`, or directly in tests and tools: ``Warehouse(tmp_path / "wh")`` keeps everything
    in one local folder (Lance tables in ``<root>/lance``).

    Parameters
    ----------
    root
        Local folder of ``warehouse.duckdb`` (DuckDB needs a local file with locks) and of the private
        snapshots of SQL readers.
    lance_uri
        The Lance tables; default ``<files>/lance``.
    files
        Root of everything else the warehouse keeps as files (partition results, thumbnails, crops, models,
        plots, the Delta tables): a local folder or ``s3://bucket/prefix``; default ``root``.
    s3
        Endpoint and credentials for an ``s3://`` root (default: the AWS environment variables); registered
        for every URI under ``files`` and ``lance_uri``, so Lance, delta-rs and pyarrow all use them.
    """

    root: Path
    lance_uri: str = ""
    files: str = ""
    s3: S3Options | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))
        if not self.files:
            object.__setattr__(self, "files", str(self.root))
        if not self.lance_uri:
            object.__setattr__(self, "lance_uri", objstore.join(self.files, "lance"))
        if self.s3 is not None:
            objstore.configure(self.files, self.s3)
            objstore.configure(self.lance_uri, self.s3)

    def __setstate__(self, state: dict[str, Any]) -> None:  # unpickled in a worker process: register again
        for key, value in state.items():
            object.__setattr__(self, key, value)
        self.__post_init__()

    @classmethod
    def from_settings(cls, root: str | Path | None = None, lance_uri: str | None = None,
                      s3: S3Options | None = None) -> Warehouse:
        """The configured warehouse (``IMAGING_ASSETS_WAREHOUSE``, ``IMAGING_ASSETS_DUCKDB_DIR``,
        ``IMAGING_ASSETS_LANCE_URI``); explicit arguments win. ``root`` is a folder or ``s3://bucket/prefix``;
        a root given without a Lance URI keeps its Lance tables under it unless the environment names
        another URI."""
        from imaging_assets import settings

        location = os.fspath(root) if root else settings.warehouse_location()
        local = settings.duckdb_dir(location)
        return cls(local, lance_uri or settings.lance_uri(location), location, s3)

    @property
    def remote(self) -> bool:
        """True when the files and tables live on object storage."""
        return objstore.is_remote(self.files)

    @property
    def objects(self) -> objstore.ObjectStore:
        """The files of the warehouse (:class:`~imaging_assets.store.objects.ObjectStore` under ``files``)."""
        return objstore.store(self.files, self.s3)

    def environment(self) -> dict[str, str]:
        """Environment variables that make :meth:`from_settings` in a child process open this warehouse
        (its files, DuckDB folder, Lance URI and, on S3, the endpoint and credentials in use)."""
        env = {"IMAGING_ASSETS_WAREHOUSE": self.files, "IMAGING_ASSETS_DUCKDB_DIR": str(self.root),
               "IMAGING_ASSETS_LANCE_URI": self.lance_uri}
        if self.remote:
            o = self.s3 or objstore.s3_options(self.files)
            for var, value in (("AWS_ENDPOINT_URL", o.endpoint_url), ("AWS_REGION", o.region),
                               ("AWS_ACCESS_KEY_ID", o.access_key_id), ("AWS_SECRET_ACCESS_KEY", o.secret_access_key),
                               ("AWS_SESSION_TOKEN", o.session_token)):
                if value:
                    env[var] = value
        return env

    @property
    def delta_uri(self) -> str:
        """Folder / URI of the Delta Lake tables (``<files>/delta``)."""
        return objstore.join(self.files, "delta")

    @property
    def duckdb_path(self) -> Path:
        """Path of the DuckDB file."""
        return duckdb_path(self.root)

    @contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """Open the DuckDB file for the duration of a ``with`` block (see :func:`connect`)."""
        with connect(self.duckdb_path, read_only=read_only) as con:
            yield con

    @contextmanager
    def snapshot(
        self, prepare: Callable[[duckdb.DuckDBPyConnection], None] | None = None
    ) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only connection to a private copy of the warehouse as it is now, for long reads.

        A read-only connection to the warehouse file holds DuckDB's file lock for as long as it is open, so
        one long query would stop every writer (the pipeline, the audit rows of searches). A snapshot holds
        that lock only while it copies the file (and its WAL, if any; a consistent pair because no writer can
        be inside while the lock is held): about 20 ms for the demo's 74 MB warehouse from the page cache,
        roughly the time to read the file otherwise. The copy lives in a new owner-only folder under
        ``<root>/.snapshots`` and is deleted when the block ends; the reader then works on it for as long as
        it likes while writers commit to the warehouse.

        Parameters
        ----------
        prepare
            Called once on a read-write connection to the copy before it is reopened read-only (e.g. to
            delete rows the reader may not see); the reader's connection never sees what it removed.

        Notes
        -----
        Use it for every read that can take long or is driven by a person: ad-hoc SQL
        (:func:`imaging_assets.store.sql.run_sql`), report/export commands, notebook access. Short reads of a
        pipeline step (milliseconds) keep using :meth:`connect` with ``read_only=True``. The copy costs disk
        space and time proportional to the file: at tens of GB, publish a shared snapshot after each
        pipeline commit instead (same method signature).
        """
        base = self.root / SNAPSHOT_DIRNAME
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        _remove_stale_snapshots(base)
        folder = Path(tempfile.mkdtemp(prefix="snap-", dir=base))  # mode 0700
        try:
            copy = folder / DUCKDB_FILENAME
            wal = self.duckdb_path.with_name(self.duckdb_path.name + ".wal")
            with connect(self.duckdb_path, read_only=True):  # the shared lock: no writer inside while we copy
                shutil.copyfile(self.duckdb_path, copy)
                if wal.exists():
                    shutil.copyfile(wal, copy.with_name(copy.name + ".wal"))
            if prepare is not None:
                with connect(copy) as con:
                    prepare(con)
                    con.execute("CHECKPOINT")
            with connect(copy, read_only=True) as con:
                yield con
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A write connection inside one transaction: committed at the end of the block, rolled back on error."""
        with self.connect() as con, transaction(con):
            yield con


def _remove_stale_snapshots(base: Path) -> None:
    """Remove snapshot folders left by readers that were killed (older than :data:`STALE_SNAPSHOT_S`)."""
    now = time.time()
    for entry in base.iterdir():
        try:
            if entry.is_dir() and entry.name.startswith("snap-") and now - entry.stat().st_mtime > STALE_SNAPSHOT_S:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:  # removed by another reader meanwhile
            continue


@contextmanager
def connect(
    database: str | Path, read_only: bool = False, retries: int = 50, wait_s: float = 0.1
) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open a DuckDB connection briefly, retrying while another process holds the write lock.

    Parameters
    ----------
    database
        Path of the DuckDB file (its folder is created for writers) or ``":memory:"``.
    read_only
        Open read-only (sensors, queries). A read-only open of a file that does not exist yet fails.
    retries, wait_s
        How often and how long to wait for a lock held by another process.
    """
    if str(database) != ":memory:" and not read_only:
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    with _same_mode(database, read_only):
        yield from _open(database, read_only, retries, wait_s)


class _ModeGate:
    """DuckDB refuses, within one process, a read-only and a read-write connection to one file at the same
    time ("different configuration than existing connections"). A server (searches, SQL, its audit
    flushes) opens both from several threads: this gate lets connections of one mode share the file and
    makes the other mode wait until they are closed."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.mode: bool | None = None
        self.count = 0
        self.holders: dict[int, int] = {}  # thread id -> connections it holds


_GATES: dict[str, _ModeGate] = {}
_GATES_LOCK = threading.Lock()


@contextmanager
def _same_mode(database: str | Path, read_only: bool) -> Iterator[None]:
    if str(database) == ":memory:":
        yield
        return
    key = os.path.abspath(str(database))
    with _GATES_LOCK:
        gate = _GATES.setdefault(key, _ModeGate())
    me = threading.get_ident()
    with gate.cond:
        if gate.count and gate.mode is not read_only and gate.holders.get(me):
            # waiting would wait for this very thread: fail as DuckDB itself would
            raise RuntimeError(f"{database}: this thread holds a {'read-only' if gate.mode else 'read-write'} "
                               f"connection; close it before opening a {'read-only' if read_only else 'read-write'} one")
        while gate.count and gate.mode is not read_only:
            gate.cond.wait()
        gate.mode, gate.count = read_only, gate.count + 1
        gate.holders[me] = gate.holders.get(me, 0) + 1
    try:
        yield
    finally:
        with gate.cond:
            gate.count -= 1
            gate.holders[me] -= 1
            if not gate.holders[me]:
                del gate.holders[me]
            gate.cond.notify_all()


def _open(database: str | Path, read_only: bool, retries: int, wait_s: float) -> Iterator[duckdb.DuckDBPyConnection]:
    last: Exception | None = None
    for attempt in range(retries):
        try:
            con = duckdb.connect(str(database), read_only=read_only)
            break
        except duckdb.IOException as exc:  # lock held by another process
            if "lock" not in str(exc).lower():
                raise
            last = exc
            time.sleep(wait_s * min(1 + attempt, 10))
    else:
        raise RuntimeError(f"could not open {database}: still locked after {retries} tries: {last}")
    try:
        yield con
    finally:
        con.close()


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """``BEGIN`` ... ``COMMIT``, or ``ROLLBACK`` on any exception (also KeyboardInterrupt): all or nothing."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def insert_rows(con: duckdb.DuckDBPyConnection, table: str, rows: Sequence[Mapping[str, Any]],
                extra_sql: Mapping[str, str] | None = None) -> None:
    """Insert record dicts into a declared table (typed through Arrow by its schema columns) plus SQL-valued
    bookkeeping columns (``extra_sql``: column -> SQL expression without values); the caller holds the
    transaction."""
    if not rows:
        return
    fields = TABLES[table].columns
    extra_sql = extra_sql or {}
    incoming = arrow_table(rows, fields)
    con.register("_incoming", incoming)
    try:
        cols = [f'"{c}"' for c in fields] + [f'"{c}"' for c in extra_sql]
        select = [f'CAST("{c}" AS {t})' for c, t in fields.items()] + list(extra_sql.values())
        con.execute(f"INSERT INTO {table} ({', '.join(cols)}) SELECT {', '.join(select)} FROM _incoming")
    finally:
        try:
            con.unregister("_incoming")
        except duckdb.Error:  # the transaction is already aborted: keep the original error visible
            pass


def replace_table(con: duckdb.DuckDBPyConnection, table: str, rows: Sequence[Mapping[str, Any]]) -> int:
    """Atomically replace the content of a derived table (``imaging_series``, ``segmentations``)."""
    ensure_schema(con)
    with transaction(con):
        con.execute(f"DELETE FROM {table}")
        insert_rows(con, table, rows)
    return len(rows)


def replace_frame(con: duckdb.DuckDBPyConnection, table: str, frame: Any) -> int:
    """Replace the rows of a declared table with a pandas DataFrame (or records), in the caller's
    transaction: columns are matched by name and cast to the declared types (pandas NaN becomes NULL);
    columns the frame lacks are NULL, columns it has beyond the table are ignored."""
    import pandas as pd

    spec = TABLES[table]
    df = pd.DataFrame(frame).reindex(columns=list(spec.columns))
    ensure_schema(con)
    con.register("_frame", df)
    try:
        cols = ", ".join(f'"{c}"' for c in spec.columns)
        select = ", ".join(f'CAST("{c}" AS {t})' for c, t in spec.columns.items())
        con.execute(f"DELETE FROM {table}")
        con.execute(f"INSERT INTO {table} ({cols}) SELECT {select} FROM _frame")
    finally:
        try:
            con.unregister("_frame")
        except duckdb.Error:  # the transaction is already aborted: keep the original error visible
            pass
    return len(df)


def fetch_dicts(con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """Run a query and return rows as dicts (dates as ISO strings, lists as lists)."""
    cur = con.execute(sql, list(params))
    names = [d[0] for d in cur.description]
    out = []
    for row in cur.fetchall():
        rec = dict(zip(names, row))
        for k, v in rec.items():
            if hasattr(v, "isoformat") and not isinstance(v, str):
                rec[k] = v.isoformat()
        out.append(rec)
    return out


def table_rows(con: duckdb.DuckDBPyConnection, table: str) -> list[dict[str, Any]]:
    """All rows of a derived table as dicts, in primary-key order."""
    spec = TABLES[table]
    ensure_schema(con)
    cols = ", ".join(f'"{c}"' for c in spec.columns)
    order = ", ".join(f'"{k}"' for k in spec.primary_key)
    return fetch_dicts(con, f"SELECT {cols} FROM {table} ORDER BY {order}")
