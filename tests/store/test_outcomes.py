"""Clinical outcomes loader: pseudonymised join key, incremental upserts, validation and rejects."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imaging_assets.analysis.outcomes import parse_event, parse_stage, validate_row
from imaging_assets.dicom.headers import read_file_record
from imaging_assets.dicom.pseudonym import patient_key
from imaging_assets.stages.outcomes import load_outcomes, outcomes_state, read_patient_outcomes
from imaging_assets.store.warehouse import Warehouse, connect


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from imaging_assets.demo.generator import generate_cohort

    return generate_cohort(tmp_path_factory.mktemp("outcomes") / "demo", n_patients=20, seed=1, workers=2)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _write_csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    columns = columns or list(rows[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return path


def _rows(db: Path, sql: str, params=()) -> list[tuple]:
    with connect(db, read_only=True) as con:
        return con.execute(sql, list(params)).fetchall()


def _all_text(db: Path) -> list[str]:
    """Every VARCHAR value of every table in the database."""
    out: list[str] = []
    with connect(db, read_only=True) as con:
        cols = con.execute(
            "SELECT c.table_name, c.column_name FROM information_schema.columns c "
            "JOIN information_schema.tables t USING (table_schema, table_name) "
            "WHERE c.data_type = 'VARCHAR' AND t.table_type = 'BASE TABLE'").fetchall()
        assert cols
        for table, column in cols:
            out += [v for (v,) in con.execute(f'SELECT "{column}" FROM "{table}"').fetchall() if v]
    return out


def test_demo_outcomes_pseudonymised_and_join_discovery(cohort, tmp_path):
    wh = Warehouse(tmp_path / "wh")
    db = wh.duckdb_path
    raw = _read_csv(cohort.outcomes_csv)
    assert len(raw) == 20
    summary = load_outcomes(wh, cohort.outcomes_csv)
    assert summary.files == 1 and summary.rows_read == 20
    assert summary.inserted == 20 and summary.rejected == 0

    stored = {r[0]: r for r in _rows(db, "SELECT patient_key, time_months, event, age, sex, stage, "
                                         "source_file, loaded_at FROM clinical_outcomes")}
    assert len(stored) == 20
    for r in raw:
        key = patient_key(r["patient_id"])
        row = stored[key]
        assert row[1] == pytest.approx(float(r["time_months"]))
        assert row[2] == int(r["event"]) and row[3] == float(r["age"])
        assert row[4] == r["sex"] and row[5] == r["stage"]
        assert row[6] == str(cohort.outcomes_csv.resolve()) and row[7] is not None

    # discovery computes the same key from the DICOM headers
    discovered = set()
    for case in sorted(cohort.dicom_dir.glob("case_*")):
        first = sorted(case.rglob("*.dcm"))[0]
        st = first.stat()
        rec, _ = read_file_record(str(first), st.st_size, st.st_mtime_ns)
        if rec is not None:
            discovered.add(rec["patient_key"])
    assert discovered and discovered <= set(stored)
    assert len(discovered) >= 18  # a few demo files are deliberately broken

    # no raw id anywhere
    text = _all_text(db)
    for r in raw:
        assert not any(r["patient_id"] in v for v in text)

    view = read_patient_outcomes(wh)
    assert sorted(v["patient_key"] for v in view) == sorted(stored)


def test_reload_is_a_no_op_and_changes_are_applied_exactly(cohort, tmp_path):
    wh = Warehouse(tmp_path / "wh")
    db = wh.duckdb_path
    src = tmp_path / "drop" / "outcomes.csv"
    rows = _read_csv(cohort.outcomes_csv)
    _write_csv(src, rows)
    assert outcomes_state(wh) == {"rows": 0, "latest_load": None, "files": 0, "checksum": "0"}

    load_outcomes(wh, src.parent)
    state1 = outcomes_state(wh)
    assert state1["rows"] == 20 and state1["files"] == 1 and state1["latest_load"]
    before = {k: t for k, t in _rows(db, "SELECT patient_key, loaded_at FROM clinical_outcomes")}

    again = load_outcomes(wh, src.parent)
    assert again.inserted == 0 and again.files_skipped == 1 and again.rows_read == 0
    os.utime(src, ns=(1, 1))  # touched, same content: still skipped
    assert load_outcomes(wh, src.parent).files_skipped == 1
    assert outcomes_state(wh) == state1

    # modify one, delete one, add one
    modified, deleted = rows[0], rows[1]
    modified = {**modified, "time_months": "99.50", "event": "0"}
    added = {**rows[2], "patient_id": "NEW0000001", "time_months": "3.25"}
    new_rows = [modified] + rows[2:] + [added]
    _write_csv(src, new_rows)
    s = load_outcomes(wh, src.parent)
    assert (s.inserted, s.updated, s.deleted, s.unchanged, s.rejected) == (1, 1, 1, 18, 0)
    assert s.files_loaded == 1 and s.rows_read == 20

    after = {r[0]: r[1:] for r in _rows(db, "SELECT patient_key, time_months, event, loaded_at "
                                            "FROM clinical_outcomes")}
    assert len(after) == 20
    assert patient_key(deleted["patient_id"]) not in after
    assert after[patient_key(modified["patient_id"])][:2] == (99.5, 0)
    assert after[patient_key("NEW0000001")][0] == 3.25
    for r in rows[2:]:  # unchanged rows keep their load time
        k = patient_key(r["patient_id"])
        assert after[k][2] == before[k]
    assert after[patient_key(modified["patient_id"])][2] > before[patient_key(modified["patient_id"])]
    state2 = outcomes_state(wh)
    assert state2 != state1 and state2["rows"] == 20

    # a pure deletion keeps latest_load's rows-changed semantics visible through the checksum
    _write_csv(src, new_rows[:-1])
    assert load_outcomes(wh, src.parent).deleted == 1
    assert outcomes_state(wh)["checksum"] != state2["checksum"]


def test_bad_rows_rejected_bad_fields_emptied_never_quoted(tmp_path):
    """Per-field rejects: a row whose id, time and event are valid is kept with the bad optional field NULL;
    every problem is a row of outcome_rejects naming the field and the kind, never the value."""
    wh = Warehouse(tmp_path / "wh")
    db = wh.duckdb_path
    cols = ["Patient ID", "followup_months", "status", "Age", "gender", "Stage", "notes"]
    good = [
        ["G1", "10", "1", "60", "M", "II", "x"],
        ["G2", "0", "true", "", "female", "Stage III", ""],
        ["G3", "5.5", "0.0", "70.5", "", "4", ""],
        ["G4", "7", "no", "45", "U", "IIIA", ""],
        ["G5", "7", "1", "45", "O", "", ""],
    ]
    bad = [
        ["B1", "-1", "1", "60", "M", "II", ""],  # negative time
        ["B2", "10", "2", "60", "M", "II", ""],  # event 2
        ["B3", "10", "1", "60", "M", "V", ""],  # stage V: kept, stage NULL
        ["", "10", "1", "60", "M", "II", ""],  # missing id
        ["G1", "11", "1", "60", "M", "II", ""],  # duplicate of G1 (later row rejected)
        ["B4", "10", "1", "sixty", "M", "II", ""],  # non-numeric age: kept, age NULL
        ["B5", "inf", "1", "140", "X", "II", ""],  # three problems in one row, the time fatal
        ["B6", "10", "1", "60", "Jane Doe", "G3", ""],  # shifted columns: a name as sex, an id as stage
    ]
    path = tmp_path / "in" / "bad.csv"
    _write_csv(path, [dict(zip(cols, r)) for r in good[:2] + bad + good[2:]], cols)
    s = load_outcomes(wh, path)
    assert s.rows_read == 13 and s.inserted == 8 and s.rejected == 5 and s.fields_rejected == 4
    assert s.rejects_by_reason == {
        "age not numeric": 1, "age out of range [0, 130]": 1, "patient_id duplicated in file": 1,
        "event not 0/1": 1, "patient_id missing": 1, "sex not M/F/O/U": 2, "stage not I-IV": 2,
        "time_months negative": 1, "time_months not a finite number": 1,
    }
    stored = {k: r for k, *r in _rows(db, "SELECT patient_key, time_months, event, age, sex, stage "
                                        "FROM clinical_outcomes")}
    assert stored[patient_key("G1")] == [10.0, 1, 60.0, "M", "II"]  # first occurrence kept
    assert stored[patient_key("G2")] == [0.0, 1, None, "F", "III"]
    assert stored[patient_key("G3")] == [5.5, 0, 70.5, None, "IV"]
    assert stored[patient_key("G4")] == [7.0, 0, 45.0, "U", "III"]
    assert stored[patient_key("G5")][4] is None
    # time and event valid: kept, the bad field NULL, the others as given
    assert stored[patient_key("B3")] == [10.0, 1, 60.0, "M", None]
    assert stored[patient_key("B4")] == [10.0, 1, None, "M", "II"]
    assert stored[patient_key("B6")] == [10.0, 1, 60.0, None, None]
    for pid in ("B1", "B2", "B5"):
        assert patient_key(pid) not in stored

    rejects = _rows(db, "SELECT row_number, field, problem, row_kept, reason FROM outcome_rejects "
                        "ORDER BY row_number, field")
    by_row: dict[int, list[tuple]] = {}
    for row_number, *rest in rejects:
        by_row.setdefault(row_number, []).append(tuple(rest))
    assert sorted(by_row) == [3, 4, 5, 6, 7, 8, 9, 10]
    assert by_row[3] == [("time_months", "time_months negative", False, "time_months negative: a number, value "
                                                                        "not shown")]
    assert [r[:3] for r in by_row[4]] == [("event", "event not 0/1", False)]
    assert [r[:3] for r in by_row[5]] == [("stage", "stage not I-IV", True)]
    assert [r[:3] for r in by_row[6]] == [("patient_id", "patient_id missing", False)]
    assert [r[:3] for r in by_row[7]] == [("patient_id", "patient_id duplicated in file", False)]
    assert "data row 1" in by_row[7][0][3]
    assert [r[:3] for r in by_row[8]] == [("age", "age not numeric", True)]
    # one row, three problems: the fatal time drops the row, so none of them is "kept"
    assert [r[:3] for r in by_row[9]] == [("age", "age out of range [0, 130]", False),
                                          ("sex", "sex not M/F/O/U", False),
                                          ("time_months", "time_months not a finite number", False)]
    assert [r[:3] for r in by_row[10]] == [("sex", "sex not M/F/O/U", True), ("stage", "stage not I-IV", True)]
    reasons = [r[-1] for r in rejects]
    assert all("not shown" in r for r in reasons if r.split(":")[0] not in (
        "patient_id missing", "patient_id duplicated in file"))
    # no value is ever quoted: neither the other patient's id nor the name nor any other bad value
    for needle in ("G3", "Jane", "Doe", "'V'", "sixty", "140", "inf", "-1", "'X'", "'2'"):
        assert not any(needle in r for r in reasons), needle
    for text in _all_text(db):
        for pid in ("G1", "G2", "G3", "B1", "B2", "B3", "B4", "B5", "B6", "Jane Doe"):
            assert pid not in text or text.startswith(str(tmp_path))

    # reload after fixing the file: rejects of that file are replaced, not accumulated
    _write_csv(path, [dict(zip(cols, r)) for r in good], cols)
    s2 = load_outcomes(wh, path)
    assert s2.rejected == 0 and s2.unchanged == 5
    assert _rows(db, "SELECT count(*) FROM outcome_rejects") == [(0,)]


def test_unparseable_files_leave_stored_data_intact(cohort, tmp_path):
    wh = Warehouse(tmp_path / "wh")
    db = wh.duckdb_path
    folder = tmp_path / "drop"
    good = _write_csv(folder / "outcomes.csv", _read_csv(cohort.outcomes_csv))
    load_outcomes(wh, folder)
    snapshot = _rows(db, "SELECT * FROM clinical_outcomes ORDER BY patient_key")
    assert len(snapshot) == 20

    good.write_bytes(bytes(range(256)) * 40)  # binary garbage under the same name
    pq.write_table(pa.table({"foo": [1, 2], "bar": ["a", "b"]}), folder / "wrong.parquet")
    s = load_outcomes(wh, folder)
    assert s.files == 2 and s.files_failed == 2 and s.rejected == 2
    assert s.rejects_by_reason == {"file unreadable": 2}
    rejects = _rows(db, "SELECT source_file, row_number, reason FROM outcome_rejects ORDER BY source_file")
    assert len(rejects) == 2 and all(r[1] is None for r in rejects)
    assert "outcomes.csv" in rejects[0][2] and "wrong.parquet" in rejects[1][2]
    assert "required column(s) missing" in rejects[1][2]
    assert _rows(db, "SELECT * FROM clinical_outcomes ORDER BY patient_key") == snapshot
    statuses = dict(_rows(db, "SELECT source_file, status FROM outcome_files"))
    assert set(statuses.values()) == {"failed"}

    # the same broken files again: skipped, no duplicate rejects
    s2 = load_outcomes(wh, folder)
    assert s2.files_skipped == 2 and s2.rejected == 0
    assert _rows(db, "SELECT count(*) FROM outcome_rejects") == [(2,)]

    # empty file and a TSV with only a header
    (folder / "empty.csv").write_bytes(b"")
    (folder / "header.tsv").write_text("patient_id\ttime_months\tevent\n", encoding="utf-8")
    s3 = load_outcomes(wh, folder)
    assert s3.files_failed == 1 and s3.files_loaded == 1 and s3.inserted == 0


def test_parquet_and_csv_give_the_same_rows(cohort, tmp_path):
    wh = Warehouse(tmp_path / "wh")
    db = wh.duckdb_path
    raw = _read_csv(cohort.outcomes_csv)
    table = pa.table({
        "patient_id": [r["patient_id"] for r in raw],
        "time": pa.array([float(r["time_months"]) for r in raw], pa.float64()),
        "event": pa.array([bool(int(r["event"])) for r in raw]),
        "age": pa.array([int(r["age"]) for r in raw], pa.int64()),
        "sex": [r["sex"] for r in raw],
        "stage": [r["stage"] for r in raw],
    })
    pq.write_table(table, tmp_path / "outcomes.parquet")
    s = load_outcomes(wh, [cohort.outcomes_csv, tmp_path / "outcomes.parquet"])
    assert s.files_loaded == 2 and s.inserted == 40 and s.rejected == 0
    per_file = _rows(db, "SELECT source_file, patient_key, time_months, event, age, sex, stage "
                         "FROM clinical_outcomes ORDER BY patient_key, source_file")
    csv_rows = {r[1]: r[2:] for r in per_file if r[0].endswith(".csv")}
    pq_rows = {r[1]: r[2:] for r in per_file if r[0].endswith(".parquet")}
    assert csv_rows == pq_rows and len(csv_rows) == 20
    assert len(read_patient_outcomes(wh)) == 20  # one row per patient across files


def test_missing_source_is_reported_not_raised_and_empties_the_table(tmp_path):
    """No outcome source: an empty outcome table and a reason, not a FileNotFoundError; a root typo or an
    empty folder is reported the same way (never a silent "0 files")."""
    wh = Warehouse(tmp_path / "wh")
    s = load_outcomes(wh, tmp_path / "nowhere")
    assert not s.source_present and s.files == 0
    assert s.sources_missing == [str(tmp_path / "nowhere")] and "do not exist" in s.source_problem
    assert read_patient_outcomes(wh) == []

    good = _write_csv(tmp_path / "drop" / "a.csv", [{"patient_id": "P1", "time_months": "3", "event": "1"}])
    assert load_outcomes(wh, good.parent).source_present
    assert len(read_patient_outcomes(wh)) == 1
    typo = load_outcomes(wh, tmp_path / "dorp")  # the configured root mistyped
    assert not typo.source_present and "dorp" in typo.source_problem
    assert typo.files_gone == 1 and typo.rows_removed == 1 and read_patient_outcomes(wh) == []

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an outcome file")
    empty = load_outcomes(wh, tmp_path / "empty")
    assert not empty.source_present and "no outcome file" in empty.source_problem
    none = load_outcomes(wh, None)
    assert not none.source_present and "no outcome source configured" in none.source_problem
    some = load_outcomes(wh, [good, tmp_path / "gone.csv"])  # one of two paths missing: still reported
    assert not some.source_present and some.sources_missing == [str(tmp_path / "gone.csv")]
    assert some.inserted == 1 and len(read_patient_outcomes(wh)) == 1


@pytest.mark.parametrize("value, expect", [
    ("I", "I"), ("iv", "IV"), ("Stage II", "II"), ("stage 3", "III"), ("IIIA", "III"), (2, "II"),
    (4.0, "IV"), ("1", "I"), ("V", None), ("0", None), ("5", None), ("II/III", None),
])
def test_parse_stage(value, expect):
    assert parse_stage(value) == expect


@pytest.mark.parametrize("value, expect", [
    (0, 0), (1, 1), ("0", 0), ("1", 1), ("1.0", 1), ("TRUE", 1), ("false", 0), (True, 1), ("2", None),
    ("maybe", None), (0.5, None),
])
def test_parse_event(value, expect):
    assert parse_event(value) == expect


def test_validate_row_reports_every_problem():
    values, problems = validate_row({"patient_id": "  ", "time_months": "nan", "event": "x", "age": "-1",
                                     "sex": "Z", "stage": "VI"})
    assert [(p.code, p.fatal) for p in problems] == [
        ("patient_id missing", True), ("event not 0/1", True), ("time_months missing", True),
        ("age out of range [0, 130]", False), ("sex not M/F/O/U", False), ("stage not I-IV", False)]
    assert all(p.field == p.code.split()[0] for p in problems)
    assert values["age"] is None and values["sex"] is None and values["stage"] is None
    ok, none = validate_row({"patient_id": 17.0, "time_months": 0, "event": 1})
    assert none == [] and ok["patient_id"] == "17" and ok["age"] is None and ok["stage"] is None
    assert ok["time_from"] == "time_months"


# ------------------------------------------------------------------------------- dates as hospitals export
def test_follow_up_months_and_event_from_dates(tmp_path):
    """Exports with dates instead of time_months: months = days / 30.4375, the event date wins over the
    last follow-up date (event = 1), an empty death date means censored at the last follow-up; a bad date
    is a per-field reject naming the field and the kind of problem, never silently ignored."""
    wh = Warehouse(tmp_path / "wh")
    db = wh.duckdb_path
    cols = ["MRN", "Date of Diagnosis", "Date Last Contact", "Date of Death", "age"]
    rows = [
        ["D1", "2020-01-15", "2021-01-15", "", "60"],  # censored: 366 days
        ["D2", "2020-01-15", "", "2020-07-15", "61"],  # died: 182 days
        ["D3", "2020-01-15", "2022-01-15", "2021-01-14", "62"],  # both: the death date wins
        ["D4", "15.01.2020", "20210301", "", "63"],  # European and compact formats
        ["D5", "2020-01-15", "2019-12-31", "", "64"],  # follow-up before diagnosis: no time, row dropped
        ["D6", "2020-01-15", "2021-02-30", "2020-10-01", "65"],  # bad follow-up date, death date valid: kept
        ["D7", "2020-01-15", "2021-01-15", "sometime", "66"],  # death date unusable: event unknown, dropped
        ["D8", "01/15/2020", "03/04/2021", "", "67"],  # slash dates; the column shows month-first (01/15)
        ["D9", "not known", "2021-01-15", "", "68"],  # no start: no time
        ["D10", "2020-01-15", "2999-01-01", "", "69"],  # a follow-up date in the future
    ]
    path = _write_csv(tmp_path / "export" / "registry.csv", [dict(zip(cols, r)) for r in rows], cols)
    s = load_outcomes(wh, path)
    assert s.rows_read == 10 and s.inserted == 6 and s.rejected == 4 and s.fields_rejected == 1
    stored = {k: r for k, *r in _rows(db, "SELECT patient_key, time_months, event, time_from "
                                        "FROM clinical_outcomes")}
    from datetime import date
    def months(a, b):
        return (b - a).days / 30.4375

    assert stored[patient_key("D1")] == [pytest.approx(months(date(2020, 1, 15), date(2021, 1, 15))), 0, "dates"]
    assert stored[patient_key("D2")] == [pytest.approx(182 / 30.4375), 1, "dates"]
    assert stored[patient_key("D3")] == [pytest.approx(months(date(2020, 1, 15), date(2021, 1, 14))), 1, "dates"]
    assert stored[patient_key("D4")] == [pytest.approx(months(date(2020, 1, 15), date(2021, 3, 1))), 0, "dates"]
    assert stored[patient_key("D6")] == [pytest.approx(months(date(2020, 1, 15), date(2020, 10, 1))), 1, "dates"]
    assert stored[patient_key("D8")] == [pytest.approx(months(date(2020, 1, 15), date(2021, 3, 4))), 0, "dates"]
    for pid in ("D5", "D7", "D9", "D10"):
        assert patient_key(pid) not in stored

    rejects = _rows(db, "SELECT row_number, field, problem, row_kept, reason FROM outcome_rejects "
                        "ORDER BY row_number, field")
    got = {(r[0], r[1], r[2], r[3]) for r in rejects}
    assert (5, "last_followup_date", "last_followup_date before start_date", False) in got
    assert (5, "time_months", "time_months missing", False) in got
    assert (6, "last_followup_date", "last_followup_date not a date", True) in got
    assert (7, "event_date", "event_date not a date", False) in got
    assert (9, "start_date", "start_date not a date", False) in got
    assert (10, "last_followup_date", "last_followup_date in the future", False) in got
    assert {r[0] for r in rejects} == {5, 6, 7, 9, 10}
    reasons = " ".join(r[4] for r in rejects)
    assert "'Date Last Contact'" in reasons  # the file's own column name is given
    for needle in ("2019-12-31", "2021-02-30", "sometime", "not known", "2999"):
        assert needle not in reasons
    # the dates themselves are never stored (they identify); only the time and the event
    for text in _all_text(db):
        assert "2020-01-15" not in text and "2021" not in text.replace(str(tmp_path), "")


def test_dates_combine_with_an_event_column_and_lose_to_time_months(tmp_path):
    wh = Warehouse(tmp_path / "wh")
    rows = [
        {"patient_id": "E1", "baseline_date": "2020-01-01", "last_followup": "2020-04-01", "vital_status": "dead",
         "time_months": ""},  # event 1 without an event date: the last follow-up (contact) date is the end
        {"patient_id": "E2", "baseline_date": "2020-01-01", "last_followup": "2020-04-01", "vital_status": "alive",
         "time_months": "7.5"},  # time_months given: it wins over the dates
        {"patient_id": "E3", "baseline_date": "2020-01-01", "last_followup": "2020-04-01", "vital_status": "0",
         "time_months": ""},
    ]
    s = load_outcomes(wh, _write_csv(tmp_path / "o.csv", rows))
    assert s.inserted == 3 and s.rejected == 0
    got = {r["patient_key"]: r for r in read_patient_outcomes(wh)}
    assert got[patient_key("E1")]["event"] == 1 and got[patient_key("E1")]["time_months"] == pytest.approx(91 / 30.4375)
    assert got[patient_key("E2")]["time_months"] == 7.5 and got[patient_key("E2")]["time_from"] == "time_months"
    assert got[patient_key("E3")]["event"] == 0 and got[patient_key("E3")]["time_from"] == "dates"

    # event 0 while a death date is given: time and event contradict, the row is dropped
    contradict = [{"patient_id": "C1", "diagnosis_date": "2020-01-01", "death_date": "2020-03-01", "event": "0"}]
    s2 = load_outcomes(wh, _write_csv(tmp_path / "c.csv", contradict))
    assert s2.rejected == 1 and s2.rejects_by_reason == {"event contradicts event_date": 1}
    # dates without any event information: the file is refused, nobody is silently "censored"
    no_event = [{"patient_id": "N1", "diagnosis_date": "2020-01-01", "last_followup": "2020-03-01"}]
    s3 = load_outcomes(wh, _write_csv(tmp_path / "n.csv", no_event))
    assert s3.files_failed == 1
    (reason,) = _rows(wh.duckdb_path, "SELECT reason FROM outcome_rejects WHERE source_file LIKE '%n.csv'")[0]
    assert "event (or event_date)" in reason


@pytest.mark.parametrize("value, order, expect", [
    ("2020-03-04", None, (2020, 3, 4)), ("2020/03/04", None, (2020, 3, 4)), ("20200304", None, (2020, 3, 4)),
    ("2020-03-04T10:22:00", None, (2020, 3, 4)), ("2020-03-04 10:22", None, (2020, 3, 4)),
    ("04.03.2020", None, (2020, 3, 4)), ("04MAR2020", None, (2020, 3, 4)), ("4 March 2020", None, (2020, 3, 4)),
    ("Mar 4, 2020", None, (2020, 3, 4)), ("13/03/2020", None, (2020, 3, 13)), ("03/13/2020", None, (2020, 3, 13)),
    ("04/03/2020", "dmy", (2020, 3, 4)), ("04/03/2020", "mdy", (2020, 4, 3)), ("03/03/2020", None, (2020, 3, 3)),
    (20200304, None, (2020, 3, 4)),
])
def test_parse_date_formats(value, order, expect):
    from datetime import date

    from imaging_assets.analysis.outcomes import parse_date

    assert parse_date(value, order) == (date(*expect), None)


@pytest.mark.parametrize("value, order, kind", [
    ("04/03/2020", None, "ambiguous day/month order"), ("04/03/2020", "mixed", "ambiguous day/month order"),
    ("2020-02-30", None, "not a date"), ("13/13/2020", None, "not a date"), ("04/03/20", None, "not a date"),
    ("yesterday", None, "not a date"), (3.5, None, "not a date"), ("2020-13-01", None, "not a date"),
])
def test_parse_date_refuses_what_it_cannot_know(value, order, kind):
    from imaging_assets.analysis.outcomes import parse_date, slash_date_order

    assert parse_date(value, order) == (None, kind)
    assert slash_date_order(["01/15/2020", "02/03/2020"]) == "mdy"
    assert slash_date_order(["15/01/2020", "02/03/2020"]) == "dmy"
    assert slash_date_order(["15/01/2020", "01/15/2020"]) == "mixed"
    assert slash_date_order(["02/03/2020", "2020-01-01"]) is None


def test_parquet_dates_are_dates(tmp_path):
    from datetime import date

    wh = Warehouse(tmp_path / "wh")
    table = pa.table({"patient_id": ["Q1", "Q2"],
                      "study_date": pa.array([date(2021, 1, 1), date(2021, 1, 1)], pa.date32()),
                      "death_date": pa.array([date(2021, 3, 2), None], pa.date32()),
                      "last_follow_up_date": pa.array([None, date(2022, 1, 1)], pa.date32())})
    pq.write_table(table, tmp_path / "dates.parquet")
    s = load_outcomes(wh, tmp_path / "dates.parquet")
    assert s.inserted == 2 and s.rejected == 0 and s.fields_rejected == 0
    got = {r["patient_key"]: (r["time_months"], r["event"]) for r in read_patient_outcomes(wh)}
    assert got[patient_key("Q1")] == (pytest.approx(60 / 30.4375), 1)
    assert got[patient_key("Q2")] == (pytest.approx(365 / 30.4375), 0)


# ------------------------------------------------------------------------------------ sources that go away
def test_rows_of_a_file_that_left_the_source_are_removed_with_history(tmp_path):
    wh = Warehouse(tmp_path / "wh")
    db = wh.duckdb_path
    folder = tmp_path / "drop"
    a = _write_csv(folder / "a.csv", [{"patient_id": "A1", "time_months": "3", "event": "1", "age": "50"},
                                      {"patient_id": "A2", "time_months": "4", "event": "0", "age": "51"},
                                      {"patient_id": "A3", "time_months": "-4", "event": "0", "age": "52"}])
    b = _write_csv(folder / "b.csv", [{"patient_id": "B1", "time_months": "5", "event": "1"}])
    load_outcomes(wh, folder)
    assert len(read_patient_outcomes(wh)) == 3
    state = outcomes_state(wh)

    a_bytes = a.read_bytes()
    a.unlink()
    s = load_outcomes(wh, folder)
    assert [r["patient_key"] for r in read_patient_outcomes(wh)] == [patient_key("B1")]
    assert s.files_gone == 1 and s.rows_removed == 2 and s.source_present
    assert _rows(db, "SELECT count(*) FROM clinical_outcomes WHERE source_file = ?", [str(a.resolve())]) == [(0,)]
    assert _rows(db, "SELECT count(*) FROM outcome_rejects WHERE source_file = ?", [str(a.resolve())]) == [(0,)]
    status, gone_at = _rows(db, "SELECT status, gone_at FROM outcome_files WHERE source_file = ?",
                            [str(a.resolve())])[0]
    assert status == "gone" and gone_at is not None
    assert outcomes_state(wh) != state  # the sensor sees it
    assert load_outcomes(wh, folder).files_gone == 0  # once

    a.write_bytes(a_bytes)  # the same file comes back: loaded again although its sha256 is known
    back = load_outcomes(wh, folder)
    assert back.inserted == 2 and len(read_patient_outcomes(wh)) == 3
    assert _rows(db, "SELECT status, gone_at FROM outcome_files WHERE source_file = ?",
                 [str(a.resolve())]) == [("loaded", None)]

    # the configured path changes: the old folder's rows leave
    other = _write_csv(tmp_path / "new" / "c.csv", [{"patient_id": "C1", "time_months": "6", "event": "0"}])
    moved = load_outcomes(wh, other.parent)
    assert moved.files_gone == 2 and moved.rows_removed == 3
    assert [r["patient_key"] for r in read_patient_outcomes(wh)] == [patient_key("C1")]
    assert dict(_rows(db, "SELECT source_file, status FROM outcome_files")) == {
        str(a.resolve()): "gone", str(b.resolve()): "gone", str(other.resolve()): "loaded"}
