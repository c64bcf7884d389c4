"""Issue 18, findings 1-3: no built-in pseudonym key, no secret in run config, a key change is refused and a
key rotation (``rekey``) re-derives every stored patient key in one transaction."""

from __future__ import annotations

import csv
import os
import stat
import subprocess
import sys
from pathlib import Path

import dagster as dg
import duckdb
import pydicom
import pytest
from pydicom.data import get_testdata_file

from imaging_assets.defs.resources import DicomSourcesResource, OutcomeSourcesResource, WarehouseResource
from imaging_assets.dicom.pseudonym import ENV_VAR, key_fingerprint, patient_key, pseudonym_secret
from imaging_assets.errors import PseudonymKeyError, PseudonymKeyMismatch
from imaging_assets.stages import discovery, outcomes
from imaging_assets.stages.keys import check_key, rekey
from imaging_assets.store.warehouse import Warehouse

KEY_A = "hospital-key-A-0123456789abcdef"
KEY_B = "hospital-key-B-fedcba9876543210"
PATIENTS = ["MRN2604190", "MRN2604191", "MRN2604192"]


def _archive(root: Path) -> Path:
    """Two slices per patient (CT_small copies), a patient id each."""
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    root.mkdir(parents=True, exist_ok=True)
    for p, pid in enumerate(PATIENTS):
        for i in range(2):
            ds = src.copy()
            ds.PatientID = pid
            ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.8.498.{p + 1}"
            ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.{p + 1}.{i + 1}"
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.ImagePositionPatient = [0.0, 0.0, float(i) * 5.0]
            ds.save_as(root / f"p{p}_{i}.dcm", enforce_file_format=True)
    return root


def _outcomes(path: Path, pids=PATIENTS) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_id", "time_months", "event", "age"])
        for i, pid in enumerate(pids):
            w.writerow([pid, 10 + i, i % 2, 50 + i])
    return path


def _keys(db: Path) -> dict[str, set[str]]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return {t: {k for (k,) in con.execute(f"SELECT DISTINCT patient_key FROM {t} WHERE patient_key IS NOT NULL")
                    .fetchall()}
                for t in ("dicom_files", "imaging_series", "clinical_outcomes", "cohort_probe")}
    finally:
        con.close()


def _build(tmp_path: Path, key: str) -> tuple[Warehouse, Path, Path]:
    archive = _archive(tmp_path / "archive")
    csv_path = _outcomes(tmp_path / "outcomes.csv")
    wh = Warehouse(tmp_path / "wh")
    discovery.refresh_catalog(wh, [archive], secret=key, workers=1)
    discovery.rebuild_series(wh)
    outcomes.load_outcomes(wh, csv_path, secret=key)
    with wh.connect() as con:  # a cohort-like table made by another stage: rekey finds it by its column
        con.execute("CREATE TABLE cohort_probe AS SELECT DISTINCT patient_key, 1 AS rank FROM imaging_series")
    return wh, archive, csv_path


# ------------------------------------------------------------------------------------ finding 1: no built-in key


def test_without_a_configured_key_a_random_owner_only_key_file_is_made_once(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    key_file = tmp_path / "conf" / "pseudonym.key"
    monkeypatch.setenv("IMAGING_ASSETS_PSEUDONYM_KEY_FILE", str(key_file))
    first = pseudonym_secret()
    assert key_file.is_file() and stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    assert len(first) == 64 and first == key_file.read_text().strip()
    assert pseudonym_secret() == first  # the same key on every later use
    other = tmp_path / "other" / "pseudonym.key"  # another installation: another key
    monkeypatch.setenv("IMAGING_ASSETS_PSEUDONYM_KEY_FILE", str(other))
    assert pseudonym_secret() != first
    # the development key of earlier versions is public: refused as a configured key
    monkeypatch.setenv(ENV_VAR, "imaging-assets-development-key-NOT-FOR-REAL-DATA")
    with pytest.raises(PseudonymKeyError, match="public development key"):
        pseudonym_secret()


def test_a_key_file_others_may_read_or_an_empty_one_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    key_file = tmp_path / "pseudonym.key"
    key_file.write_text("some-secret\n")
    key_file.chmod(0o644)
    monkeypatch.setenv("IMAGING_ASSETS_PSEUDONYM_KEY_FILE", str(key_file))
    with pytest.raises(PseudonymKeyError, match=r"pseudonym.key: readable or writable by group/others \(mode 0644\)"):
        pseudonym_secret()
    key_file.chmod(0o600)
    assert pseudonym_secret() == "some-secret"
    key_file.write_text("  \n")
    with pytest.raises(PseudonymKeyError, match="empty"):
        pseudonym_secret()


def test_a_key_file_inside_the_warehouse_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    wh = Warehouse(tmp_path / "wh")
    monkeypatch.setenv("IMAGING_ASSETS_PSEUDONYM_KEY_FILE", str(tmp_path / "wh" / "keys" / "pseudonym.key"))
    with pytest.raises(PseudonymKeyError, match="lies inside the warehouse"):
        check_key(wh)
    assert not wh.duckdb_path.exists()


# ------------------------------------------------------------------- finding 2: no secret in run config / storage


def test_the_secret_is_no_config_field_and_never_reaches_dagster_storage(tmp_path, monkeypatch):
    from imaging_assets.defs.discovery import dicom_files

    for resource in (DicomSourcesResource, OutcomeSourcesResource, WarehouseResource):
        fields = set(resource.model_fields)
        assert not {f for f in fields if "key" in f or "secret" in f}, (resource.__name__, fields)
    secret = "S3cr3t-" + "x9Q" * 8
    monkeypatch.setenv(ENV_VAR, secret)
    archive = _archive(tmp_path / "archive")
    resources = {"warehouse": WarehouseResource(root=str(tmp_path / "wh")),
                 "dicom_sources": DicomSourcesResource(roots=[str(archive)], workers=1)}
    home = tmp_path / "dagster_home"
    home.mkdir()
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        # the documented run-config field of earlier versions is gone: Dagster refuses it
        with pytest.raises(dg.DagsterInvalidConfigError, match="pseudonym_key"):
            dg.materialize([dicom_files], instance=instance, resources=resources, run_config={
                "resources": {"dicom_sources": {"config": {"roots": [str(archive)], "pseudonym_key": secret}}}})
        result = dg.materialize([dicom_files], instance=instance, resources=resources)
        assert result.success
    # the key came from the environment: it is in no file of the Dagster instance (run storage, event log)
    # and in no file of the warehouse; the warehouse holds its fingerprint only
    leaks = [p for root in (home, tmp_path / "wh") for p in root.rglob("*")
             if p.is_file() and secret.encode() in p.read_bytes()]
    assert leaks == []
    con = duckdb.connect(str(tmp_path / "wh" / "warehouse.duckdb"), read_only=True)
    try:
        assert con.execute("SELECT fingerprint FROM pseudonym_keys").fetchall() == [(key_fingerprint(secret),)]
        assert con.execute("SELECT count(DISTINCT patient_key) FROM dicom_files").fetchone()[0] == len(PATIENTS)
    finally:
        con.close()


# -------------------------------------------------------- finding 3: another key is refused, rekey rotates it


def test_a_run_with_another_key_is_refused_and_changes_nothing(tmp_path):
    wh, archive, csv_path = _build(tmp_path, KEY_A)
    before = _keys(wh.duckdb_path)
    assert before["dicom_files"] == {patient_key(p, KEY_A) for p in PATIENTS} == before["clinical_outcomes"]
    # a changed file and a changed outcome file, read with another key: refused, naming the problem
    ds = pydicom.dcmread(archive / "p0_0.dcm")
    ds.SeriesDescription = "changed"
    ds.save_as(archive / "p0_0.dcm")
    _outcomes(csv_path, PATIENTS[::-1])
    with pytest.raises(PseudonymKeyMismatch, match="not the key this warehouse's patient keys were made with"):
        discovery.refresh_catalog(wh, [archive], secret=KEY_B, workers=1)
    with pytest.raises(PseudonymKeyMismatch, match="Nothing was written"):
        outcomes.load_outcomes(wh, csv_path, secret=KEY_B)
    with pytest.raises(PseudonymKeyMismatch):
        discovery.rebuild_segmentations(wh, secret=KEY_B)
    assert _keys(wh.duckdb_path) == before  # no series with two keys, outcomes keep theirs
    discovery.refresh_catalog(wh, [archive], secret=KEY_A, workers=1)  # the right key goes on working
    assert _keys(wh.duckdb_path) == before


def test_rekey_rederives_every_patient_key_in_one_transaction(tmp_path):
    wh, archive, csv_path = _build(tmp_path, KEY_A)
    with pytest.raises(PseudonymKeyError, match="not the key this warehouse was built with"):
        rekey(wh, "not-the-old-key", new_secret=KEY_B)
    r = rekey(wh, KEY_A, new_secret=KEY_B)
    expected = {patient_key(p, KEY_B) for p in PATIENTS}
    after = _keys(wh.duckdb_path)
    assert all(keys == expected for keys in after.values()), after
    assert r.patients == len(PATIENTS) and r.files_read == 2 * len(PATIENTS) and r.outcome_files_read == 1
    assert {"main.dicom_files.patient_key", "main.imaging_series.patient_key", "main.clinical_outcomes.patient_key",
            "main.cohort_probe.patient_key"} <= set(r.rows_changed)
    con = duckdb.connect(str(wh.duckdb_path), read_only=True)
    try:
        fps = con.execute("SELECT fingerprint, retired_at IS NULL FROM pseudonym_keys ORDER BY recorded_at").fetchall()
        joined = con.execute("SELECT count(*) FROM imaging_series JOIN patient_outcomes USING (patient_key)").fetchone()
    finally:
        con.close()
    assert fps == [(key_fingerprint(KEY_A), False), (key_fingerprint(KEY_B), True)]
    assert joined == (len(PATIENTS),)  # outcomes still join to images
    with pytest.raises(PseudonymKeyMismatch):  # the old key is now the wrong one
        discovery.refresh_catalog(wh, [archive], secret=KEY_A, workers=1)
    discovery.refresh_catalog(wh, [archive], secret=KEY_B, workers=1)
    outcomes.load_outcomes(wh, csv_path, secret=KEY_B)
    assert _keys(wh.duckdb_path) == after


def test_rekey_refuses_keys_without_a_source_unless_told_to_forget_them(tmp_path):
    wh, archive, csv_path = _build(tmp_path, KEY_A)
    before = _keys(wh.duckdb_path)
    for f in archive.glob("p2_*.dcm"):  # patient 3's files vanish (still catalogued); their outcome stays
        f.unlink()
    _outcomes(csv_path, PATIENTS[:2])
    with pytest.raises(PseudonymKeyError, match=r"1 stored patient key\(s\) come from no readable source"):
        rekey(wh, KEY_A, new_secret=KEY_B)
    assert _keys(wh.duckdb_path) == before  # nothing written
    r = rekey(wh, KEY_A, new_secret=KEY_B, forget_unmapped=True)
    assert r.forgotten == 1 and r.patients == 2
    assert _keys(wh.duckdb_path)["imaging_series"] == {patient_key(p, KEY_B) for p in PATIENTS[:2]}


def test_cli_rekey_takes_the_old_key_from_the_environment_only(tmp_path):
    wh, _, _ = _build(tmp_path, KEY_A)
    env = {**os.environ, ENV_VAR: KEY_B}
    env.pop("IMAGING_ASSETS_OLD_PSEUDONYM_KEY", None)
    cmd = [sys.executable, "-m", "imaging_assets.cli", "rekey", "--warehouse", str(wh.root)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "IMAGING_ASSETS_OLD_PSEUDONYM_KEY" in res.stderr
    res = subprocess.run(cmd, env={**env, "IMAGING_ASSETS_OLD_PSEUDONYM_KEY": KEY_A}, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert f"rekeyed {len(PATIENTS)} patients" in res.stdout
    assert KEY_A not in res.stdout + res.stderr and KEY_B not in res.stdout + res.stderr
    assert _keys(wh.duckdb_path)["clinical_outcomes"] == {patient_key(p, KEY_B) for p in PATIENTS}


def test_make_demo_uses_the_explicit_demo_key():
    """The demo is pseudonymised with the documented demo key (set explicitly by the Makefile), never a default."""
    import re

    from imaging_assets.dicom.pseudonym import DEMO_KEY

    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    assert re.search(r"^DEMO_PSEUDONYM_KEY := (.+)$", makefile, re.M).group(1) == DEMO_KEY
    demo = makefile.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    assert demo.count("IMAGING_ASSETS_PSEUDONYM_KEY=$(DEMO_PSEUDONYM_KEY)") == 2  # the job and the cohort


def test_a_warehouse_without_a_fingerprint_is_refused_until_rekeyed_from_the_public_key(tmp_path):
    """A warehouse made before fingerprints (here: the public development key of earlier versions, as the
    default was) cannot tell which key made its patient keys: refused, and `rekey` from that key moves it."""
    from imaging_assets.dicom.pseudonym import PUBLIC_KEYS

    (legacy_key,) = PUBLIC_KEYS
    wh, archive, csv_path = _build(tmp_path, KEY_A)
    with wh.connect() as con:  # what an earlier version left: keys made with the public key, no fingerprint
        con.execute("DELETE FROM pseudonym_keys")
        for table in ("dicom_files", "imaging_series", "clinical_outcomes", "cohort_probe"):
            for pid in PATIENTS:
                con.execute(f"UPDATE {table} SET patient_key = ? WHERE patient_key = ?",
                            [patient_key(pid, legacy_key), patient_key(pid, KEY_A)])
    with pytest.raises(PseudonymKeyError, match="holds patient keys but no key fingerprint"):
        discovery.refresh_catalog(wh, [archive], secret=KEY_B, workers=1)
    with pytest.raises(PseudonymKeyError, match="public development key"):
        check_key(wh, legacy_key)  # nor can the public key be used to go on
    r = rekey(wh, legacy_key, new_secret=KEY_B)
    assert r.old_fingerprint is None and r.patients == len(PATIENTS)
    assert all(keys == {patient_key(p, KEY_B) for p in PATIENTS} for keys in _keys(wh.duckdb_path).values())
    discovery.refresh_catalog(wh, [archive], secret=KEY_B, workers=1)


def test_in_dagster_a_run_with_another_key_fails_with_the_reason(tmp_path, monkeypatch):
    from imaging_assets.defs.discovery import dicom_files
    from imaging_assets.defs.outcomes import clinical_outcomes

    archive = _archive(tmp_path / "archive")
    _outcomes(tmp_path / "outcomes.csv")
    resources = {"warehouse": WarehouseResource(root=str(tmp_path / "wh")),
                 "dicom_sources": DicomSourcesResource(roots=[str(archive)], workers=1),
                 "outcome_sources": OutcomeSourcesResource(path=str(tmp_path / "outcomes.csv"))}
    with dg.instance_for_test() as instance:
        monkeypatch.setenv(ENV_VAR, KEY_A)
        assert dg.materialize([dicom_files, clinical_outcomes], instance=instance, resources=resources).success
        before = _keys_no_cohort(tmp_path / "wh" / "warehouse.duckdb")
        monkeypatch.setenv(ENV_VAR, KEY_B)
        for asset in (dicom_files, clinical_outcomes):
            result = dg.materialize([asset], instance=instance, resources=resources, raise_on_error=False)
            assert not result.success
            (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
            assert "is not the key this warehouse's patient keys were made with" in str(
                failure.step_failure_data.error.message)
    assert _keys_no_cohort(tmp_path / "wh" / "warehouse.duckdb") == before


def _keys_no_cohort(db: Path) -> dict[str, set[str]]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return {t: {k for (k,) in con.execute(f"SELECT DISTINCT patient_key FROM {t}").fetchall()}
                for t in ("dicom_files", "clinical_outcomes")}
    finally:
        con.close()
