"""Outcome files as hospitals export them: column aliases, value and date parsing, row validation (pure code).

Outcome files (CSV, TSV or Parquet) are dropped into a configured folder (default: the demo cohort's
``outcomes.csv``; see :func:`imaging_assets.settings.outcomes_source`).
:func:`imaging_assets.stages.outcomes.load_outcomes` writes what this module reads into DuckDB
(``clinical_outcomes``, ``outcome_rejects``, ``outcome_files``; see that module for the tables).

Columns
    Names are matched case-insensitively after turning spaces/dashes into underscores; accepted aliases
    (see :data:`COLUMN_ALIASES`; the canonical name first wins, then the aliases in this order):

    ==================  =================================================================================
    column              aliases
    ==================  =================================================================================
    patient_id          patientid, patient, subject_id, subject, case_id, mrn
    time_months         time, followup_months, follow_up_months, os_months, survival_months, months
    event               status, event_status, os_event, death, dead, deceased, vital_status
    age                 age_years, age_at_diagnosis
    sex                 gender
    stage               overall_stage, tnm_stage, clinical_stage
    start_date          diagnosis_date, date_of_diagnosis, dx_date, baseline_date, imaging_date,
                        study_date, scan_date
    last_followup_date  last_followup, last_follow_up, last_follow_up_date, date_of_last_followup,
                        date_last_followup, last_contact_date, date_last_contact, date_of_last_contact
    event_date          death_date, date_of_death, date_of_event, dod
    ==================  =================================================================================

    A file needs ``patient_id``; a time (``time_months``, or ``start_date`` with ``last_followup_date``
    and/or ``event_date``); and an event (``event`` and/or ``event_date``). Unknown columns are ignored
    (their names are logged).

Follow-up from dates
    Where a row has no ``time_months`` value, the time is ``(end - start_date)`` in days / 30.4375 (the
    mean Gregorian month). The end is the ``event_date`` when one is given (the patient had the event),
    otherwise the ``last_followup_date``
    (censored there; for a patient whose ``event`` is 1 without an ``event_date`` the last follow-up /
    contact date is the date of the event, as registries record it). So the event date wins over the
    last follow-up date. ``event``, when absent or empty, is 1 where an ``event_date`` is given and 0
    where the file has an ``event_date`` column left empty (no event by the last follow-up date). A
    ``time_months`` value, when present, wins over the dates (the dates are still checked). The dates
    themselves are never stored (they are identifying); only the time and the event are.

Dates accepted
    ``YYYY-MM-DD`` (optionally followed by a time), ``YYYY/MM/DD``, ``YYYYMMDD``, ``DD.MM.YYYY``,
    ``12MAR2019`` / ``12 Mar 2019`` / ``Mar 12, 2019`` (English month names), Parquet/pandas date and
    timestamp values, and ``DD/MM/YYYY`` or ``MM/DD/YYYY``: a slash date whose day/month order is not
    evident from the value itself (both parts <= 12) takes the order the file's other dates show (all its
    date columns, :func:`slash_date_order`), and is rejected as ambiguous when they show none or both.

Validation, per row: a **row** is kept when its ``patient_id``, time and event are valid:
``patient_id`` present and not seen before in the file (the first row is kept); ``time_months`` numeric,
finite and >= 0 (or derived from valid dates, end not before start); ``event`` 0/1 (also ``"0"``/``"1"``/
``"1.0"``, true/false, yes/no, dead/alive) and not 0 while an ``event_date`` is given. Every other field
is checked **on its own**: a bad ``age`` (not numeric or outside [0, 130]), ``sex`` (M/F/O/U; male,
female, other, unknown accepted), ``stage`` (I-IV; 1-4, ``"Stage II"``, sub-stages such as ``"IIIA"`` ->
``"III"`` accepted) or date (not a date, ambiguous day/month order, before 1900, in the future, an end
before ``start_date``) becomes NULL and is reported as a :class:`Problem` with ``fatal=False``; the row is
kept. Empty strings, ``NA``, ``NaN``, ``null``, ``None``, ``n/a`` and ``.`` are missing values. A problem
names the field and the kind of problem and **never quotes the value** (it may be PHI: a name, a birth
date, another patient's id in a shifted column): :func:`_show` says only what kind of value it was.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

from imaging_assets.errors import OutcomeFileError

logger = logging.getLogger(__name__)

#: Input column (canonical name) -> accepted aliases (after normalisation: lower case, ``_`` separators).
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "patient_id": ("patient_id", "patientid", "patient", "subject_id", "subject", "case_id", "mrn"),
    "time_months": ("time_months", "time", "followup_months", "follow_up_months", "os_months",
                    "survival_months", "months"),
    "event": ("event", "status", "event_status", "os_event", "death", "dead", "deceased", "vital_status"),
    "age": ("age", "age_years", "age_at_diagnosis"),
    "sex": ("sex", "gender"),
    "stage": ("stage", "overall_stage", "tnm_stage", "clinical_stage"),
    "start_date": ("start_date", "diagnosis_date", "date_of_diagnosis", "dx_date", "baseline_date",
                   "imaging_date", "study_date", "scan_date"),
    "last_followup_date": ("last_followup_date", "last_followup", "last_follow_up", "last_follow_up_date",
                           "date_of_last_followup", "date_last_followup", "last_contact_date",
                           "date_last_contact", "date_of_last_contact"),
    "event_date": ("event_date", "death_date", "date_of_death", "date_of_event", "dod"),
}
DATE_FIELDS = ("start_date", "last_followup_date", "event_date")
SUFFIXES = {".csv": ",", ".tsv": "\t", ".parquet": None, ".pq": None}
#: Days per month for follow-up from dates: the mean Gregorian month (365.2425 / 12).
DAYS_PER_MONTH = 30.4375
#: Dates before this year are taken as placeholders or typos (1900-01-01, 0019-...), not as real dates.
EARLIEST_YEAR = 1900
#: The typed values of a row (what ``clinical_outcomes`` stores besides the key and bookkeeping).
VALUE_FIELDS = ("time_months", "event", "age", "sex", "stage", "time_from")

_MISSING = {"", "na", "nan", "null", "none", "n/a", ".", "nat"}
_TRUE = {"1", "true", "yes", "y", "t", "dead", "deceased"}
_FALSE = {"0", "false", "no", "n", "f", "alive"}
_SEX = {"m": "M", "male": "M", "f": "F", "female": "F", "o": "O", "other": "O", "u": "U", "unknown": "U"}
_ROMAN = {"I": 1, "II": 2, "III": 3, "IV": 4}
_STAGE_RE = re.compile(r"^(?:stage\s*)?(iv|iii|ii|i|[1-4])\s*[abc]?\d?$", re.IGNORECASE)
_FULL_MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august", "september",
                "october", "november", "december")
_MONTHS = {**{m: i for i, m in enumerate(_FULL_MONTHS, 1)}, **{m[:3]: i for i, m in enumerate(_FULL_MONTHS, 1)},
           "sept": 9}
_ISO_RE = re.compile(r"^(\d{4})[-/](\d{1,2})[-/](\d{1,2})(?:[T ]\d{1,2}:\d{2}(?::\d{2}(?:\.\d+)?)?\S*)?$")
_COMPACT_RE = re.compile(r"^(\d{4})(\d{2})(\d{2})$")
_DOTTED_RE = re.compile(r"^(\d{1,2})\.(\d{1,2})\.(\d{4})$")
_SLASH_RE = re.compile(r"^(\d{1,2})[/-](\d{1,2})[/-](\d{4})(?: \d{1,2}:\d{2}(?::\d{2})?)?$")
_DMONY_RE = re.compile(r"^(\d{1,2})[ \-]?([a-z]{3,9})\.?[ \-,]*(\d{4})$", re.IGNORECASE)
_MONDY_RE = re.compile(r"^([a-z]{3,9})\.?[ \-]?(\d{1,2}),?[ \-]+(\d{4})$", re.IGNORECASE)


@dataclass(frozen=True)
class Problem:
    """One problem of one row: the field, the kind of problem (``code`` starts with the field name), a
    detail that never quotes the value, and whether it drops the row (``fatal``) or only the field."""

    field: str
    code: str
    detail: str = ""
    fatal: bool = False

    @property
    def reason(self) -> str:
        """``"<code>: <detail>"`` (or the code alone), as stored in ``outcome_rejects.reason``."""
        return f"{self.code}: {self.detail}" if self.detail else self.code


@dataclass(frozen=True)
class OutcomeTable:
    """A read outcome file: rows keyed by canonical name, the file's column per canonical name, and the
    day/month order of the slash dates per date field (:func:`slash_date_order` over all of the file's dates)."""

    rows: list[dict[str, object]]
    columns: dict[str, str]
    date_orders: dict[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True)
class OutcomeSources:
    """The outcome files found under the configured paths, and the configured paths that do not exist."""

    configured: list[str]
    files: list[Path]
    missing: list[str]

    @property
    def present(self) -> bool:
        """True when something is configured, every configured path exists and at least one file was found."""
        return bool(self.configured) and not self.missing and bool(self.files)

    def problem(self) -> str | None:
        """Why the sources are not :attr:`present` (None when they are)."""
        if not self.configured:
            return "no outcome source configured (IMAGING_ASSETS_OUTCOMES)"
        if self.missing:
            return f"outcome source(s) do not exist: {', '.join(self.missing)}"
        if not self.files:
            return (f"no outcome file ({', '.join(sorted(SUFFIXES))}) under {', '.join(self.configured)}")
        return None


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
    missing = []
    if "patient_id" not in mapping:
        missing.append("patient_id")
    if "time_months" not in mapping and not ("start_date" in mapping and (
            "last_followup_date" in mapping or "event_date" in mapping)):
        missing.append("time_months (or start_date with last_followup_date / event_date)")
    if "event" not in mapping and "event_date" not in mapping:
        missing.append("event (or event_date)")
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


def read_outcome_file(path: Path) -> OutcomeTable:
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
        # the parser's own message may quote a line of the file: give its type and the line number only
        at = re.search(r"line \d+", str(exc))
        raise OutcomeFileError(f"cannot parse as {suffix[1:]} ({type(exc).__name__}"
                               f"{', at ' + at.group(0) if at else ''})") from None
    mapping = _map_columns(list(df.columns), str(path))
    cols = {canon: df[orig].tolist() for canon, orig in mapping.items()}
    rows = [{canon: cols[canon][i] for canon in cols} for i in range(len(df))]
    # one export writes all its dates one way: the order is read from every date column of the file
    order = slash_date_order(v for f in DATE_FIELDS if f in cols for v in cols[f])
    orders = {f: order for f in DATE_FIELDS if f in cols}
    return OutcomeTable(rows, {k: str(v) for k, v in mapping.items()}, orders)


def read_outcome_table(path: Path) -> list[dict[str, object]]:
    """The rows of :func:`read_outcome_file` only."""
    return read_outcome_file(path).rows


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


def _show(value: object) -> str:
    """What kind of value was bad, never the value itself: it may be PHI (a name, a birth date, another
    patient's id in a shifted column), and ``outcome_rejects`` is an analytic table."""
    if isinstance(value, bool):
        kind = "a boolean"
    elif isinstance(value, (int, float)):
        kind = "a number"
    elif isinstance(value, (date, datetime)) or parse_date(value)[0] is not None:
        kind = "a date"
    elif _as_float(value) is not None:
        kind = "a number"
    else:
        kind = "text"
    return f"{kind}, value not shown"


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


# ------------------------------------------------------------------------------------------------- dates
def slash_date_order(values: Iterable[object]) -> str | None:
    """The day/month order a column's ``a/b/YYYY`` dates show: ``"dmy"`` when some value has a first part
    > 12 and none a second part > 12, ``"mdy"`` for the reverse, ``"mixed"`` when both occur, None when no
    value decides (every slash date has both parts <= 12, or there are none)."""
    first = second = False
    for v in values:
        m = _SLASH_RE.match(v.strip()) if isinstance(v, str) else None
        if m:
            a, b = int(m.group(1)), int(m.group(2))
            first |= a > 12
            second |= b > 12
    if first and second:
        return "mixed"
    return "dmy" if first else "mdy" if second else None


def parse_date(value: object, order: str | None = None) -> tuple[date | None, str | None]:
    """A calendar date from a cell, or None and the kind of problem.

    Parameters
    ----------
    value
        A string in one of the formats of the module docstring, a ``datetime.date``/``datetime``/pandas
        Timestamp/``numpy.datetime64``, or an integer ``YYYYMMDD``.
    order
        The column's :func:`slash_date_order`, used for slash dates whose own parts do not decide.

    Returns
    -------
    tuple
        ``(date, None)``, or ``(None, kind)`` with kind ``"not a date"`` or ``"ambiguous day/month order"``.
    """
    if isinstance(value, datetime):
        return value.date(), None
    if isinstance(value, date):
        return value, None
    if type(value).__name__ == "datetime64":
        import pandas as pd

        return pd.Timestamp(value).date(), None
    if isinstance(value, bool):
        return None, "not a date"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not value.is_integer():
            return None, "not a date"
        value = str(int(value))
    text = str(value).strip()
    ymd: tuple[int, int, int] | None = None
    if m := (_ISO_RE.match(text) or _COMPACT_RE.match(text)):
        ymd = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
    elif m := _DOTTED_RE.match(text):
        ymd = (int(m.group(3)), int(m.group(2)), int(m.group(1)))
    elif m := _SLASH_RE.match(text):
        a, b, y = int(m.group(1)), int(m.group(2)), int(m.group(3))
        if a > 12 and b > 12:
            return None, "not a date"
        if a > 12 or (b <= 12 and a != b and order == "dmy"):
            ymd = (y, b, a)
        elif b > 12 or (a <= 12 and a != b and order == "mdy"):
            ymd = (y, a, b)
        elif a == b:  # 03/03/2020 reads the same either way
            ymd = (y, a, b)
        else:
            return None, "ambiguous day/month order"
    elif m := _DMONY_RE.match(text):
        month = _MONTHS.get(m.group(2).lower())
        ymd = (int(m.group(3)), month, int(m.group(1))) if month else None
    elif m := _MONDY_RE.match(text):
        month = _MONTHS.get(m.group(1).lower())
        ymd = (int(m.group(3)), month, int(m.group(2))) if month else None
    if ymd is None:
        return None, "not a date"
    try:
        return date(*ymd), None
    except ValueError:  # 2019-02-30, month 13
        return None, "not a date"


def _date_field(raw: Mapping[str, object], name: str, orders: Mapping[str, str | None], today: date,
                problems: list[Problem], columns: Mapping[str, str]) -> date | None:
    value = raw.get(name)
    if name not in raw or _is_missing(value):
        return None
    where = f"column {columns[name]!r}, " if name in columns else ""
    parsed, kind = parse_date(value, orders.get(name))
    if parsed is None:
        detail = where + _show(value)
        if kind == "ambiguous day/month order":
            detail = where + ("the file mixes day-first and month-first dates" if orders.get(name) == "mixed"
                              else "no date in the file shows whether the day or the month comes first; "
                                   "use YYYY-MM-DD")
        problems.append(Problem(name, f"{name} {kind}", detail))
        return None
    if parsed.year < EARLIEST_YEAR:
        problems.append(Problem(name, f"{name} before {EARLIEST_YEAR}", where + "placeholder or typo"))
        return None
    if parsed > today:
        problems.append(Problem(name, f"{name} in the future", where.rstrip(", ")))
        return None
    return parsed


# -------------------------------------------------------------------------------------------- validation
def validate_row(raw: Mapping[str, object], date_orders: Mapping[str, str | None] | None = None,
                 columns: Mapping[str, str] | None = None,
                 today: date | None = None) -> tuple[dict[str, Any], list[Problem]]:
    """Typed values of one input row and its problems (empty when valid).

    Parameters
    ----------
    raw
        One row keyed by canonical column name (a key is present when the file has that column).
    date_orders
        Per date field, the column's :func:`slash_date_order` (default: none known).
    columns
        Canonical name -> the file's column name, for the problem details.
    today
        Dates after it are rejected (default: today).

    Returns
    -------
    tuple
        The values (``patient_id``, raw, for keying only, and the :data:`VALUE_FIELDS`; a field with a
        problem is None) and the problems. The row is to be kept when no problem is ``fatal``.
        ``time_from`` says where the time came from: ``"time_months"`` or ``"dates"``.
    """
    orders = date_orders or {}
    cols = columns or {}
    today = today or date.today()
    problems: list[Problem] = []
    out: dict[str, Any] = {"patient_id": patient_id_text(raw.get("patient_id")), "time_months": None,
                           "event": None, "age": None, "sex": None, "stage": None, "time_from": None}
    if out["patient_id"] is None:
        problems.append(Problem("patient_id", "patient_id missing", "empty patient id", fatal=True))

    dates = {f: _date_field(raw, f, orders, today, problems, cols) for f in DATE_FIELDS}
    start = dates["start_date"]
    for end in ("event_date", "last_followup_date"):
        if start is not None and dates[end] is not None and dates[end] < start:
            problems.append(Problem(end, f"{end} before start_date",
                                    f"column {cols.get(end, end)!r} is earlier than {cols.get('start_date', 'start_date')!r}"))
            dates[end] = None
    # an event date was given but is unusable: the event (and its time) are unknown
    event_date_given = "event_date" in raw and not _is_missing(raw.get("event_date"))
    event_date_bad = event_date_given and dates["event_date"] is None

    e = raw.get("event")
    if "event" in raw and not _is_missing(e):
        ev = parse_event(e)
        if ev is None:
            problems.append(Problem("event", "event not 0/1", _show(e), fatal=True))
        elif ev == 0 and dates["event_date"] is not None:
            problems.append(Problem("event", "event contradicts event_date",
                                    "event is 0 but an event date is given", fatal=True))
        else:
            out["event"] = ev
    elif dates["event_date"] is not None:
        out["event"] = 1
    elif event_date_bad:
        problems.append(Problem("event", "event missing", "the event date is unusable", fatal=True))
    elif "event_date" in raw:
        out["event"] = 0  # an event-date column left empty: no event by the last follow-up
    else:
        problems.append(Problem("event", "event missing", "empty", fatal=True))

    t = raw.get("time_months")
    if "time_months" in raw and not _is_missing(t):
        tv = _as_float(t)
        if tv is None or not math.isfinite(tv):
            problems.append(Problem("time_months", "time_months not a finite number", _show(t), fatal=True))
        elif tv < 0:
            problems.append(Problem("time_months", "time_months negative", _show(t), fatal=True))
        else:
            out["time_months"], out["time_from"] = tv, "time_months"
    else:
        end = dates["event_date"] if dates["event_date"] is not None else (
            None if event_date_bad and out["event"] != 0 else dates["last_followup_date"])
        if start is not None and end is not None:
            out["time_months"], out["time_from"] = (end - start).days / DAYS_PER_MONTH, "dates"
        else:
            problems.append(Problem("time_months", "time_months missing",
                                    "no time_months and no valid start_date with a last follow-up or event date",
                                    fatal=True))

    a = raw.get("age")
    if not _is_missing(a):
        av = _as_float(a)
        if av is None or not math.isfinite(av):
            problems.append(Problem("age", "age not numeric", _show(a)))
        elif not 0 <= av <= 130:
            problems.append(Problem("age", "age out of range [0, 130]", _show(a)))
        else:
            out["age"] = av

    s = raw.get("sex")
    if not _is_missing(s):
        out["sex"] = _SEX.get(str(s).strip().lower())
        if out["sex"] is None:
            problems.append(Problem("sex", "sex not M/F/O/U", _show(s)))

    g = raw.get("stage")
    if not _is_missing(g):
        out["stage"] = parse_stage(g)
        if out["stage"] is None:
            problems.append(Problem("stage", "stage not I-IV", _show(g)))
    return out, problems


# ---------------------------------------------------------------------------------------------- sources
def find_outcome_files(folder_or_files: str | Path | Sequence[str | Path] | None) -> OutcomeSources:
    """The outcome files under the configured paths (folders searched recursively by suffix, files taken as
    they are), and the paths that do not exist. Never raises for a missing path: the caller reports it."""
    if folder_or_files is None:
        items: list[str | Path] = []
    elif isinstance(folder_or_files, (str, Path)):
        items = [folder_or_files] if str(folder_or_files).strip() else []
    else:
        items = [i for i in folder_or_files if str(i).strip()]
    found: list[Path] = []
    missing: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found.extend(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES
                         and not f.name.startswith("."))
        elif p.is_file():
            found.append(p)
        else:
            missing.append(str(p))
    return OutcomeSources([str(i) for i in items], sorted({f.resolve() for f in found}, key=str), missing)


def outcome_files(folder_or_files: str | Path | Sequence[str | Path]) -> list[Path]:
    """The outcome files under a folder (recursive, by suffix), a single file, or a list of either.

    Raises
    ------
    FileNotFoundError
        When a named file or folder does not exist.
    """
    sources = find_outcome_files(folder_or_files)
    if sources.missing:
        raise FileNotFoundError(f"outcome source {sources.missing[0]} does not exist")
    return sources.files
