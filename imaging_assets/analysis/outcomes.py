"""Outcome files as hospitals export them: column aliases, value parsing and row validation (pure code).

Clinical outcomes: validated, pseudonymised, incremental loading of outcome files into DuckDB.

Outcome files (CSV, TSV or Parquet) are dropped into a configured folder (default: the demo cohort's
``outcomes.csv``; see :func:`imaging_assets.settings.outcomes_source`).
:func:`imaging_assets.stages.outcomes.load_outcomes` loads them into three tables:

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

"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Container, Mapping, Sequence
from pathlib import Path
from typing import Any

from imaging_assets.errors import OutcomeFileError

logger = logging.getLogger(__name__)

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

_MISSING = {"", "na", "nan", "null", "none", "n/a", "."}
_TRUE = {"1", "true", "yes", "y", "t", "dead", "deceased"}
_FALSE = {"0", "false", "no", "n", "f", "alive"}
_SEX = {"m": "M", "male": "M", "f": "F", "female": "F", "o": "O", "other": "O", "u": "U", "unknown": "U"}
_ROMAN = {"I": 1, "II": 2, "III": 3, "IV": 4}
_STAGE_RE = re.compile(r"^(?:stage\s*)?(iv|iii|ii|i|[1-4])\s*[abc]?\d?$", re.IGNORECASE)
VALUE_FIELDS = ("time_months", "event", "age", "sex", "stage")


# ----------------------------------------------------------------------------------------------- parsing
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
            "names are listed in imaging_assets.analysis.outcomes.COLUMN_ALIASES)"
        )
    used = set(mapping.values())
    unknown = [str(c) for c in columns if c not in used]
    if unknown:
        logger.info("%s: ignoring %d unknown column(s): %s", source, len(unknown), ", ".join(unknown))
    return mapping


def read_outcome_table(path: Path) -> list[dict[str, object]]:
    """Rows of a CSV/TSV (all values as strings) or Parquet file, keyed by canonical column name.

    Raises
    ------
    OutcomeFileError
        The file cannot be read as a table with the required columns (never quoting its content).
    """
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


def patient_id_text(value: object) -> str | None:
    """The patient id of a cell as text (Parquet float ids without ``.0``), None when missing."""
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

    The returned values hold ``patient_id`` (raw, for keying only) and the :data:`VALUE_FIELDS`. Details
    quote the offending value (at most 16 characters) unless it equals one of ``redact`` (the file's
    patient ids), so a shifted column cannot copy an identifier into the rejects table.
    """
    problems: list[tuple[str, str]] = []
    out: dict[str, Any] = {"patient_id": patient_id_text(raw.get("patient_id"))}
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
