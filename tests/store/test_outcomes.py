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


def test_bad_rows_rejected_with_reasons_good_rows_loaded(tmp_path):
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
        ["B3", "10", "1", "60", "M", "V", ""],  # stage V
        ["", "10", "1", "60", "M", "II", ""],  # missing id
        ["G1", "11", "1", "60", "M", "II", ""],  # duplicate of G1 (later row rejected)
        ["B4", "10", "1", "sixty", "M", "II", ""],  # non-numeric age
        ["B5", "inf", "1", "140", "X", "II", ""],  # three problems in one row
        ["B6", "10", "1", "60", "M", "G3", ""],  # shifted column: another patient's id as stage
    ]
    path = tmp_path / "in" / "bad.csv"
    _write_csv(path, [dict(zip(cols, r)) for r in good[:2] + bad + good[2:]], cols)
    s = load_outcomes(wh, path)
    assert s.rows_read == 13 and s.inserted == 5 and s.rejected == 8
    assert s.rejects_by_reason == {
        "age not numeric": 1, "age out of range [0, 130]": 1, "duplicate patient id in file": 1,
        "event not 0/1": 1, "patient_id missing": 1, "sex not M/F/O/U": 1, "stage not I-IV": 2,
        "time_months negative": 1, "time_months not a finite number": 1,
    }
    stored = {k: r for k, *r in _rows(db, "SELECT patient_key, time_months, event, age, sex, stage "
                                        "FROM clinical_outcomes")}
    assert stored[patient_key("G1")] == [10.0, 1, 60.0, "M", "II"]  # first occurrence kept
    assert stored[patient_key("G2")] == [0.0, 1, None, "F", "III"]
    assert stored[patient_key("G3")] == [5.5, 0, 70.5, None, "IV"]
    assert stored[patient_key("G4")] == [7.0, 0, 45.0, "U", "III"]
    assert stored[patient_key("G5")][4] is None

    rejects = _rows(db, "SELECT row_number, reason FROM outcome_rejects ORDER BY row_number")
    by_row = dict(rejects)
    assert sorted(by_row) == [3, 4, 5, 6, 7, 8, 9, 10]
    assert "time_months negative" in by_row[3] and "event not 0/1" in by_row[4]
    assert "stage not I-IV" in by_row[5] and "patient_id missing" in by_row[6]
    assert "duplicate" in by_row[7] and "data row 1" in by_row[7]
    assert "age not numeric" in by_row[8]
    assert by_row[9].count(";") == 2
    assert "G3" not in by_row[10] and "not shown" in by_row[10]
    assert "'V'" in by_row[5]  # other bad values are quoted
    for text in _all_text(db):
        for pid in ("G1", "G2", "G3", "B1", "B2", "B3", "B4", "B5", "B6"):
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


def test_missing_source_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_outcomes(Warehouse(tmp_path / "wh"), tmp_path / "nowhere")


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
    codes = [c for c, _ in problems]
    assert codes == ["patient_id missing", "time_months missing", "event not 0/1",
                     "age out of range [0, 130]", "sex not M/F/O/U", "stage not I-IV"]
    ok, none = validate_row({"patient_id": 17.0, "time_months": 0, "event": 1})
    assert none == [] and ok["patient_id"] == "17" and ok["age"] is None and ok["stage"] is None
