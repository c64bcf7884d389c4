"""Deep embeddings beside radiomics: the steps behind ``lesion_crops``, ``embedding_model``, ``lesion_embeddings``
and ``embedding_robustness``.

``lesion_crops``
    One lesion-centred crop per extractable lesion (:func:`~imaging_assets.features.crops.lesion_crop`: 48³ at
    1 mm, intensity normalised per modality, the mask as a second channel) as ``crops/<id>.npy`` in the
    warehouse files (float16, 442 KB), incremental by content hash like the pictures
    (:func:`~imaging_assets.stages.lesion_files.update_lesion_files`). Training and embedding read them one
    batch at a time: the cohort is never in memory at once. On object storage the crops are mirrored once
    into a local cache (``<duckdb dir>/.cache/crops/<id>-<hash>.npy``): training reads each crop every epoch.
``embedding_model``
    The encoder: a small 3D CNN trained self-supervised on the crops
    (:func:`~imaging_assets.features.embedding.train_encoder`), saved as TorchScript under
    ``models/ssl-<sha12>.pt`` in the warehouse files with a JSON sidecar (training config, data version, loss
    curve; on object storage a local copy is kept in ``<duckdb dir>/.cache/models`` and checked by sha256);
    or a model file of yours (``IMAGING_ASSETS_EMBEDDING_MODEL``, TorchScript or ONNX), registered as
    ``ext-<sha12>`` and used through the same loader. A trained model is reused while the training config is
    the same and the cohort has not grown by more than ``retrain_growth`` (25 %) since it was trained: a
    new model changes every embedding, so it is not retrained for every new study.
``lesion_embeddings``
    The Lance table ``lesion_embeddings``: the same layout, upsert, verification, index and retention code
    as ``lesion_vectors`` (:func:`~imaging_assets.store.lance.sync_vectors` with another table name); its
    ``feature_set_version`` column holds the model version, ``space`` the lesion's feature space (a search
    never crosses spaces), ``cluster`` its radiomics phenotype cluster. Only new or changed crops (or all,
    under a new model) are embedded (``embedding_state``).
``embedding_robustness``
    In :mod:`imaging_assets.stages.embedding_robustness`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imaging_assets.stages.lesion_files import update_lesion_files
from imaging_assets.stages.reproducibility import _has_table
from imaging_assets.store.schema import ensure_schema
from imaging_assets.store.warehouse import Warehouse, table_rows

logger = logging.getLogger(__name__)

#: Folders under the warehouse root.
CROP_DIR = "crops"
MODEL_DIR = "models"
#: Retrain the encoder when the cohort grew by more than this fraction since the active model was trained.
RETRAIN_GROWTH = 0.25


# ------------------------------------------------------------------------------------------------ crops
@dataclass(frozen=True)
class CropsResult:
    """One crops run: made, kept, removed, failed (with reasons), the crop geometry."""

    folder: str
    made: int
    unchanged: int
    removed: int
    failed: list[dict[str, str]]
    total: int
    size: int
    spacing_mm: float
    elapsed_s: float


#: Local cache (under the DuckDB folder) of files a warehouse on object storage keeps remotely.
CACHE_DIR = ".cache"


def crop_key(lesion_id: str) -> str:
    """A lesion's crop's key in the warehouse files (``crops/<lesion_id>.npy``)."""
    return f"{CROP_DIR}/{lesion_id}.npy"


def crop_paths(wh: Warehouse, crops: Sequence[tuple[str, str]]) -> list[Path]:
    """Local files of the crops ``(lesion_id, content_hash)``, in order.

    A local warehouse: the crop files themselves. On object storage: copies in
    ``<duckdb dir>/.cache/crops/<lesion_id>-<hash>.npy``, downloaded once per content version (8 at a
    time); cached copies of other versions are removed.
    """
    if not wh.remote:
        return [Path(wh.files) / crop_key(lid) for lid, _ in crops]
    import concurrent.futures as cf

    folder = Path(wh.root) / CACHE_DIR / CROP_DIR
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{lid}-{h}.npy" for lid, h in crops]
    store = wh.objects

    def fetch(item: tuple[tuple[str, str], Path]) -> None:
        (lid, _), path = item
        if not path.is_file():
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(store.read_bytes(crop_key(lid)))
            os.replace(tmp, path)

    with cf.ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(fetch, zip(crops, paths)))
    keep = {p.name for p in paths}
    mine = {f"{lid}-" for lid, _ in crops}
    for old in folder.glob("*.npy"):
        if old.name not in keep and any(old.name.startswith(m) for m in mine):
            old.unlink(missing_ok=True)
    return paths


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _crop_npy(image: Any, mask: Any, lesion: Any) -> bytes:
    """In a worker: one lesion's crop as ``.npy`` bytes."""
    from imaging_assets.features.crops import lesion_crop

    return _npy_bytes(lesion_crop(image, mask, lesion.get("modality")))


def _crop_version() -> str:
    from imaging_assets.features.crops import CROP_SIZE, CROP_SPACING_MM, CROP_VERSION

    return f"crop{CROP_VERSION}-{CROP_SIZE}-{CROP_SPACING_MM}"


def build_lesion_crops(wh: Warehouse, workers: int | None = None, force: bool = False) -> CropsResult:
    """Make the missing or outdated crops of every extractable lesion (see the module docstring)."""
    from imaging_assets.features.crops import CROP_SIZE, CROP_SPACING_MM

    r = update_lesion_files(wh, "lesion_crops", CROP_DIR, ".npy", _crop_npy, _crop_version(),
                            workers=workers, force=force)
    for f in r.failed[:10]:
        logger.warning("crop of lesion %s: %s", f["lesion_id"], f["error"])
    return CropsResult(folder=r.folder, made=r.made, unchanged=r.unchanged, removed=r.removed, failed=r.failed,
                       total=r.total, size=CROP_SIZE, spacing_mm=CROP_SPACING_MM, elapsed_s=r.elapsed_s)


class NpyCrops:
    """The crops of some lesions, read from their files on access (a
    :class:`~imaging_assets.features.embedding.CropSource`)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        return np.load(self.paths[i], allow_pickle=False)

    def batch(self, start: int, stop: int) -> np.ndarray:
        return np.stack([self[i] for i in range(start, min(stop, len(self)))])


def _ok_crops(con: Any, wh: Warehouse) -> list[tuple[str, str]]:
    """(lesion_id, content_hash) of the extractable lesions whose crop is made, sorted by id."""
    rows = con.execute("SELECT c.lesion_id, c.content_hash FROM lesion_crops c JOIN lesions l USING (lesion_id) "
                       "WHERE c.status = 'ok' AND l.extractable ORDER BY 1").fetchall()
    present = set(wh.objects.list(CROP_DIR))  # one listing, not a request per lesion
    return [(lid, h) for lid, h in rows if f"{lid}.npy" in present]


def data_version(crops: Sequence[tuple[str, str]]) -> str:
    """What a model was trained on: sha1 (16 hex) of the sorted lesion ids and crop content hashes."""
    h = hashlib.sha1()
    for lid, ch in sorted(crops):
        h.update(f"{lid}:{ch};".encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ model
@dataclass(frozen=True)
class ModelResult:
    """The active embedding model after an ``embedding_model`` run."""

    model_version: str
    source: str  # trained | external
    path: str
    sha256: str
    dim: int
    input_size: int
    reused: bool
    reason: str
    n_lesions: int
    data_version: str | None
    epochs: int | None
    train_s: float | None
    stopped_early: bool
    loss_curve: list[float]
    config: dict[str, Any]
    elapsed_s: float


def _model_file(wh: Warehouse, row: dict[str, Any]) -> Path:
    """The local file of a model row: an absolute path (your model) as is; a trained model in the warehouse
    files, or, on object storage, its copy in ``<duckdb dir>/.cache/models`` (downloaded, with its sidecar,
    when missing or when its sha256 is not the registered one)."""
    p = Path(str(row["path"]))
    if p.is_absolute():
        return p
    if not wh.remote:
        return Path(wh.files) / p
    local = Path(wh.root) / CACHE_DIR / p
    from imaging_assets.features.embedding import file_sha256

    if local.is_file() and file_sha256(local) == row.get("file_sha256"):
        return local
    local.parent.mkdir(parents=True, exist_ok=True)
    for key, target in ((p.as_posix() + ".json", Path(f"{local}.json")), (p.as_posix(), local)):
        try:
            data = wh.objects.read_bytes(key)
        except FileNotFoundError:
            continue  # load_embedder names what is missing
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
    return local


def active_model(con: Any) -> dict[str, Any] | None:
    """The active ``embedding_models`` row, or None."""
    rows = table_rows(con, "embedding_models")
    active = [r for r in rows if r["active"]]
    return dict(active[0]) if active else None


def _result(row: dict[str, Any], reused: bool, reason: str, t0: float) -> ModelResult:
    return ModelResult(
        model_version=row["model_version"], source=row["source"], path=str(row["path"]), sha256=row["file_sha256"],
        dim=int(row["dim"]), input_size=int(row["input_size"]), reused=reused, reason=reason,
        n_lesions=int(row["n_lesions"] or 0), data_version=row["data_version"], epochs=row["epochs"],
        train_s=row["train_s"], stopped_early=bool(row["stopped_early"]),
        loss_curve=[float(x) for x in (row["loss_curve"] or [])], config=json.loads(row["config_json"] or "{}"),
        elapsed_s=round(time.perf_counter() - t0, 3))


def _activate(wh: Warehouse, row: dict[str, Any]) -> None:
    """Insert (or replace) a model row and make it the only active one, in one transaction."""
    from imaging_assets.store.schema import EMBEDDING_MODEL_COLUMNS

    cols = list(EMBEDDING_MODEL_COLUMNS)
    with wh.transaction() as con:
        con.execute("DELETE FROM embedding_models WHERE model_version = ?", [row["model_version"]])
        con.execute("UPDATE embedding_models SET active = false")
        con.execute(f"INSERT INTO embedding_models ({', '.join(cols)}, created_at) VALUES "
                    f"({', '.join('?' for _ in cols)}, (now() AT TIME ZONE 'UTC'))",
                    [row.get(c) for c in cols])


def train_embedding_model(wh: Warehouse, config: Any = None, force: bool = False,
                          retrain_growth: float = RETRAIN_GROWTH, external: dict[str, Any] | None = None,
                          progress: Callable[[int, float], None] | None = None) -> ModelResult:
    """Make sure an embedding model fits the cohort (see the module docstring); returns the active model.

    Parameters
    ----------
    config
        A :class:`~imaging_assets.features.embedding.TrainConfig` (default: its defaults).
    force
        Train again even when the active model could be reused.
    retrain_growth
        Reuse the active trained model while the cohort has at most ``(1 + retrain_growth)`` times the lesions
        it was trained on (and the config is the same).
    external
        ``{"path", "input_size"?, "channels"?, "intensity"?}``: use this model file instead of training
        (default :func:`imaging_assets.settings.embedding_model`, from ``IMAGING_ASSETS_EMBEDDING_MODEL``).

    Raises
    ------
    ValueError
        The external model cannot be loaded (the message names the file and what is wrong); no crops to
        train on.
    """
    from imaging_assets import settings
    from imaging_assets.features.embedder import load_embedder
    from imaging_assets.features.embedding import TrainConfig, save_encoder, train_encoder, weights_digest

    t0 = time.perf_counter()
    external = settings.embedding_model() if external is None else external
    with wh.connect() as con:
        ensure_schema(con)
        crops = _ok_crops(con, wh)
        current = active_model(con)
    version_of_data = data_version(crops)
    if external:
        emb = load_embedder(external["path"], input_size=external.get("input_size"),
                            channels=external.get("channels"), intensity=external.get("intensity"))
        mv = f"ext-{emb.sha256[:12]}"
        if current is not None and current["model_version"] == mv:
            return _result(current, True, f"the configured model {emb.path} is active", t0)
        row = {"model_version": mv, "source": "external", "path": str(emb.path), "file_sha256": emb.sha256,
               "dim": emb.dim, "input_size": emb.input_size, "channels": emb.channels, "intensity": emb.intensity,
               "config_json": json.dumps({k: external.get(k) for k in ("path", "input_size", "channels",
                                                                        "intensity")}),
               "data_version": None, "n_lesions": len(crops), "epochs": None, "train_s": None,
               "stopped_early": False, "loss_curve": [], "active": True}
        _activate(wh, row)
        return _result(row, False, f"registered your model {emb.path} ({emb.kind})", t0)
    cfg = config or TrainConfig()
    cfg_json = json.dumps(cfg.to_dict(), sort_keys=True)
    if not crops:
        raise ValueError("no lesion crops to train the embedding model on: materialize lesion_crops first "
                         "(and check its crops_complete result)")
    if current is not None and current["source"] == "trained" and not force:
        path = _model_file(wh, current)
        same_config = json.loads(current["config_json"] or "{}") == json.loads(cfg_json)
        if path.is_file() and same_config:
            if current["data_version"] == version_of_data:
                return _result(current, True, "same crops and config as the active model", t0)
            trained_on = int(current["n_lesions"] or 0)
            if trained_on and len(crops) <= trained_on * (1 + retrain_growth):
                return _result(current, True, f"the cohort has {len(crops)} lesions, trained on {trained_on}: "
                               f"retrained above {int(trained_on * (1 + retrain_growth))}", t0)
    source = NpyCrops(crop_paths(wh, crops))
    trained = train_encoder(source, cfg, progress=progress)
    folder = (Path(wh.root) / CACHE_DIR if wh.remote else Path(wh.files)) / MODEL_DIR
    folder.mkdir(parents=True, exist_ok=True)
    # a fixed file name inside a temporary folder (a TorchScript archive is named after its file)
    staging = folder / f".training-{os.getpid()}"
    staging.mkdir(exist_ok=True)
    tmp = staging / "encoder.pt"
    meta = {"data_version": version_of_data, "n_lesions": len(crops), "crop_version": _crop_version()}
    sha = save_encoder(trained, tmp, meta)
    mv = f"ssl-{weights_digest(trained)[:12]}"  # the weights' digest: the same model in any process
    final = folder / f"{mv}.pt"
    os.replace(f"{tmp}.json", f"{final}.json")
    os.replace(tmp, final)
    staging.rmdir()
    if wh.remote:  # the sidecar first: a reader finding the model finds its settings
        wh.objects.write_bytes(f"{MODEL_DIR}/{final.name}.json", Path(f"{final}.json").read_bytes())
        wh.objects.write_bytes(f"{MODEL_DIR}/{final.name}", final.read_bytes())
    emb = load_embedder(final)
    row = {"model_version": mv, "source": "trained", "path": f"{MODEL_DIR}/{final.name}", "file_sha256": sha,
           "dim": emb.dim, "input_size": emb.input_size, "channels": emb.channels, "intensity": emb.intensity,
           "config_json": cfg_json, "data_version": version_of_data, "n_lesions": len(crops),
           "epochs": trained.epochs, "train_s": round(trained.elapsed_s, 2), "stopped_early": trained.stopped_early,
           "loss_curve": [float(x) for x in trained.loss_curve], "active": True}
    _activate(wh, row)
    reason = ("forced" if force else "no model yet" if current is None
              else f"replaces {current['model_version']} (config or cohort changed)")
    return _result(row, False, reason, t0)


def load_active_embedder(wh: Warehouse, con: Any = None) -> tuple[Any, dict[str, Any]]:
    """The active model, loaded (:class:`~imaging_assets.features.embedder.Embedder`), and its row.

    Raises
    ------
    RuntimeError
        No model yet (materialize ``embedding_model``), or its file is gone or changed since registration.
    """
    from imaging_assets.features.embedder import load_embedder

    if con is None:
        with wh.connect(read_only=True) as c:
            return load_active_embedder(wh, c)
    row = active_model(con) if _has_table(con, "embedding_models") else None
    if row is None:
        raise RuntimeError("no embedding model yet: materialize embedding_model")
    path = _model_file(wh, row)
    try:
        emb = load_embedder(path, input_size=row["input_size"], channels=row["channels"], intensity=row["intensity"])
    except ValueError as exc:
        raise RuntimeError(f"embedding model {row['model_version']}: {exc}") from exc
    if emb.sha256 != row["file_sha256"]:
        raise RuntimeError(f"{path}: the model file changed since it was registered as {row['model_version']} "
                           "(sha256 differs): materialize embedding_model to register it again")
    return emb, row


# ------------------------------------------------------------------------------------------- embeddings
@dataclass(frozen=True)
class EmbeddingsResult:
    """One ``lesion_embeddings`` build."""

    model_version: str
    dim: int
    rows: int
    embedded: int
    inserted: int
    updated: int
    deleted: int
    unchanged: int
    table_version: int | None
    index: str
    embed_s: float
    lesions_per_s: float | None
    elapsed_s: float
    excluded: list[dict[str, Any]] = field(default_factory=list)
    retention: dict[str, Any] = field(default_factory=dict)


def embed_crops(embedder: Any, paths: Sequence[Path], batch_size: int = 64) -> np.ndarray:
    """Embeddings of the crops in ``paths`` (read one batch at a time), ``(n, dim)`` float32."""
    source = NpyCrops(paths)
    out = np.zeros((len(source), embedder.dim), np.float32)
    for start in range(0, len(source), batch_size):
        out[start:start + batch_size] = embedder.embed(source.batch(start, start + batch_size), batch_size)
    return out


def embeddings_frame(lance_uri: str) -> tuple[Any, np.ndarray | None]:
    """The Lance ``lesion_embeddings`` table as (Arrow table sorted by id, float32 matrix), or (None, None)."""
    from imaging_assets.stages.vectors import vectors_frame
    from imaging_assets.store.lance import EMBEDDING_TABLE

    return vectors_frame(lance_uri, EMBEDDING_TABLE)


def build_lesion_embeddings(wh: Warehouse, batch_size: int = 64,
                            exact_threshold: int | None = None) -> EmbeddingsResult:
    """Embed the new or changed crops with the active model and sync the Lance table (module docstring).

    Raises
    ------
    RuntimeError
        No embedding model yet.
    """
    from imaging_assets.stages.reproducibility import lesion_spaces
    from imaging_assets.stages.vectors import apply_version_retention
    from imaging_assets.store.lance import EMBEDDING_TABLE, sync_vectors

    t0 = time.perf_counter()
    with wh.connect() as con:
        ensure_schema(con)
        emb, model = load_active_embedder(wh, con)
        crops = _ok_crops(con, wh)
        lesions = {r["lesion_id"]: r for r in table_rows(con, "lesions") if r["extractable"]}
        spaces = lesion_spaces(con)
        clusters: dict[str, int] = dict(con.execute(
            "SELECT c.lesion_id, c.cluster FROM phenotype_clusters c JOIN radiomics_provenance p USING (lesion_id) "
            "WHERE c.space = p.space").fetchall()) if _has_table(con, "phenotype_clusters") else {}
        state = {r["lesion_id"]: (r["content_hash"], r["model_version"]) for r in table_rows(con, "embedding_state")}
    mv = model["model_version"]
    tbl, mat = embeddings_frame(wh.lance_uri)
    stored: dict[str, np.ndarray] = {}
    if tbl is not None and mat is not None and mat.shape[1] == emb.dim:
        versions = tbl.column("feature_set_version").to_pylist()
        stored = {lid: mat[i] for i, lid in enumerate(tbl.column("lesion_id").to_pylist()) if versions[i] == mv}
    todo = [lid for lid, h in crops if not (lid in stored and state.get(lid) == (h, mv))]
    t1 = time.perf_counter()
    wanted = set(todo)
    fresh = (embed_crops(emb, crop_paths(wh, [c for c in crops if c[0] in wanted]), batch_size) if todo
             else np.zeros((0, emb.dim)))
    embed_s = time.perf_counter() - t1
    vectors = {**stored, **dict(zip(todo, fresh))}
    excluded = [{"lesion_id": lid, "reason": "no crop (see lesion_crops)"} for lid in sorted(lesions)
                if lid not in {c for c, _ in crops}]
    rows = []
    for lid, _ in crops:
        les = lesions[lid]
        rows.append({
            "lesion_id": lid, "vector": vectors[lid].astype(np.float32).tolist(), "patient_key": les["patient_key"],
            "study_date": les["study_date"], "modality": les["modality"], "body_part": les["body_part"],
            "roi_name": les["roi_name"], "volume_mm3": les["volume_mm3"],
            "series_instance_uid": les["series_instance_uid"], "feature_set_version": mv,
            "cluster": clusters.get(lid), "space": spaces.get(lid, {}).get("space"),
        })
    report = sync_vectors(wh.lance_uri, rows, dim=emb.dim, exact_threshold=exact_threshold, table_name=EMBEDDING_TABLE)
    hashes = dict(crops)
    with wh.transaction() as con:
        con.execute("DELETE FROM embedding_state")
        if crops:
            con.executemany("INSERT INTO embedding_state VALUES (?, ?, ?)", [[lid, hashes[lid], mv] for lid, _ in crops])
    retention = apply_version_retention(wh, table=EMBEDDING_TABLE)
    return EmbeddingsResult(
        model_version=mv, dim=emb.dim, rows=report.rows, embedded=len(todo), inserted=report.inserted,
        updated=report.updated, deleted=report.deleted, unchanged=report.unchanged, table_version=report.version,
        index=report.index, embed_s=round(embed_s, 3),
        lesions_per_s=round(len(todo) / embed_s, 1) if todo and embed_s > 0 else None,
        elapsed_s=round(time.perf_counter() - t0, 3), excluded=excluded, retention=retention)


@dataclass(frozen=True)
class EmbeddingIntegrity:
    """The ``embeddings_integrity`` check: rows vs crops, and the problems found."""

    rows: int
    expected_rows: int
    problems: list[str]


def embedding_integrity(wh: Warehouse) -> EmbeddingIntegrity:
    """One row per lesion with a crop, no duplicates, finite unit-norm vectors, all of the active model."""
    tbl, mat = embeddings_frame(wh.lance_uri)
    with wh.connect(read_only=True) as con:
        expected = {lid for lid, _ in _ok_crops(con, wh)}
        model = active_model(con) if _has_table(con, "embedding_models") else None
    ids = tbl.column("lesion_id").to_pylist() if tbl is not None else []
    problems = []
    if len(ids) != len(set(ids)):
        problems.append("duplicate lesion ids")
    if set(ids) != expected:
        problems.append(f"{len(expected - set(ids))} lesions missing, {len(set(ids) - expected)} extra")
    if mat is not None and mat.size:
        if not np.isfinite(mat).all():
            problems.append("non-finite embedding values")
        elif np.abs(np.linalg.norm(mat, axis=1) - 1).max() > 1e-3:
            problems.append("embeddings not L2-normalised")
    if tbl is not None and len(tbl) and model is not None:
        versions = set(tbl.column("feature_set_version").to_pylist())
        if versions != {model["model_version"]}:
            problems.append(f"model versions {sorted(map(str, versions))} differ from the active "
                            f"{model['model_version']}")
    return EmbeddingIntegrity(rows=len(ids), expected_rows=len(expected), problems=problems)


# -------------------------------------------------------------------------------------------- new lesion
def query_embedding(wh: Warehouse, image: Any, mask: Any, modality: str | None) -> tuple[np.ndarray, str]:
    """The embedding of a new lesion (SimpleITK image + mask) with the active model, and the model version."""
    from imaging_assets.features.crops import lesion_crop

    emb, model = load_active_embedder(wh)
    return emb.embed(lesion_crop(image, mask, modality)[None])[0], model["model_version"]
