"""Deep embeddings on the small generated cohort, through the pipeline steps: crops, the self-supervised
encoder, the Lance table of embeddings, robustness, and deep / hybrid similar-case search (Python API, CLI
and the search server's API), plus a model of one's own (TorchScript exported here) and a broken one.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from imaging_assets.features.embedding import TrainConfig
from imaging_assets.features.perturb import PerturbationSpec
from imaging_assets.stages import ChainSettings, embeddings, run_chain
from imaging_assets.store.warehouse import Warehouse, connect

pytestmark = pytest.mark.slow

#: a short training: the tests check the plumbing, the benchmark the quality
TRAIN = replace(TrainConfig(), epochs=3, seed=0)


@pytest.fixture(scope="module")
def chain(small_cohort, tmp_path_factory):
    root = tmp_path_factory.mktemp("emb")
    wh = Warehouse(root)
    out = run_chain(wh, ChainSettings(dicom_roots=[small_cohort.dicom_dir], outcomes=small_cohort.outcomes_csv,
                                      workers=2, spec=PerturbationSpec(n_perturbations=3, seed=0), max_lesions=20,
                                      train=TRAIN))
    return {"wh": wh, "out": out, "cohort": small_cohort}


def _q(wh: Warehouse, sql: str, params=()):
    with connect(wh.duckdb_path, read_only=True) as con:
        return con.execute(sql, list(params)).fetchall()


def _copy(chain, tmp_path) -> Warehouse:
    root = tmp_path / "wh"
    shutil.copytree(chain["wh"].root, root)
    return Warehouse(root)


def test_every_lesion_has_a_crop_a_model_and_an_embedding(chain):
    wh, out = chain["wh"], chain["out"]
    n = _q(wh, "SELECT count(*) FROM lesions WHERE extractable")[0][0]
    crops = out["lesion_crops"]
    assert crops.total == n and crops.made == n and not crops.failed
    arr = np.load(Path(wh.files) / embeddings.crop_key(_q(wh, "SELECT min(lesion_id) FROM lesions WHERE extractable")[0][0]))
    assert arr.shape == (2, crops.size, crops.size, crops.size) and arr.dtype == np.float16
    assert set(np.unique(arr[1])) <= {0.0, 1.0} or float(arr[1].max()) <= 1.0
    model = out["embedding_model"]
    assert model.source == "trained" and not model.reused and model.epochs == TRAIN.epochs
    assert len(model.loss_curve) == TRAIN.epochs and all(np.isfinite(model.loss_curve))
    assert (Path(wh.root) / model.path).is_file() and Path(f"{Path(wh.root) / model.path}.json").is_file()
    emb = out["lesion_embeddings"]
    assert emb.rows == n and emb.embedded == n and emb.model_version == model.model_version
    assert embeddings.embedding_integrity(wh).problems == []
    rows = _q(wh, "SELECT model_version, count(*) FROM embedding_models GROUP BY 1")
    assert rows == [(model.model_version, 1)]
    rob = out["embedding_robustness"]
    assert rob.n_lesions >= 3 and rob.dims == model.dim and rob.median_icc is not None
    assert 0 <= rob.mean_overlap <= 1
    stored = _q(wh, "SELECT count(*), min(n_perturbations) FROM embedding_robustness WHERE model_version = ?",
                [model.model_version])[0]
    assert stored == (model.dim, 4)


def test_a_second_run_reuses_the_model_and_embeds_nothing(chain, tmp_path):
    wh = _copy(chain, tmp_path)
    before = embeddings.embeddings_frame(wh.lance_uri)
    assert embeddings.build_lesion_crops(wh, workers=1).made == 0
    m = embeddings.train_embedding_model(wh, TRAIN, external={})
    assert m.reused and "same crops" in m.reason
    e = embeddings.build_lesion_embeddings(wh)
    assert e.embedded == 0 and e.inserted == e.updated == e.deleted == 0
    after = embeddings.embeddings_frame(wh.lance_uri)
    assert np.array_equal(before[1], after[1])
    # another config is another model: trained, and every lesion embedded again
    m2 = embeddings.train_embedding_model(wh, replace(TRAIN, epochs=2), external={})
    assert not m2.reused and m2.model_version != m.model_version
    e2 = embeddings.build_lesion_embeddings(wh)
    assert e2.embedded == e2.rows and e2.model_version == m2.model_version
    assert _q(wh, "SELECT model_version FROM embedding_models WHERE active") == [(m2.model_version,)]
    assert embeddings.embedding_integrity(wh).problems == []


def test_training_is_deterministic_for_a_seed(chain, tmp_path):
    wh = _copy(chain, tmp_path)
    m = embeddings.train_embedding_model(wh, TRAIN, external={}, force=True)
    assert m.model_version == chain["out"]["embedding_model"].model_version  # same crops, seed, config: same file


def test_a_removed_lesion_loses_its_crop_and_embedding(chain, tmp_path):
    wh = _copy(chain, tmp_path)
    gone = _q(wh, "SELECT max(lesion_id) FROM lesions WHERE extractable")[0][0]
    with wh.transaction() as con:
        con.execute("UPDATE lesions SET extractable = false WHERE lesion_id = ?", [gone])
    r = embeddings.build_lesion_crops(wh, workers=1)
    assert r.removed == 1 and not wh.objects.exists(embeddings.crop_key(gone))
    assert embeddings.train_embedding_model(wh, TRAIN, external={}).reused  # the cohort did not grow
    e = embeddings.build_lesion_embeddings(wh)
    assert e.deleted == 1 and e.embedded == 0
    tbl, _ = embeddings.embeddings_frame(wh.lance_uri)
    assert gone not in tbl.column("lesion_id").to_pylist()


def test_deep_and_hybrid_search_other_patients_in_the_same_feature_space(chain):
    from imaging_assets.stages.similar import DEFAULT_SPACE, explain_similar, find_similar

    wh = chain["wh"]
    lid, patient = _q(wh, "SELECT lesion_id, patient_key FROM lesions WHERE extractable ORDER BY 1 LIMIT 1")[0]
    radiomics = find_similar(lid, k=5, warehouse=wh, space="radiomics")
    deep = find_similar(lid, k=5, warehouse=wh, space="deep")
    hybrid = find_similar(lid, k=5, warehouse=wh, space="hybrid")
    default = find_similar(lid, k=5, warehouse=wh)
    for df, space in ((radiomics, "radiomics"), (deep, "deep"), (hybrid, "hybrid"), (default, DEFAULT_SPACE)):
        assert len(df) == 5 and set(df["search_space"]) == {space}
        assert patient not in set(df["patient_key"]) and len(set(df["space"])) == 1
        assert df["rank"].to_list() == [1, 2, 3, 4, 5]
    assert deep["deep_distance"].is_sorted() and radiomics["distance"].is_sorted()
    assert radiomics["deep_distance"].null_count() == 5
    assert hybrid["score"].is_sorted(descending=True) and hybrid["score"].null_count() == 0
    assert default["lesion_id"].to_list() == {"radiomics": radiomics, "hybrid": hybrid}[DEFAULT_SPACE]["lesion_id"].to_list()
    # the distances of a deep search are the radiomics ones where the lesions have vectors: explainable
    explained = explain_similar(wh, deep, reference_lesion_id=lid)
    assert len(explained) == 5 and all(e is not None for e in explained)
    audit = _q(wh, "SELECT params, table_versions FROM audit_log WHERE action = 'search' ORDER BY logged_at")
    spaces = [json.loads(p)["search_space"] for p, _ in audit[-4:]]
    assert spaces == ["radiomics", "deep", "hybrid", DEFAULT_SPACE]
    assert "lesion_embeddings" in json.loads(audit[-2][1]) and "lesion_embeddings" not in json.loads(audit[-4][1])


def test_fusion_ranks_by_both_spaces():
    from imaging_assets.stages.similar import fuse_ranks

    scores = fuse_ranks({"radiomics": [1.0, 2.0, 3.0, None], "deep": [0.3, 0.1, 0.2, 0.05]}, k0=1)
    # candidate 0 is 1st and 4th: 1/2 + 1/5; candidate 1 2nd and 2nd: 1/3 + 1/3; the last has no radiomics
    # distance: it ranks after all (5th of 4) there
    assert scores == pytest.approx([1 / 2 + 1 / 5, 1 / 3 + 1 / 3, 1 / 4 + 1 / 4, 1 / 6 + 1 / 2])
    assert int(np.argmax(scores)) == 0
    weighted = fuse_ranks({"radiomics": [1.0, 2.0], "deep": [0.2, 0.1]}, k0=0, weights={"radiomics": 0.75, "deep": 0.25})
    assert weighted == pytest.approx([0.75 / 1 + 0.25 / 2, 0.75 / 2 + 0.25 / 1])


def test_cli_similar_space_hybrid(chain):
    wh = chain["wh"]
    lid = _q(wh, "SELECT lesion_id FROM lesions WHERE extractable ORDER BY 1 LIMIT 1")[0][0]
    run = subprocess.run([sys.executable, "-m", "imaging_assets.cli", "similar", lid, "--space", "hybrid", "-k", "3",
                          "--warehouse", str(wh.root), "--local", "--json"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    rows = json.loads(run.stdout)
    assert [r["search_space"] for r in rows] == ["hybrid"] * 3 and all(r["deep_distance"] is not None for r in rows)
    bad = subprocess.run([sys.executable, "-m", "imaging_assets.cli", "similar", lid, "--space", "hybridd",
                          "--warehouse", str(wh.root), "--local"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "hybridd" in bad.stderr


def test_deep_search_without_embeddings_says_what_to_materialize(chain, tmp_path):
    from imaging_assets.stages.similar import find_similar

    wh = _copy(chain, tmp_path)
    shutil.rmtree(Path(wh.lance_uri) / "lesion_embeddings.lance")
    lid = _q(wh, "SELECT lesion_id FROM lesions WHERE extractable ORDER BY 1 LIMIT 1")[0][0]
    with pytest.raises(ValueError, match="materialize lesion_crops, embedding_model and lesion_embeddings"):
        find_similar(lid, k=3, warehouse=wh, space="deep")
    assert set(find_similar(lid, k=3, warehouse=wh)["search_space"]) == {"radiomics"}  # the default falls back


def _export_torchscript(path: Path, size: int = 32, channels: int = 1, dim: int = 8) -> None:
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(channels, dim, 3, stride=2), torch.nn.AdaptiveAvgPool3d(1),
                                torch.nn.Flatten())
    torch.jit.trace(model.eval(), torch.zeros(1, channels, size, size, size)).save(str(path))


def test_a_model_of_your_own_is_used_through_the_same_path(chain, tmp_path):
    from imaging_assets.stages.similar import find_similar

    wh = _copy(chain, tmp_path)
    path = tmp_path / "foundation.pt"
    _export_torchscript(path)
    m = embeddings.train_embedding_model(wh, external={"path": str(path), "input_size": 32, "channels": 1,
                                                       "intensity": "zscore"})
    assert m.source == "external" and m.model_version.startswith("ext-") and m.dim == 8 and m.input_size == 32
    e = embeddings.build_lesion_embeddings(wh)
    assert e.dim == 8 and e.embedded == e.rows and e.model_version == m.model_version
    assert embeddings.embedding_integrity(wh).problems == []
    lid = _q(wh, "SELECT lesion_id FROM lesions WHERE extractable ORDER BY 1 LIMIT 1")[0][0]
    assert len(find_similar(lid, k=3, warehouse=wh, space="deep")) == 3
    # registering it again changes nothing
    assert embeddings.train_embedding_model(wh, external={"path": str(path), "input_size": 32, "channels": 1,
                                                          "intensity": "zscore"}).reused


def test_a_broken_model_file_is_refused_and_nothing_stored_changes(chain, tmp_path):
    wh = _copy(chain, tmp_path)
    before_models = _q(wh, "SELECT model_version, active FROM embedding_models ORDER BY 1")
    before = embeddings.embeddings_frame(wh.lance_uri)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="broken.onnx"):
        embeddings.train_embedding_model(wh, external={"path": str(broken), "input_size": 32, "channels": 1})
    with pytest.raises(ValueError, match="missing.pt"):
        embeddings.train_embedding_model(wh, external={"path": str(tmp_path / "missing.pt")})
    assert _q(wh, "SELECT model_version, active FROM embedding_models ORDER BY 1") == before_models
    after = embeddings.embeddings_frame(wh.lance_uri)
    assert np.array_equal(before[1], after[1])
    # the stored model file changed behind the warehouse's back: refused by its sha256, embeddings kept
    model = Path(wh.root) / chain["out"]["embedding_model"].path
    model.write_bytes(model.read_bytes() + b"\0")
    with pytest.raises(RuntimeError, match="sha256"):
        embeddings.build_lesion_embeddings(wh)
    assert np.array_equal(before[1], embeddings.embeddings_frame(wh.lance_uri)[1])


def test_the_search_server_answers_every_space(chain, tmp_path):
    from starlette.testclient import TestClient

    from imaging_assets.access import add_user
    from imaging_assets.stages.similar import similar_rows
    from imaging_assets.web import create_app

    wh = _copy(chain, tmp_path)
    users = tmp_path / "users.json"
    token = add_user("ana", "viewer", path=users)
    with TestClient(create_app(wh, users=users)) as client:  # the lifespan starts and stops the warm state
        lid = _q(wh, "SELECT lesion_id FROM lesions WHERE extractable ORDER BY 1 LIMIT 1")[0][0]
        for space in ("radiomics", "deep", "hybrid"):
            r = client.get(f"/api/similar/{lid}?k=3&space={space}", headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 200, r.text
            assert {x["search_space"] for x in r.json()["results"]} == {space}
        warm_rows = client.get(f"/api/similar/{lid}?k=3&space=hybrid&all_lesions=1",
                               headers={"Authorization": f"Bearer {token}"}).json()["results"]
        cold = similar_rows(lid, k=3, warehouse=wh, space="hybrid")
        assert [x["lesion_id"] for x in warm_rows] == [x["lesion_id"] for x in cold]
        page = client.get(f"/?lesion_id={lid}&space=deep", cookies={"ia_token": token})
        assert page.status_code == 200 and "by the deep embedding" in page.text and "deep 0." in page.text


def test_a_new_lesion_gets_the_same_embedding_as_the_stored_one(chain):
    """A lesion given as files (its own series folder and SEG) is embedded through the same crop and model as
    the pipeline: its embedding equals the stored one, and a hybrid search of it finds itself first."""
    from imaging_assets.stages.similar import find_similar, query_vector

    wh = chain["wh"]
    lid, files, seg_path, label = _q(
        wh, "SELECT l.lesion_id, i.files, s.path, l.segment_number FROM lesions l JOIN imaging_series i "
            "USING (series_key) JOIN segmentations s USING (seg_key) WHERE l.extractable AND s.kind = 'seg' "
            "ORDER BY l.volume_mm3 DESC LIMIT 1")[0]
    q = query_vector(wh, Path(files[0]).parent, seg_path, label=label)
    assert q.embedding is not None and q.model_version == chain["out"]["embedding_model"].model_version
    tbl, mat = embeddings.embeddings_frame(wh.lance_uri)
    stored = mat[tbl.column("lesion_id").to_pylist().index(lid)]
    assert float(np.abs(stored - q.embedding).max()) < 1e-3
    hits = find_similar(vector=q.vector, embedding=q.embedding, k=3, warehouse=wh, space="hybrid",
                        feature_space=q.space, exclude_same_patient=False)
    assert hits["lesion_id"][0] == lid and hits["deep_distance"][0] < 1e-3
    assert query_vector(wh, Path(files[0]).parent, seg_path, label=label, embed=False).embedding is None


def test_the_server_searches_a_new_lesion_by_its_embedding(chain, tmp_path):
    from starlette.testclient import TestClient

    from imaging_assets.access import add_user
    from imaging_assets.web import create_app

    wh = _copy(chain, tmp_path)
    lid, files, seg_path, label = _q(
        wh, "SELECT l.lesion_id, i.files, s.path, l.segment_number FROM lesions l JOIN imaging_series i "
            "USING (series_key) JOIN segmentations s USING (seg_key) WHERE l.extractable AND s.kind = 'seg' "
            "ORDER BY l.volume_mm3 DESC LIMIT 1")[0]
    users = tmp_path / "users.json"
    token = add_user("ana", "viewer", path=users)
    with TestClient(create_app(wh, users=users, roots=[str(chain["cohort"].dicom_dir)])) as client:
        r = client.post("/api/similar", json={"image": str(Path(files[0]).parent), "mask": seg_path, "label": label,
                                              "k": 2, "space": "deep", "filters": {"lesion_id": [lid]}},
                        headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text
        (row,) = r.json()["results"]
        assert row["lesion_id"] == lid and row["search_space"] == "deep" and row["deep_distance"] < 1e-3
