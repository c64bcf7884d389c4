"""PHI and governance.

PHI: after the whole chain (plus a search, a cohort and SQL queries, so the audit and cohort tables exist), no
column of any DuckDB table or view, and no column of any version of any Lance table, holds a PatientName (or
one of its ^-parts of >= 4 characters), PatientBirthDate (as stored or as ISO date) or raw PatientID of the
source files, nor a raw patient id of the outcomes CSV. The scanner is proven on planted leaks.

Governance: every similar-case search, cohort and SQL query leaves exactly one ``audit_log`` row (time, user
from ``IMAGING_ASSETS_USER``, query text and parameters, table versions, status); the SQL command refuses
writes, ATTACH, COPY ... TO, INSTALL/LOAD and reading files (API and CLI: exit code 3 refused, 1 DuckDB error).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import pytest
import reliability_helpers as rh

from imaging_assets.errors import QueryRefused
from imaging_assets.stages.cohorts import discover_cohort
from imaging_assets.stages.similar import find_similar
from imaging_assets.store.lance import table_version
from imaging_assets.store.sql import run_sql

pytestmark = pytest.mark.slow

USER = "governance-tester"


def _q(db: Path, sql: str, params=()) -> list[tuple]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql, list(params)).fetchall()
    finally:
        con.close()


def _audit(db: Path) -> list[dict]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        if not con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'audit_log'").fetchone()[0]:
            return []
        cur = con.execute("SELECT * FROM audit_log ORDER BY logged_at, id")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]
    finally:
        con.close()


def _new_rows(db: Path, before: list[dict]) -> list[dict]:
    seen = {r["id"] for r in before}
    return [r for r in _audit(db) if r["id"] not in seen]


def _utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _is_recent(stamp: datetime, start: datetime, end: datetime) -> bool:
    """``stamp`` lies in [start, end] (UTC), or in the same window in local time: whether audit times are UTC
    is the separate test_audit_time_is_utc_whatever_the_local_time_zone."""
    offset = datetime.now() - _utcnow()
    return start <= stamp <= end or start + offset <= stamp <= end + offset


def _lesion(db: Path) -> str:
    return _q(db, "SELECT lesion_id FROM lesions WHERE extractable ORDER BY lesion_id LIMIT 1")[0][0]


# ------------------------------------------------------------------------------------------------- PHI


@pytest.fixture()
def needles(clean_chain):
    cohort = clean_chain["cohort"]
    found = rh.phi_needles([cohort.dicom_dir], [cohort.outcomes_csv])
    assert len(found) >= cohort.n_patients * 5  # name, its parts, id, birth date two ways
    return found


def test_no_phi_in_any_duckdb_or_lance_table(chain_copy, needles, monkeypatch):
    db, lance, wh = chain_copy["db"], chain_copy["lance"], chain_copy["warehouse"]
    monkeypatch.setenv("IMAGING_ASSETS_USER", USER)
    lid = _lesion(db)
    find_similar(lid, k=3, warehouse=wh)
    discover_cohort(wh, "phi_probe", reference_lesion_id=lid, k=4)
    run_sql(wh, "SELECT * FROM lesions JOIN lesion_vectors USING (lesion_id)")
    tables = {t for (t,) in _q(db, "SELECT table_name FROM information_schema.tables")}
    assert {"dicom_files", "lesions", "radiomics_features", "clinical_outcomes", "audit_log", "cohorts",
            "cohort_phi_probe", "phenotype_clusters"} <= tables
    assert rh.lance_table_names(lance) == ["lesion_embeddings", "lesion_vectors"]
    assert rh.scan_warehouse(chain_copy["wh"], needles) == []
    assert rh.scan_files(chain_copy["wh"], needles) == []  # nor in the raw bytes of any warehouse file


def test_the_scanner_finds_planted_leaks_in_duckdb_and_lance(chain_copy, needles):
    import lancedb
    import pyarrow as pa

    db, lance = chain_copy["db"], chain_copy["lance"]
    cohort = chain_copy["cohort"]
    import pydicom

    first = next(p for p in sorted(cohort.dicom_dir.rglob("*.dcm")) if p.stat().st_size > 1000)
    ds = pydicom.dcmread(first, stop_before_pixels=True)
    name, pid, dob = str(ds.PatientName), str(ds.PatientID), str(ds.PatientBirthDate)
    part = max(name.split("^"), key=len)
    iso = f"{dob[:4]}-{dob[4:6]}-{dob[6:]}"
    assert {name, pid, dob, iso, part} <= needles
    lid = _lesion(db)
    with duckdb.connect(str(db)) as con:  # a text column, a list column, a table in another schema
        con.execute("UPDATE lesions SET reason = ? WHERE lesion_id = ?", [f"seen {part.lower()} today", lid])
        con.execute("UPDATE imaging_series SET flags = list_append(flags, ?) WHERE rowid = 0", [pid])
        con.execute("CREATE SCHEMA side")
        con.execute("CREATE TABLE side.notes AS SELECT CAST(? AS DATE) AS d", [iso])
    ldb = lancedb.connect(lance)
    ldb.create_table("notes", pa.table({"who": [f"note on {name}"]}))
    tbl = ldb.open_table("lesion_vectors")
    original = tbl.search().where(f"lesion_id = '{lid}'").limit(1).to_arrow()["body_part"][0].as_py()
    tbl.update(where=f"lesion_id = '{lid}'", values={"body_part": dob})  # leaked in one version ...
    leaked_version = tbl.version
    tbl.update(where=f"lesion_id = '{lid}'", values={"body_part": original})  # ... then "fixed"
    hits = rh.scan_warehouse(chain_copy["wh"], needles)
    where = {(h[0], h[1]) for h in hits}
    assert ("lesions", "reason") in where
    assert ("imaging_series", "flags") in where
    assert ("side.notes", "d") in where
    assert any(w.startswith("lance:notes@v") and c == "who" for w, c in where)
    assert (f"lance:lesion_vectors@v{leaked_version}", "body_part") in where
    assert not [h for h in hits if h[0].startswith("lance:lesion_vectors") and h[0] != f"lance:lesion_vectors@v{leaked_version}"]
    assert {h[2] for h in hits} <= {part, pid, iso, name, dob} | {n for n in needles if n.lower() in name.lower()}
    raw = rh.scan_files(chain_copy["wh"], needles)  # the raw-bytes layer sees the uncompressed Lance leaks
    assert any("notes.lance" in f for f, _ in raw) and any("lesion_vectors.lance" in f for f, _ in raw)


# ------------------------------------------------------------------------------------------ governance


def test_every_search_cohort_and_sql_query_leaves_exactly_one_audit_row(chain_copy, monkeypatch):
    db, lance, wh = chain_copy["db"], chain_copy["lance"], chain_copy["warehouse"]
    monkeypatch.setenv("IMAGING_ASSETS_USER", USER)
    lid = _lesion(db)
    version = table_version(lance)
    fs_version = _q(db, "SELECT version FROM robust_feature_set_history ORDER BY activated_at DESC LIMIT 1")[0][0]
    t0 = _utcnow() - timedelta(seconds=2)

    before = _audit(db)
    rows = find_similar(lid, k=3, where={"modality": ["CT"]}, warehouse=wh)
    (row,) = _new_rows(db, before)
    params = json.loads(row["params"])
    assert (row["action"], row["user"], row["query"], row["status"], row["n_rows"]) == (
        "search", USER, "find_similar", "ok", len(rows))
    assert params["lesion_id"] == lid and params["k"] == 3 and params["filters"] == {"modality": ["CT"]}
    assert json.loads(row["table_versions"]) == {"lesion_vectors": version, "robust_feature_set": fs_version}

    before = _audit(db)
    out = discover_cohort(wh, "audited", reference_lesion_id=lid, k=4)
    (row,) = _new_rows(db, before)
    assert (row["action"], row["user"], row["status"], row["n_rows"]) == ("cohort", USER, "ok", out.rows)
    assert json.loads(row["params"])["name"] == "audited"
    assert json.loads(row["table_versions"]) == {"lesion_vectors": version, "robust_feature_set": fs_version}
    assert _q(db, "SELECT audit_id, \"user\" FROM cohorts WHERE name = 'audited'") == [(row["id"], USER)]

    before = _audit(db)
    sql = "SELECT roi_name, count(*) AS n FROM lesion_vectors GROUP BY 1 ORDER BY 1"
    df = run_sql(wh, sql)
    (row,) = _new_rows(db, before)
    assert (row["action"], row["user"], row["query"], row["status"], row["n_rows"]) == ("sql", USER, sql, "ok", len(df))
    # SQL pins every Lance table it registers as a view (the vectors and the embeddings)
    assert json.loads(row["table_versions"]) == {"lesion_vectors": version,
                                                 "lesion_embeddings": table_version(lance, "lesion_embeddings")}

    before = _audit(db)  # a failing search is audited too, once
    with pytest.raises(KeyError):
        find_similar("no-such-lesion", k=3, warehouse=wh)
    (row,) = _new_rows(db, before)
    assert row["action"] == "search" and row["status"].startswith("error")

    stamps = [r["logged_at"] for r in _audit(db)[-4:]]
    assert all(_is_recent(s, t0, _utcnow() + timedelta(seconds=2)) for s in stamps), stamps


def test_a_search_by_vector_records_what_was_asked(chain_copy, monkeypatch):
    db, lance, wh = chain_copy["db"], chain_copy["lance"], chain_copy["warehouse"]
    monkeypatch.setenv("IMAGING_ASSETS_USER", USER)
    dim = rh.lance_rows(lance, "lesion_vectors")[0]["vector"].__len__()
    before = _audit(db)
    find_similar(vector=np.full(dim, 0.25, np.float32), k=3, warehouse=wh)
    (row,) = _new_rows(db, before)
    params = json.loads(row["params"])
    assert any(v not in (None, {}, 3) for k, v in params.items() if k not in ("k", "filters", "version")), params


REFUSED = [
    "DELETE FROM lesions",
    "UPDATE lesions SET roi_name = 'x'",
    "INSERT INTO audit_log (id) VALUES ('forged')",
    "DROP TABLE lesions",
    "CREATE TABLE x AS SELECT 1",
    "CREATE TEMP TABLE t AS SELECT 1",
    "ATTACH '{tmp}/other.duckdb' AS other",
    "DETACH warehouse",
    "COPY lesions TO '{tmp}/leak.csv'",
    "COPY (SELECT * FROM lesions) TO '{tmp}/leak.parquet' (FORMAT parquet)",
    "EXPORT DATABASE '{tmp}/export'",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET enable_external_access = true",
    "SET lock_configuration = false",
    "PRAGMA enable_profiling",
    "CALL pragma_version()",
    "CHECKPOINT",
    "VACUUM",
    "SELECT 1; DROP TABLE lesions",
    "SELECT 1; ATTACH '{tmp}/other.duckdb'",
    # issue 18: DuckDB's parser judges what EXPLAIN ANALYZE wraps and every CTE; query() SQL text is refused
    "EXPLAIN ANALYZE COPY (SELECT * FROM lesions) TO '{tmp}/leak.csv'",
    "EXPLAIN ANALYZE DELETE FROM lesions",
    "SELECT * FROM query('COPY lesions TO ''{tmp}/leak.csv''')",
    "WITH d AS (DELETE FROM lesions RETURNING *) SELECT count(*) FROM d",
    "UPDATE EXTENSIONS",
]
DB_ERRORS = [  # parsed as reads, stopped by the read-only, no-external-access connection
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_text('/etc/hostname')",
    "SELECT * FROM read_parquet('{tmp}/*.parquet')",
    "SELECT * FROM glob('/etc/*')",
    "SELECT * FROM read_csv('{wh}/anything.csv')",
    "SELECT * FROM duckdb_secrets()",
]


@pytest.mark.parametrize("template", REFUSED + DB_ERRORS)
def test_sql_refuses_writes_and_file_access(chain_copy, template, tmp_path, monkeypatch):
    db, wh = chain_copy["db"], chain_copy["warehouse"]
    monkeypatch.setenv("IMAGING_ASSETS_USER", USER)
    outside = tmp_path / "outside"
    outside.mkdir()
    sql = template.format(tmp=outside, wh=chain_copy["wh"])
    n_lesions = _q(db, "SELECT count(*) FROM lesions")[0][0]
    before = _audit(db)
    expected = QueryRefused if template in REFUSED else duckdb.Error
    with pytest.raises(expected):
        run_sql(wh, sql)
    (row,) = _new_rows(db, before)
    assert row["action"] == "sql" and row["query"] == sql and row["user"] == USER
    assert row["status"].startswith("refused" if template in REFUSED else "error")
    assert _q(db, "SELECT count(*) FROM lesions")[0][0] == n_lesions
    assert list(outside.iterdir()) == []  # nothing written, attached or exported


def _cli(args, env, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imaging_assets.cli", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=180, cwd=cwd)


def test_cli_sql_and_similar_exit_codes_and_audit(chain_copy, tmp_path, driver_env):
    """Eight CLI calls at once (so audit writes contend for the DuckDB lock), one user each."""
    wh, db = chain_copy["wh"], chain_copy["db"]
    lid = _lesion(db)
    outside = tmp_path / "outside"
    outside.mkdir()
    cases = [
        (["sql", "SELECT count(*) AS n FROM lesion_vectors", "--json"], 0, "ok"),
        (["sql", "DELETE FROM lesions"], 3, "refused"),
        (["sql", f"ATTACH '{outside}/x.duckdb' AS x"], 3, "refused"),
        (["sql", f"COPY lesions TO '{outside}/leak.csv'"], 3, "refused"),
        (["sql", "INSTALL httpfs"], 3, "refused"),
        (["sql", "LOAD httpfs"], 3, "refused"),
        (["sql", "SELECT * FROM read_csv('/etc/passwd')"], 1, "error"),
        (["similar", lid, "-k", 3, "--json"], 0, "ok"),
    ]
    t0 = _utcnow() - timedelta(seconds=2)
    procs = []
    for i, (args, _, _) in enumerate(cases):
        env = {**driver_env, "IMAGING_ASSETS_USER": f"cli-{i}"}
        procs.append(subprocess.Popen([sys.executable, "-m", "imaging_assets.cli", *map(str, args), "--warehouse",
                                       str(wh)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=240) for p in procs]
    t1 = _utcnow() + timedelta(seconds=2)
    audit = _audit(db)
    for i, ((args, code, status), p, (out, err)) in enumerate(zip(cases, procs, results)):
        assert p.returncode == code, (args, p.returncode, err[-1500:])
        rows = [r for r in audit if r["user"] == f"cli-{i}"]
        assert len(rows) == 1, (args, rows)
        assert rows[0]["status"].startswith(status), (args, rows[0]["status"])
        assert rows[0]["action"] == ("search" if args[0] == "similar" else "sql")
        if args[0] == "sql":
            assert rows[0]["query"] == args[1]
        else:
            assert json.loads(rows[0]["params"])["lesion_id"] == lid and len(json.loads(out)) == 3
        assert _is_recent(rows[0]["logged_at"], t0, t1)
        if code == 3:
            assert err.startswith("refused:")
    assert json.loads(results[0][0]) == [{"n": _q(db, "SELECT count(*) FROM lesions WHERE extractable")[0][0]}]
    assert list(outside.iterdir()) == []


def test_audit_time_is_utc_whatever_the_local_time_zone(chain_copy, driver_env):
    if not Path("/usr/share/zoneinfo/America/New_York").exists():
        pytest.skip("no tz database")
    t0 = _utcnow() - timedelta(seconds=2)
    env = {**driver_env, "IMAGING_ASSETS_USER": "tz-user", "TZ": "America/New_York"}
    res = _cli(["sql", "SELECT 1 AS one", "--warehouse", chain_copy["wh"], "--json"], env)
    assert res.returncode == 0, res.stderr
    t1 = _utcnow() + timedelta(seconds=2)
    (stamp,) = [r["logged_at"] for r in _audit(chain_copy["db"]) if r["user"] == "tz-user"]
    assert t0 <= stamp <= t1, (t0, stamp, t1)


# --------------------------------------------------------- issue 18, findings 4 and 5: no PHI echoed anywhere

#: PHI-shaped values (a name and its parts, an MRN, a birth date two ways, an accession number, an institution)
PHI = ["WASHINGTON^GEORGINA", "WASHINGTON", "GEORGINA", "MRN2604192", "19470312", "1947-03-12", "ACC99120034",
       "SAINT MARYBOROUGH", "MARYBOROUGH"]


def _phi_archive(root: Path) -> dict[str, str]:
    """Two good CT slices (PHI only in the patient tags, which are never stored) and one file per UID / coded
    tag carrying PHI; returns file name -> the tag that carries it."""
    import pydicom
    from pydicom.data import get_testdata_file

    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    root.mkdir(parents=True)

    def write(name: str, i: int, **tags) -> None:
        with warnings.catch_warnings():  # pydicom warns about the invalid values on purpose here
            warnings.simplefilter("ignore")
            _write(name, i, **tags)

    def _write(name: str, i: int, **tags) -> None:
        ds = src.copy()
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = "WASHINGTON^GEORGINA", "MRN2604192", "19470312"
        ds.AccessionNumber, ds.InstitutionName = "ACC99120034", "SAINT MARYBOROUGH"
        ds.SeriesInstanceUID, ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.7", "1.2.826.0.1.3680043.8.498.6"
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.7.{i}"
        ds.ImagePositionPatient = [0.0, 0.0, float(i) * 5.0]
        for k, v in tags.items():
            setattr(ds, k, v)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(root / name, enforce_file_format=True)

    write("good_1.dcm", 1)
    write("good_2.dcm", 2)
    crafted = {
        "uid_series.dcm": ("SeriesInstanceUID", "MRN2604192"),
        "uid_study.dcm": ("StudyInstanceUID", "1.2.840.ACC99120034"),
        "uid_sop_class.dcm": ("SOPClassUID", "1.2.MRN2604192"),
        "uid_leading_zero.dcm": ("FrameOfReferenceUID", "1.2.019470312"),
        "cs_modality.dcm": ("Modality", "WASHINGTON^GEORGINA"),
        "cs_body_part.dcm": ("BodyPartExamined", "Saint Maryborough"),
        "cs_photometric.dcm": ("PhotometricInterpretation", "GEORGINA-1947-03-12"),
    }
    for i, (name, (tag, value)) in enumerate(crafted.items(), start=3):
        write(name, i, **{tag: value})
    (root / "link.dcm").symlink_to("/nonexistent/WASHINGTON_GEORGINA_MRN2604192.dcm")  # a broken link
    return {name: tag for name, (tag, _) in crafted.items()}


def _phi_manifests(tmp: Path) -> tuple[Path, Path]:
    """A NIfTI pair whose manifest row carries PHI as patient id and modality; a header-less manifest."""
    import numpy as np
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.zeros((4, 8, 8), np.float32))
    mask_arr = np.zeros((4, 8, 8), np.uint8)
    mask_arr[1:3, 2:5, 2:5] = 1
    mask = sitk.GetImageFromArray(mask_arr)
    sitk.WriteImage(img, str(tmp / "vol_image.nii.gz"))
    sitk.WriteImage(mask, str(tmp / "vol_mask.nii.gz"))
    good = tmp / "manifest.csv"
    good.write_text("image_path,mask_path,patient_id,modality\nvol_image.nii.gz,vol_mask.nii.gz,MRN2604192,"
                    "WASHINGTON^GEORGINA\n")
    headerless = tmp / "headerless.csv"
    headerless.write_text("WASHINGTON^GEORGINA,MRN2604192,19470312\nACC99120034,x,y\n")
    return good, headerless


def _phi_outcomes(folder: Path) -> None:
    folder.mkdir()
    (folder / "outcomes.csv").write_text(
        "patient_id,time_months,event,age,sex,stage,diagnosis_date,last_followup\n"
        "P_OK1,12,1,60,M,II,,\n"
        "MRN2604192,WASHINGTON^GEORGINA,1,61,F,I,,\n"
        "P3,10,ACC99120034,62,M,III,,\n"
        "P4,10,0,19470312,GEORGINA,SAINT MARYBOROUGH,,\n"
        "P5,,1,,,,WASHINGTON,1947-03-12\n"
        "P6,11,0,1947-03-12,MARYBOROUGH,ACC99120034,19470312,GEORGINA\n"
        "MRN2604192,9,0,50,M,II,,\n")
    (folder / "garbage.csv").write_bytes(b"\xff\xfe\x00WASHINGTON^GEORGINA,MRN2604192\n\x81\x82")
    (folder / "headerless.csv").write_text("MRN2604192,WASHINGTON^GEORGINA,19470312\nP9,ACC99120034,1\n")


def test_phi_shaped_values_in_every_input_are_never_echoed_or_stored(tmp_path):
    """Outcome cells (every field), unreadable outcome files, manifest cells, a header-less manifest, UIDs and
    coded tags, a broken link's target: after the ingest and outcome assets ran in Dagster, no DuckDB table
    (reasons, messages, catalog values) and no file of the Dagster instance (run storage, event log) holds
    any of the values; the files with PHI in a UID or coded tag are quarantined naming the tag."""
    import dagster as dg

    from imaging_assets.defs.discovery import dicom_files, imaging_series, segmentations
    from imaging_assets.defs.outcomes import clinical_outcomes
    from imaging_assets.defs.resources import DicomSourcesResource, OutcomeSourcesResource, WarehouseResource

    crafted = _phi_archive(tmp_path / "archive")
    good_manifest, headerless_manifest = _phi_manifests(tmp_path)
    _phi_outcomes(tmp_path / "outcomes")
    wh = tmp_path / "wh"

    def resources(manifest: Path) -> dict:
        return {"warehouse": WarehouseResource(root=str(wh)),
                "dicom_sources": DicomSourcesResource(roots=[str(tmp_path / "archive")], manifests=[str(manifest)],
                                                      workers=1),
                "outcome_sources": OutcomeSourcesResource(path=str(tmp_path / "outcomes"))}

    home = tmp_path / "dagster_home"
    home.mkdir()
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        ok = dg.materialize([dicom_files, imaging_series, segmentations, clinical_outcomes], instance=instance,
                            resources=resources(good_manifest))
        assert ok.success
        failed = dg.materialize([segmentations], instance=instance, resources=resources(headerless_manifest),
                                raise_on_error=False)
        assert not failed.success  # the header-less manifest stops the asset, naming the file and the problem
        logs = [str(e.dagster_event or e.user_message) for r in (ok, failed) for e in instance.all_logs(r.run_id)]
    assert any("headerless.csv lacks column(s) image_path, mask_path" in text for text in logs)

    db = wh / "warehouse.duckdb"
    # the crafted files are quarantined naming the tag, never stored in the catalog
    quarantine = dict(_q(db, "SELECT regexp_extract(path, '[^/]+$'), reason || ': ' || message "
                             "FROM dicom_quarantine"))
    for name, tag in crafted.items():
        assert quarantine[name].startswith("invalid_value: "), (name, quarantine[name])
        words = {"SOPClassUID": "SOP Class UID", "SeriesInstanceUID": "Series Instance UID",
                 "StudyInstanceUID": "Study Instance UID", "FrameOfReferenceUID": "Frame of Reference UID",
                 "Modality": "Modality", "BodyPartExamined": "Body Part Examined",
                 "PhotometricInterpretation": "Photometric Interpretation"}
        assert words[tag] in quarantine[name] and "value not shown" in quarantine[name]
    assert quarantine["link.dcm"].startswith("unreadable: broken symlink")
    assert sorted(p for (p,) in _q(db, "SELECT regexp_extract(path, '[^/]+$') FROM dicom_files")) == [
        "good_1.dcm", "good_2.dcm"]
    # the manifest row's modality is refused (the row stays, unlinked, with the reason); outcome rejects
    # name the field and the kind of problem
    (reason,) = _q(db, "SELECT unlinked_reason FROM segmentations WHERE kind = 'nifti'")[0]
    assert "modality is not a valid DICOM code string" in reason
    rejects = {(f, p) for f, p in _q(db, "SELECT field, problem FROM outcome_rejects")}
    assert {("time_months", "time_months not a finite number"), ("event", "event not 0/1"),
            ("age", "age out of range [0, 130]"), ("sex", "sex not M/F/O/U"), ("stage", "stage not I-IV"),
            ("start_date", "start_date not a date"), ("patient_id", "patient_id duplicated in file"),
            ("file", "file unreadable")} <= rejects
    assert rh.scan_duckdb(db, PHI) == []  # no table, no column: reasons, messages, catalog values
    assert rh.scan_files(home, PHI) == []  # Dagster's run storage and event log (raw bytes of every file)


def test_rekey_moves_every_table_and_the_lance_vectors_to_the_new_key(chain_copy, monkeypatch):
    """Issue 18, finding 1/3: after ``rekey`` every patient key column of every DuckDB table (catalog, series,
    segmentations, lesions, outcomes, clusters, cohorts) and the current Lance version hold the new keys, the
    joins still hold, and a run with the old key is refused."""
    from imaging_assets.dicom.pseudonym import ENV_VAR, key_fingerprint
    from imaging_assets.errors import PseudonymKeyMismatch
    from imaging_assets.stages import discovery
    from imaging_assets.stages.keys import rekey
    from imaging_assets.store.keyring import stored_patient_keys

    db, lance, wh = chain_copy["db"], chain_copy["lance"], chain_copy["warehouse"]
    old = os.environ[ENV_VAR]
    discover_cohort(wh, "rekey_probe", reference_lesion_id=_lesion(db), k=4)
    with duckdb.connect(str(db), read_only=True) as con:
        before = stored_patient_keys(con)
        joins = con.execute("SELECT count(*) FROM lesions l JOIN patient_outcomes o USING (patient_key)").fetchall()
    lance_before = {r["lesion_id"]: r["patient_key"] for r in rh.lance_rows(lance, "lesion_vectors")}
    r = rekey(wh, old, new_secret="rotated-key-2026", manifests=())
    assert r.lance_synced and r.forgotten == 0
    with duckdb.connect(str(db), read_only=True) as con:
        after = stored_patient_keys(con)
        assert con.execute("SELECT count(*) FROM lesions l JOIN patient_outcomes o USING (patient_key)").fetchall() \
            == joins
        assert con.execute("SELECT fingerprint FROM pseudonym_keys WHERE retired_at IS NULL").fetchall() == [
            (key_fingerprint("rotated-key-2026"),)]
        lesion_keys = dict(con.execute("SELECT lesion_id, patient_key FROM lesions").fetchall())
    tables = {t for _, t, _ in before}
    assert {"dicom_files", "imaging_series", "segmentations", "lesions", "clinical_outcomes", "phenotype_clusters",
            "cluster_patients", "cohort_rekey_probe", "cohorts"} <= tables
    old_keys = set().union(*before.values())
    for column, keys in after.items():
        assert keys and not keys & old_keys, column  # every column moved, none kept an old key
    lance_after = {r["lesion_id"]: r["patient_key"] for r in rh.lance_rows(lance, "lesion_vectors")}
    assert lance_after.keys() == lance_before.keys()
    assert all(lance_after[lid] == lesion_keys[lid] for lid in lance_after)
    assert not set(lance_after.values()) & old_keys
    deep_after = {r["lesion_id"]: r["patient_key"] for r in rh.lance_rows(lance, "lesion_embeddings")}
    assert deep_after and all(deep_after[lid] == lesion_keys[lid] for lid in deep_after)  # the embeddings too
    monkeypatch.setenv(ENV_VAR, old)
    with pytest.raises(PseudonymKeyMismatch):
        discovery.refresh_catalog(wh, [chain_copy["cohort"].dicom_dir], workers=1)
