"""Shared helpers of the reliability suite (imported by the tests of this folder and by the driver script).

* :func:`run_chain` materializes the whole chain with the domain functions (no Dagster), in this process.
* :func:`duckdb_table_hashes` / :func:`lance_table_hashes` fingerprint a warehouse: row count and a SHA-256
  over the sorted rows of every table, with the columns that hold wall-clock times (``*_at``) or timings
  (``elapsed_s``) reduced to "is NULL" — everything else must match bit for bit.
* :func:`phi_needles` / :func:`scan_duckdb` / :func:`scan_lance` are the PHI scanner: every column of every
  DuckDB table and view, every column of every version of every Lance table.
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

#: Columns holding wall-clock times or durations: compared by nullness only.
VOLATILE_COLUMNS = frozenset({
    "created_at", "loaded_at", "updated_at", "removed_at", "computed_at", "logged_at", "fitted_at",
    "activated_at", "elapsed_s", "first_seen", "gone_at", "rendered_at", "recorded_at", "retired_at",
    "train_s",
    # the manifest token of a batch's result files is random per commit (imaging_assets.store.partfiles)
    "token",
    # a TorchScript file's bytes carry class names numbered per process; the model's version is its weights' digest
    "file_sha256",
})
#: Tables that record who asked what (not produced by the chain).
GOVERNANCE_TABLES = frozenset({"audit_log", "cohorts"})

#: The robustness spec of every chain run in this suite (the clean run and the crash-test driver).
N_PERTURBATIONS = 3
MAX_LESIONS = 40


def chain_spec():
    from imaging_assets.features.perturb import PerturbationSpec

    return PerturbationSpec(n_perturbations=N_PERTURBATIONS)


def run_chain(warehouse: Path, dicom_dir: Path, outcomes_csv: Path, workers: int = 2,
              batch_size: int = 2, progress=None, log=None) -> dict[str, Any]:
    """Materialize discovery -> features -> robustness -> vectors -> outcomes -> clusters -> survival
    (:func:`imaging_assets.stages.run_chain`, with this module's perturbation spec and sample size).

    ``log(step)`` is called before each step (the crash driver prints it). ``batch_size`` is series per batch
    of the extraction: small, so that a kill can land between batches (and equal in every run compared).
    """
    from imaging_assets import stages
    from imaging_assets.store.warehouse import Warehouse

    settings = stages.ChainSettings(dicom_roots=[dicom_dir], outcomes=outcomes_csv, workers=workers,
                                    batch_size=batch_size, spec=chain_spec(), max_lesions=MAX_LESIONS,
                                    progress=progress)
    return stages.run_chain(Warehouse(Path(warehouse)), settings, log=log)


# ---------------------------------------------------------------------------------------------- hashing


def _digest(rows: Iterable[Any]) -> str:
    lines = sorted(repr(r) for r in rows)
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode("utf-8", "surrogateescape"))
        h.update(b"\n")
    return h.hexdigest()


def _is_governance(table: str) -> bool:
    return table in GOVERNANCE_TABLES or table.startswith("cohort_")


def duckdb_table_hashes(db: Path, include_governance: bool = False) -> dict[str, tuple[int, str]]:
    """``table -> (rows, sha256)`` for every base table of the DuckDB file (volatile columns by nullness)."""
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    try:
        tables = [r[0] for r in con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main' "
            "AND table_type = 'BASE TABLE' ORDER BY 1").fetchall()]
        out = {}
        for table in tables:
            if _is_governance(table) and not include_governance:
                continue
            cols = [r[0] for r in con.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = 'main' AND table_name = ? "
                "ORDER BY ordinal_position", [table]).fetchall()]
            select = ", ".join(f'("{c}" IS NULL) AS "{c}"' if c in VOLATILE_COLUMNS else f'"{c}"' for c in cols)
            rows = con.execute(f'SELECT {select} FROM "{table}"').fetchall()
            out[table] = (len(rows), _digest(rows))
        return out
    finally:
        con.close()


def lance_rows(lance_uri: str | Path, table: str, version: int | None = None) -> list[dict[str, Any]]:
    """Rows of a Lance table (optionally at a version), sorted by ``lesion_id`` when there is one."""
    import lancedb

    tbl = lancedb.connect(str(lance_uri)).open_table(table)
    if version is not None:
        tbl.checkout(int(version))
    data = tbl.to_arrow()
    rows = data.to_pylist()
    if "lesion_id" in data.column_names:
        rows.sort(key=lambda r: r["lesion_id"])
    return rows


def lance_table_names(lance_uri: str | Path) -> list[str]:
    import lancedb

    if not Path(lance_uri).exists():
        return []
    from imaging_assets.store.lance import table_names

    return sorted(table_names(lancedb.connect(str(lance_uri))))  # a fresh connection, not the store's cached one


def lance_table_hashes(lance_uri: str | Path) -> dict[str, tuple[int, str]]:
    """``table -> (rows, sha256)`` of every Lance table at its latest version."""
    out = {}
    for name in lance_table_names(lance_uri):
        rows = lance_rows(lance_uri, name)
        out[name] = (len(rows), _digest(tuple(sorted(r.items())) for r in rows))
    return out


def diff_hashes(a: Mapping[str, tuple[int, str]], b: Mapping[str, tuple[int, str]]) -> dict[str, Any]:
    """Tables whose (rows, hash) differ, or that exist on one side only."""
    return {t: (a.get(t), b.get(t)) for t in sorted(set(a) | set(b)) if a.get(t) != b.get(t)}


# ------------------------------------------------------------------------------------------------- PHI


def phi_needles(dicom_dirs: Sequence[Path], outcome_csvs: Sequence[Path] = ()) -> set[str]:
    """Every PatientName (and its ``^``-parts of >= 4 characters), PatientBirthDate (as stored and as ISO
    date) and raw PatientID found in the source files (any file pydicom can parse, whatever its name), and
    the raw patient ids of outcome CSVs."""
    import pydicom

    needles: set[str] = set()

    def add(value: str, min_len: int = 4) -> None:
        value = value.strip()
        if len(value) >= min_len:
            needles.add(value)

    for root in dicom_dirs:
        for p in Path(root).rglob("*"):
            if not p.is_file() or p.is_symlink():
                continue
            try:
                ds = pydicom.dcmread(p, stop_before_pixels=True, force=True)
                name = str(ds.get("PatientName", "") or "")
                pid = str(ds.get("PatientID", "") or "")
                dob = str(ds.get("PatientBirthDate", "") or "")
            except Exception:  # noqa: BLE001 - not DICOM, or unreadable: nothing to learn from it
                continue
            add(name)
            add(name.replace("^", " "))
            for part in name.split("^"):
                add(part)
            add(pid)
            if len(dob) == 8 and dob.isdigit():
                add(dob)
                add(f"{dob[:4]}-{dob[4:6]}-{dob[6:]}")
    for path in outcome_csvs:
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                add(str(row.get("patient_id") or ""))
    return needles


def _pattern(needles: Iterable[str]) -> re.Pattern[str]:
    alts = sorted({n.lower() for n in needles}, key=len, reverse=True)
    return re.compile("|".join(re.escape(a) for a in alts))


def _texts(value: Any) -> Iterable[str]:
    """Every text a cell can show: strings as they are, bytes decoded, containers recursively, scalars as
    their repr."""
    if value is None:
        return
    if isinstance(value, str):
        yield value
    elif isinstance(value, (bytes, bytearray, memoryview)):
        yield bytes(value).decode("latin-1")
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _texts(k)
            yield from _texts(v)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for v in value:
            yield from _texts(v)
    elif hasattr(value, "tolist"):  # numpy arrays
        yield from _texts(value.tolist())
    else:
        yield str(value)


def _scan_rows(where: str, columns: Sequence[str], rows: Iterable[Sequence[Any]], pattern: re.Pattern[str],
               needles: Iterable[str]) -> set[tuple[str, str, str]]:
    lowered = {n.lower(): n for n in needles}
    hits: set[tuple[str, str, str]] = set()
    for row in rows:
        for col, value in zip(columns, row):
            for text in _texts(value):
                for m in pattern.finditer(text.lower()):
                    hits.add((where, col, lowered.get(m.group(0), m.group(0))))
    return hits


def scan_duckdb(db: Path, needles: Iterable[str]) -> list[tuple[str, str, str]]:
    """``(table, column, needle)`` for every needle found (case-insensitive) in any column of any table or
    view of the DuckDB file, whatever the column type (lists, structs, dates and numbers as text)."""
    import duckdb

    needles = [n for n in needles if n]
    if not needles:
        return []
    pattern = _pattern(needles)
    hits: set[tuple[str, str, str]] = set()
    con = duckdb.connect(str(db), read_only=True)
    try:
        tables = con.execute(
            "SELECT table_schema, table_name FROM information_schema.tables "
            "WHERE table_schema NOT IN ('information_schema', 'pg_catalog') ORDER BY 1, 2").fetchall()
        for schema, table in tables:
            cur = con.execute(f'SELECT * FROM "{schema}"."{table}"')
            columns = [d[0] for d in cur.description]
            hits |= _scan_rows(table if schema == "main" else f"{schema}.{table}", columns, cur.fetchall(),
                               pattern, needles)
    finally:
        con.close()
    return sorted(hits)


def scan_lance(lance_uri: str | Path, needles: Iterable[str], all_versions: bool = True) -> list[tuple[str, str, str]]:
    """``(lance:table@vN, column, needle)`` for every needle found in any column of any Lance table, at
    every version still stored (older versions stay readable by time travel, so they count)."""
    import lancedb

    needles = [n for n in needles if n]
    if not needles:
        return []
    pattern = _pattern(needles)
    hits: set[tuple[str, str, str]] = set()
    db = lancedb.connect(str(lance_uri)) if Path(lance_uri).exists() else None
    for name in lance_table_names(lance_uri):
        tbl = db.open_table(name)
        versions = [int(v["version"]) for v in tbl.list_versions()] if all_versions else [int(tbl.version)]
        for version in versions:
            tbl.checkout(version)
            data = tbl.to_arrow()
            columns = data.column_names
            rows = zip(*(data.column(c).to_pylist() for c in columns)) if data.num_rows else []
            hits |= _scan_rows(f"lance:{name}@v{version}", columns, rows, pattern, needles)
        tbl.checkout_latest()
    return sorted(hits)


def scan_warehouse(warehouse: Path, needles: Iterable[str]) -> list[tuple[str, str, str]]:
    from imaging_assets.store.warehouse import duckdb_path

    needles = list(needles)
    return scan_duckdb(duckdb_path(warehouse), needles) + scan_lance(Path(warehouse) / "lance", needles)


# ------------------------------------------------------------------------------------------ subprocesses


class DriverProcess:
    """``reliability_driver.py MODE ...`` in its own process group, its output lines collected by a thread.

    ``wait_for(pred)`` blocks until a line satisfies ``pred`` (returns it), the process exits (returns None)
    or the timeout passes (raises). ``kill()`` SIGKILLs the whole group (the driver and its pool workers).
    """

    def __init__(self, args: Sequence[str], env: Mapping[str, str], cwd: Path | None = None) -> None:
        import os
        import queue
        import subprocess
        import sys
        import threading

        driver = Path(__file__).resolve().parent / "reliability_driver.py"
        self.proc = subprocess.Popen(
            [sys.executable, str(driver), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True, env=dict(env), cwd=str(cwd) if cwd else None,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._os = os

        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self._queue.put(line.rstrip("\n"))
            self._queue.put(None)

        self._thread = threading.Thread(target=pump, daemon=True)
        self._thread.start()
        self._eof = False

    def wait_for(self, pred, timeout: float = 120.0) -> str | None:
        import queue
        import time

        deadline = time.monotonic() + timeout
        while True:
            if self._eof:
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise TimeoutError(f"driver did not print the awaited line in {timeout} s; output:\n"
                                   + "\n".join(self.lines[-40:]))
            try:
                line = self._queue.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if line is None:
                self._eof = True
                self.proc.wait()
                return None
            self.lines.append(line)
            if pred(line):
                return line

    def finish(self, timeout: float = 300.0) -> int:
        """Wait for the process to exit (collecting its output); return its exit code."""
        self.wait_for(lambda line: False, timeout=timeout)
        return self.proc.wait()

    def kill(self) -> None:
        import signal

        try:
            self._os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self._thread.join(timeout=10)
        while not self._queue.empty():
            line = self._queue.get_nowait()
            if line is not None:
                self.lines.append(line)

    def output(self) -> str:
        return "\n".join(self.lines)


def scan_files(root: Path, needles: Iterable[str]) -> list[tuple[str, str]]:
    """``(file, needle)`` for every needle found (case-insensitive) in the raw bytes of any file under
    ``root`` — a second, cruder layer under the table scans (it also sees deleted-but-not-vacuumed data and
    files that belong to no table; it cannot see strings a file stores compressed)."""
    needles = [n for n in needles if n]
    lowered = {n.lower().encode("utf-8"): n for n in needles}
    pattern = re.compile(b"|".join(re.escape(k) for k in sorted(lowered, key=len, reverse=True)))
    hits = set()
    for p in Path(root).rglob("*"):
        if p.is_file():
            for m in pattern.finditer(p.read_bytes().lower()):
                hits.add((str(p), lowered[m.group(0)]))
    return sorted(hits)
