"""Clinical outcomes: validated, pseudonymised, incremental loading of outcome files into DuckDB.

Outcome files (CSV, TSV or Parquet) are dropped into a configured folder (default: the demo cohort's
``outcomes.csv``; see :func:`default_outcomes_source`). :func:`load_outcomes` reads them into three tables:

``clinical_outcomes`` (primary key ``patient_key, source_file``)
    One row per patient and file, typed as :data:`OUTCOME_COLUMNS`. The raw patient id is replaced by
    :func:`imaging_assets.dicom.pseudonym.patient_key` (the same keyed HMAC discovery uses), so outcomes
    join to ``lesions``/``imaging_series`` on ``patient_key``. ``loaded_at`` (UTC) is when that row's
    values were last inserted or changed; an unchanged row keeps its time.
``outcome_rejects`` (``source_file, row_number, reason, loaded_at``)
    Rows that failed validation, with every reason (``"; "``-separated). ``row_number`` is the 1-based
    data row (the CSV line number minus one; the header is not counted). A file that cannot be read at
    all gets one row with ``row_number`` NULL. The table reflects the latest attempt at each file: a
    reload of a file replaces that file's rejects. Never holds the raw patient id.
``outcome_files`` (``source_file, size, mtime_ns, sha256, loaded_at, status, n_rows, n_rejected``)
    One row per file seen; ``status`` is ``'loaded'`` or ``'failed'``. A file whose SHA-256 is unchanged is
    skipped entirely, so loading the same file twice adds nothing.

A view ``patient_outcomes`` keeps one row per ``patient_key`` across files (the most recently loaded row;
ties: the greatest ``source_file``), which is what the survival analysis joins to.

Column names are matched case-insensitively after turning spaces/dashes into underscores; accepted
aliases (see :data:`COLUMN_ALIASES`):

=============  =====================================================================================
column         aliases
=============  =====================================================================================
patient_id     patientid, patient, subject_id, subject, case_id, mrn
time_months    time, followup_months, follow_up_months, os_months, survival_months, months
event          status, event_status, os_event, death, dead, deceased
age            age_years, age_at_diagnosis
sex            gender
stage          overall_stage, tnm_stage, clinical_stage
=============  =====================================================================================

Unknown columns are ignored (their names are logged). Validation, per row (all failures are reported):
``patient_id`` present (else rejected); ``time_months`` numeric, finite and >= 0; ``event`` 0/1 (also
``"0"``/``"1"``/``"1.0"``, true/false, yes/no); ``age`` empty or numeric in [0, 130]; ``sex`` empty or
M/F/O/U (male/female/other/unknown accepted); ``stage`` empty or I-IV (1-4, ``"Stage II"``, sub-stages
such as ``"IIIA"`` -> ``"III"`` accepted). Empty strings, ``NA``, ``NaN``, ``null`` and ``None`` are missing
values. A patient id seen again in the same file: the first row is kept, later rows are rejected.

A file that changed is applied in one transaction: new rows inserted, changed rows updated, rows whose
patient disappeared from that file deleted, its rejects replaced. A file that cannot be parsed (not
text, no header, required columns absent) leaves everything already stored from it in place and records
one reject naming the problem. Rows of a file that vanished from the folder are kept (logged).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import time
from collections import Counter
from collections.abc import Container, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from imaging_assets.dicom.pseudonym import patient_key
from imaging_assets.store.warehouse import arrow_table, connect, fetch_dicts, transaction

logger = logging.getLogger(__name__)

#: Typed columns of ``clinical_outcomes``.
OUTCOME_COLUMNS: dict[str, str] = {
    "patient_key": "VARCHAR",
    "time_months": "DOUBLE",
    "event": "INTEGER",
    "age": "DOUBLE",
    "sex": "VARCHAR",
    "stage": "VARCHAR",
    "source_file": "VARCHAR",
    "loaded_at": "TIMESTAMP",
}

REJECT_COLUMNS: dict[str, str] = {
    "source_file": "VARCHAR",
    "row_number": "BIGINT",
    "reason": "VARCHAR",
    "loaded_at": "TIMESTAMP",
}

FILE_COLUMNS: dict[str, str] = {
    "source_file": "VARCHAR",
    "size": "BIGINT",
    "mtime_ns": "BIGINT",
    "sha256": "VARCHAR",
    "loaded_at": "TIMESTAMP",
    "status": "VARCHAR",
    "n_rows": "BIGINT",
    "n_rejected": "BIGINT",
}

#: Input column (canonical name) -> accepted aliases (after normalisation: lower case, ``_`` separators).
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "patient_id": ("patient_id", "patientid", "patient", "subject_id", "subject", "case_id", "mrn"),
    "time_months": ("time_months", "time", "followup_months", "follow_up_months", "os_months",
                    "survival_months", "months"),
    "event": ("event", "status", "event_status", "os_event", "death", "dead", "deceased"),
    "age": ("age", "age_years", "age_at_diagnosis"),
    "sex": ("sex", "gender"),
    "stage": ("stage", "overall_stage", "tnm_stage", "clinical_stage"),
}
REQUIRED = ("patient_id", "time_months", "event")
SUFFIXES = {".csv": ",", ".tsv": "\t", ".parquet": None, ".pq": None}

OUTCOMES_TABLE = "clinical_outcomes"
REJECTS_TABLE = "outcome_rejects"
FILES_TABLE = "outcome_files"
PATIENT_VIEW = "patient_outcomes"

_MISSING = {"", "na", "nan", "null", "none", "n/a", "."}
_TRUE = {"1", "true", "yes", "y", "t", "dead", "deceased"}
_FALSE = {"0", "false", "no", "n", "f", "alive"}
_SEX = {"m": "M", "male": "M", "f": "F", "female": "F", "o": "O", "other": "O", "u": "U", "unknown": "U"}
_ROMAN = {"I": 1, "II": 2, "III": 3, "IV": 4}
_STAGE_RE = re.compile(r"^(?:stage\s*)?(iv|iii|ii|i|[1-4])\s*[abc]?\d?$", re.IGNORECASE)
_VALUE_FIELDS = ("time_months", "event", "age", "sex", "stage")


def default_outcomes_source() -> Path:
    """``IMAGING_ASSETS_OUTCOMES`` (a file or folder) or the demo cohort's ``outcomes.csv``."""
    from imaging_assets.settings import demo_dir

    env = os.environ.get("IMAGING_ASSETS_OUTCOMES")
    return Path(env) if env else demo_dir() / "outcomes.csv"


def ensure_outcome_schema(con: duckdb.DuckDBPyConnection) -> None:
    """Create the outcome tables and the ``patient_outcomes`` view when missing (idempotent)."""
    specs = (
        (OUTCOMES_TABLE, OUTCOME_COLUMNS, ("patient_key", "source_file")),
        (REJECTS_TABLE, REJECT_COLUMNS, ()),
        (FILES_TABLE, FILE_COLUMNS, ("source_file",)),
    )
    for name, cols, key in specs:
        parts = [f'"{c}" {t}' for c, t in cols.items()]
        if key:
            parts.append("PRIMARY KEY (" + ", ".join(f'"{k}"' for k in key) + ")")
        con.execute(f"CREATE TABLE IF NOT EXISTS {name} ({', '.join(parts)})")
    con.execute(
        f"CREATE VIEW IF NOT EXISTS {PATIENT_VIEW} AS "
        f"SELECT * EXCLUDE (_rn) FROM (SELECT *, row_number() OVER (PARTITION BY patient_key "
        f"ORDER BY loaded_at DESC, source_file DESC) AS _rn FROM {OUTCOMES_TABLE}) WHERE _rn = 1"
    )


# ----------------------------------------------------------------------------------------------- parsing
class OutcomeFileError(ValueError):
    """An outcome file that cannot be read as a table with the required columns."""


def _norm_name(name: object) -> str:
    return re.sub(r"[\s\-]+", "_", str(name).strip().lower().lstrip("\ufeff"))


def _map_columns(columns: Sequence[object], source: str) -> dict[str, object]:
    """Canonical name -> the file's column; exact canonical names win over aliases, then file order."""
    normed = [(_norm_name(c), c) for c in columns]
    mapping: dict[str, object] = {}
    for canon, aliases in COLUMN_ALIASES.items():
        for alias in aliases:  # alias order = preference order (canonical first)
            hits = [orig for n, orig in normed if n == alias]
            if hits:
                mapping[canon] = hits[0]
                break
    missing = [c for c in REQUIRED if c not in mapping]
    if missing:
        # the "header" may be a data row of a header-less file: never echo it (it could hold an id)
        raise OutcomeFileError(
            f"required column(s) missing: {', '.join(missing)} ({len(columns)} column(s) found; accepted "
            "names are listed in imaging_assets.store.outcomes.COLUMN_ALIASES)"
        )
    used = set(mapping.values())
    unknown = [str(c) for c in columns if c not in used]
    if unknown:
        logger.info("%s: ignoring %d unknown column(s): %s", source, len(unknown), ", ".join(unknown))
    return mapping


def _read_table(path: Path) -> list[dict[str, object]]:
    """Rows of a CSV/TSV (all values as strings) or Parquet file, keyed by canonical column name."""
    import pandas as pd

    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise OutcomeFileError(f"unsupported file type {suffix!r} (expected {', '.join(sorted(SUFFIXES))})")
    try:
        if SUFFIXES[suffix] is None:
            import pyarrow.parquet as pq

            df = pq.read_table(path).to_pandas()
        else:
            df = pd.read_csv(path, sep=SUFFIXES[suffix], dtype=str, keep_default_na=False,
                             encoding="utf-8-sig", skip_blank_lines=True)
    except UnicodeDecodeError as exc:
        raise OutcomeFileError(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except Exception as exc:  # noqa: BLE001 - pandas/pyarrow raise many types; all mean "unreadable"
        raise OutcomeFileError(f"cannot parse as {suffix[1:]}: {type(exc).__name__}: {exc}"[:300]) from None
    mapping = _map_columns(list(df.columns), str(path))
    cols = {canon: df[orig].tolist() for canon, orig in mapping.items()}
    return [{canon: cols[canon][i] for canon in cols} for i in range(len(df))]


def _is_missing(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    try:
        import pandas as pd

        if value is pd.NA or value is pd.NaT:
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(value, str) and value.strip().lower() in _MISSING


def _show(value: object, redact: Container[str] = ()) -> str:
    """A short quote of a bad value for a reject reason; a value equal to a patient id is not quoted."""
    text = str(value).strip()
    if text in redact:
        return "<value equal to a patient id: not shown>"
    return repr(text if len(text) <= 16 else text[:16] + "...")


def _as_float(value: object) -> float | None:
    if isinstance(value, bool):
        return float(value)
    try:
        return float(str(value).strip()) if isinstance(value, str) else float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _patient_id_text(value: object) -> str | None:
    if _is_missing(value):
        return None
    if isinstance(value, float) and value.is_integer():  # Parquet ids stored as float
        value = int(value)
    text = str(value).strip()
    return text or None


def parse_event(value: object) -> int | None:
    """0/1 from 0, 1, "0", "1", "1.0", true/false, yes/no, dead/alive; None when not recognisable."""
    if isinstance(value, bool):
        return int(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return 1
    if text in _FALSE:
        return 0
    num = _as_float(value)
    if num is not None and num in (0.0, 1.0):
        return int(num)
    return None


def parse_stage(value: object) -> str | None:
    """``"I"``..``"IV"`` from I-IV, 1-4, ``"Stage II"``, ``"IIIA"``; None when not recognisable."""
    num = _as_float(value) if not isinstance(value, str) else None
    if num is not None and num.is_integer() and 1 <= num <= 4:
        return ["I", "II", "III", "IV"][int(num) - 1]
    m = _STAGE_RE.match(str(value).strip())
    if not m:
        return None
    token = m.group(1).upper()
    if token.isdigit():
        return ["I", "II", "III", "IV"][int(token) - 1]
    return token if token in _ROMAN else None


def validate_row(raw: Mapping[str, object], redact: Container[str] = ()) -> tuple[dict[str, Any],
                                                                                 list[tuple[str, str]]]:
    """Typed values of one input row and its problems as ``(code, detail)`` pairs (empty when valid).

    The returned values hold ``patient_id`` (raw, for keying only) and the :data:`_VALUE_FIELDS`. Details
    quote the offending value (at most 16 characters) unless it equals one of ``redact`` (the file's
    patient ids), so a shifted column cannot copy an identifier into the rejects table.
    """
    problems: list[tuple[str, str]] = []
    out: dict[str, Any] = {"patient_id": _patient_id_text(raw.get("patient_id"))}
    if out["patient_id"] is None:
        problems.append(("patient_id missing", "empty patient id"))

    t = raw.get("time_months")
    if _is_missing(t):
        problems.append(("time_months missing", "empty"))
    else:
        tv = _as_float(t)
        if tv is None or not math.isfinite(tv):
            problems.append(("time_months not a finite number", _show(t, redact)))
        elif tv < 0:
            problems.append(("time_months negative", _show(t, redact)))
        else:
            out["time_months"] = tv

    e = raw.get("event")
    if _is_missing(e):
        problems.append(("event missing", "empty"))
    else:
        ev = parse_event(e)
        if ev is None:
            problems.append(("event not 0/1", _show(e, redact)))
        else:
            out["event"] = ev

    a = raw.get("age")
    out["age"] = None
    if not _is_missing(a):
        av = _as_float(a)
        if av is None or not math.isfinite(av):
            problems.append(("age not numeric", _show(a, redact)))
        elif not 0 <= av <= 130:
            problems.append(("age out of range [0, 130]", _show(a, redact)))
        else:
            out["age"] = av

    s = raw.get("sex")
    out["sex"] = None
    if not _is_missing(s):
        sv = _SEX.get(str(s).strip().lower())
        if sv is None:
            problems.append(("sex not M/F/O/U", _show(s, redact)))
        out["sex"] = sv

    g = raw.get("stage")
    out["stage"] = None
    if not _is_missing(g):
        gv = parse_stage(g)
        if gv is None:
            problems.append(("stage not I-IV", _show(g, redact)))
        out["stage"] = gv
    return out, problems


# ----------------------------------------------------------------------------------------------- loading
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def outcome_files(folder_or_files: str | Path | Sequence[str | Path]) -> list[Path]:
    """The outcome files under a folder (recursive, by suffix), a single file, or a list of either.

    Raises
    ------
    FileNotFoundError
        When a named file or folder does not exist.
    """
    items = [folder_or_files] if isinstance(folder_or_files, (str, Path)) else list(folder_or_files)
    found: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found.extend(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES
                         and not f.name.startswith("."))
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(f"outcome source {p} does not exist")
    return sorted({f.resolve() for f in found}, key=str)


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _register(con: duckdb.DuckDBPyConnection, name: str, rows: Sequence[Mapping[str, Any]],
              fields: Mapping[str, str]) -> None:
    con.register(name, arrow_table(rows, fields))


def _apply_file(con: duckdb.DuckDBPyConnection, source: str, file_row: dict[str, Any],
                rows: list[dict[str, Any]] | None, rejects: list[dict[str, Any]],
                now: datetime) -> dict[str, int]:
    """Write one file's outcome in one transaction; ``rows`` None means the file failed to parse."""
    counts = {"inserted": 0, "updated": 0, "unchanged": 0, "deleted": 0}
    with transaction(con):
        if rows is not None:
            stored = con.execute(
                f"SELECT patient_key, time_months, event, age, sex, stage FROM {OUTCOMES_TABLE} "
                "WHERE source_file = ?", [source]).fetchall()
            existing = {t[0]: dict(zip(_VALUE_FIELDS, t[1:])) for t in stored}
            new_keys = {r["patient_key"] for r in rows}
            changed: list[dict[str, Any]] = []
            for r in rows:
                old = existing.get(r["patient_key"])
                if old is None:
                    counts["inserted"] += 1
                    changed.append(r)
                elif any(old[f] != r[f] for f in _VALUE_FIELDS):
                    counts["updated"] += 1
                    changed.append(r)
                else:
                    counts["unchanged"] += 1
            gone = [k for k in existing if k not in new_keys]
            counts["deleted"] = len(gone)
            drop = gone + [r["patient_key"] for r in changed if r["patient_key"] in existing]
            if drop:
                con.register("_drop", pa.table({"patient_key": pa.array(drop, pa.string())}))
                con.execute(f"DELETE FROM {OUTCOMES_TABLE} WHERE source_file = ? AND patient_key IN "
                            "(SELECT patient_key FROM _drop)", [source])
                con.unregister("_drop")
            if changed:
                for r in changed:
                    r["source_file"] = source
                    r["loaded_at"] = now
                _register(con, "_rows", changed, OUTCOME_COLUMNS)
                cols = ", ".join(f'"{c}"' for c in OUTCOME_COLUMNS)
                con.execute(f"INSERT INTO {OUTCOMES_TABLE} ({cols}) SELECT {cols} FROM _rows")
                con.unregister("_rows")
        con.execute(f"DELETE FROM {REJECTS_TABLE} WHERE source_file = ?", [source])
        if rejects:
            _register(con, "_rejects", rejects, REJECT_COLUMNS)
            cols = ", ".join(f'"{c}"' for c in REJECT_COLUMNS)
            con.execute(f"INSERT INTO {REJECTS_TABLE} ({cols}) SELECT {cols} FROM _rejects")
            con.unregister("_rejects")
        con.execute(f"DELETE FROM {FILES_TABLE} WHERE source_file = ?", [source])
        _register(con, "_file", [file_row], FILE_COLUMNS)
        cols = ", ".join(f'"{c}"' for c in FILE_COLUMNS)
        con.execute(f"INSERT INTO {FILES_TABLE} ({cols}) SELECT {cols} FROM _file")
        con.unregister("_file")
    return counts


def load_outcomes(
    database: str | Path,
    folder_or_files: str | Path | Sequence[str | Path],
    secret: str | None = None,
) -> dict[str, Any]:
    """Load outcome files into ``clinical_outcomes`` incrementally (see the module docstring for rules).

    Parameters
    ----------
    database
        Path of the DuckDB file.
    folder_or_files
        A folder (searched recursively for ``.csv``, ``.tsv``, ``.parquet``, ``.pq``), one file, or a list
        of files/folders.
    secret
        Pseudonymisation secret passed to :func:`imaging_assets.dicom.pseudonym.patient_key` (default: the
        environment / development key, exactly as discovery).

    Returns
    -------
    dict
        ``files`` (found), ``files_loaded``, ``files_skipped`` (unchanged SHA-256), ``files_failed``,
        ``rows_read``, ``inserted``, ``updated``, ``unchanged``, ``deleted``, ``rejected``,
        ``rejects_by_reason`` (reason code -> count), ``elapsed_s``.
    """
    t0 = time.perf_counter()
    files = outcome_files(folder_or_files)
    summary: dict[str, Any] = {
        "files": len(files), "files_loaded": 0, "files_skipped": 0, "files_failed": 0, "rows_read": 0,
        "inserted": 0, "updated": 0, "unchanged": 0, "deleted": 0, "rejected": 0,
    }
    by_reason: Counter[str] = Counter()
    with connect(database) as con:
        ensure_outcome_schema(con)
        known = {r[0]: r[1] for r in con.execute(f"SELECT source_file, sha256 FROM {FILES_TABLE}").fetchall()}
        seen = set()
        for path in files:
            source = str(path)
            seen.add(source)
            stat = path.stat()
            sha = _sha256(path)
            if known.get(source) == sha:
                summary["files_skipped"] += 1
                logger.debug("%s: unchanged (sha256 %s), skipped", source, sha[:12])
                continue
            now = _now()
            file_row = {"source_file": source, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                        "sha256": sha, "loaded_at": now}
            try:
                raw_rows = _read_table(path)
            except OutcomeFileError as exc:
                reason = f"file {path.name} unreadable: {exc}"
                logger.warning("%s: %s; previously stored rows kept", source, exc)
                file_row.update(status="failed", n_rows=0, n_rejected=1)
                _apply_file(con, source, file_row, None,
                            [{"source_file": source, "row_number": None, "reason": reason, "loaded_at": now}],
                            now)
                summary["files_failed"] += 1
                summary["rejected"] += 1
                by_reason["file unreadable"] += 1
                continue
            good: list[dict[str, Any]] = []
            rejects: list[dict[str, Any]] = []
            first_row: dict[str, int] = {}
            ids = {t for t in (_patient_id_text(r.get("patient_id")) for r in raw_rows) if t}
            for i, raw in enumerate(raw_rows, start=1):
                values, problems = validate_row(raw, ids)
                pid = values.pop("patient_id")
                key = patient_key(pid, secret) if pid is not None else None
                if key is not None:
                    if key in first_row:
                        problems.append(("duplicate patient id in file",
                                         f"same patient as data row {first_row[key]}"))
                    else:
                        first_row[key] = i
                if problems:
                    by_reason.update(code for code, _ in problems)
                    rejects.append({"source_file": source, "row_number": i, "loaded_at": now,
                                    "reason": "; ".join(f"{c}: {d}" for c, d in problems)})
                    continue
                good.append({"patient_key": key, **values})
            file_row.update(status="loaded", n_rows=len(raw_rows), n_rejected=len(rejects))
            counts = _apply_file(con, source, file_row, good, rejects, now)
            for k, v in counts.items():
                summary[k] += v
            summary["files_loaded"] += 1
            summary["rows_read"] += len(raw_rows)
            summary["rejected"] += len(rejects)
            logger.info("%s: %d rows read, %d inserted, %d updated, %d unchanged, %d deleted, %d rejected",
                        source, len(raw_rows), counts["inserted"], counts["updated"], counts["unchanged"],
                        counts["deleted"], len(rejects))
        vanished = sorted(set(known) - seen)
        if vanished and isinstance(folder_or_files, (str, Path)) and Path(folder_or_files).is_dir():
            logger.info("%d previously loaded outcome file(s) are no longer in %s; their rows are kept",
                        len(vanished), folder_or_files)
    summary["rejects_by_reason"] = dict(sorted(by_reason.items()))
    summary["elapsed_s"] = round(time.perf_counter() - t0, 3)
    return summary


def outcomes_state(database: str | Path, read_only: bool = True) -> dict[str, Any]:
    """A small fingerprint of the outcome tables for a sensor cursor.

    Returns
    -------
    dict
        ``rows`` (in ``clinical_outcomes``), ``latest_load`` (ISO time of the newest file load or row
        change, None when empty), ``files`` (files seen), ``checksum`` (an order-independent hash of the
        stored rows, so a deletion that keeps the count also changes the state). A missing database or
        missing tables give zeros.
    """
    empty = {"rows": 0, "latest_load": None, "files": 0, "checksum": "0"}
    if str(database) != ":memory:" and not Path(database).exists():
        return empty
    with connect(database, read_only=read_only) as con:
        tables = {r[0] for r in con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'").fetchall()}
        if OUTCOMES_TABLE not in tables or FILES_TABLE not in tables:
            return empty
        row = fetch_dicts(con, (
            f"SELECT (SELECT count(*) FROM {OUTCOMES_TABLE}) AS rows, "
            f"(SELECT count(*) FROM {FILES_TABLE}) AS files, "
            f"greatest((SELECT max(loaded_at) FROM {OUTCOMES_TABLE}), "
            f"(SELECT max(loaded_at) FROM {FILES_TABLE})) AS latest_load, "
            f"(SELECT coalesce(bit_xor(hash(patient_key, source_file, time_months, event, age, sex, stage)), 0) "
            f"FROM {OUTCOMES_TABLE}) AS checksum"))[0]
    return {"rows": int(row["rows"]), "latest_load": row["latest_load"], "files": int(row["files"]),
            "checksum": str(row["checksum"])}


def read_patient_outcomes(database: str | Path) -> list[dict[str, Any]]:
    """One outcome row per patient key (the ``patient_outcomes`` view), ordered by key; [] when absent."""
    if not Path(database).exists():
        return []
    with connect(database, read_only=True) as con:
        tables = {r[0] for r in con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'").fetchall()}
        if PATIENT_VIEW not in tables:
            return []
        return fetch_dicts(con, f"SELECT * FROM {PATIENT_VIEW} ORDER BY patient_key")
