"""Pseudonymisation keys of a warehouse: refuse a run with another key, and rotate the key (``rekey``).

Every step that computes patient keys (the catalog, segmentations from manifests, the outcomes loader) first
calls :func:`check_key`: the warehouse stores the **fingerprint** of the key its patient keys were made with
(:func:`imaging_assets.dicom.pseudonym.key_fingerprint`; table ``pseudonym_keys``), and a run with another
key is refused (:class:`~imaging_assets.errors.PseudonymKeyMismatch`) before anything is written: with
another key the changed files would get new patient keys, one series two, and outcomes would keep the old
ones. A warehouse without patient keys records the fingerprint of the key it is first used with.

Rotating the key (:func:`rekey`, ``imaging-assets rekey``). The raw patient ids are not stored anywhere, and
an HMAC cannot be inverted, so the new keys are re-derived **from the sources**: every catalogued DICOM file
(header only, the same reader as discovery), every manifest and every outcome file is read again, and each
raw id gives the pair (old key, new key). The old key is needed to know which stored key belongs to which
id (and is checked against the stored fingerprint); nothing new is stored in between (no raw id, no
reversible intermediate). The old-to-new map is then applied to every ``patient_key`` / ``*_patient_key``
column of every DuckDB table (catalog, series, segmentations, lesions, outcomes, clusters, cohorts, ...)
and the new fingerprint recorded, **in one transaction**; then the Lance vectors are re-synced from DuckDB
(the vectors stage: they are derived data, so an interrupted sync is repaired by the next vectors run). A
stored key that no source gives any more (a file deleted since, an outcome file gone) stops the rekey,
naming the tables and counts, unless ``forget_unmapped`` (those keys are then set to NULL, and rows whose
primary key holds one, such as an outcome row of a patient no source gives any more, deleted). Audit rows are
history and keep what they recorded.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imaging_assets.dicom.pseudonym import key_fingerprint, patient_key, pseudonym_secret
from imaging_assets.errors import PseudonymKeyError, PseudonymKeyMismatch
from imaging_assets.store.keyring import (
    any_patient_keys,
    current_fingerprint,
    record_fingerprint,
    replace_patient_keys,
    stored_patient_keys,
)
from imaging_assets.store.warehouse import Warehouse, transaction

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RekeyResult:
    """One key rotation: patients re-keyed, rows changed per column, sources read, keys set to NULL."""

    patients: int
    rows_changed: dict[str, int]
    files_read: int
    outcome_files_read: int
    forgotten: int
    old_fingerprint: str | None
    new_fingerprint: str
    lance_synced: bool
    elapsed_s: float
    notes: list[str] = field(default_factory=list)


def _key_file_in_warehouse(wh: Warehouse) -> Path | None:
    import os

    from imaging_assets import settings
    from imaging_assets.dicom.pseudonym import ENV_VAR

    if os.environ.get(ENV_VAR):
        return None
    path = settings.pseudonym_key_file().resolve()
    root = Path(wh.root).resolve()
    return path if path == root or root in path.parents else None


def check_key(wh: Warehouse, secret: str | None = None) -> str:
    """The pseudonymisation secret to use on ``wh``, after checking it is the warehouse's key.

    Records the key's fingerprint when the warehouse has none and holds no patient key yet.

    Raises
    ------
    PseudonymKeyMismatch
        The key's fingerprint is not the one stored in the warehouse (nothing is written).
    PseudonymKeyError
        No usable key (see :func:`~imaging_assets.dicom.pseudonym.pseudonym_secret`), the key file lies in
        the warehouse, or the warehouse holds patient keys but no fingerprint (made before fingerprints).
    """
    resolved = pseudonym_secret(secret)
    inside = _key_file_in_warehouse(wh)
    if inside is not None:
        raise PseudonymKeyError(f"pseudonymisation key file {inside} lies inside the warehouse {wh.root}: whoever "
                                "reads the warehouse would get the key; move it and set "
                                "IMAGING_ASSETS_PSEUDONYM_KEY_FILE")
    fp = key_fingerprint(resolved)
    if wh.duckdb_path.exists():
        with wh.connect(read_only=True) as con:
            stored = current_fingerprint(con)
            legacy = stored is None and any_patient_keys(con)
        if stored == fp:
            return resolved
        if stored is not None:
            raise PseudonymKeyMismatch(
                f"{wh.duckdb_path}: the configured pseudonymisation key (fingerprint {fp[:12]}…) is not the key "
                f"this warehouse's patient keys were made with (fingerprint {stored[:12]}…): with it the same "
                "patients would get new keys and outcomes would no longer join to images. Nothing was written. "
                "Configure the original key (IMAGING_ASSETS_PSEUDONYM_KEY or the key file), or rotate the "
                "warehouse to the new key with `imaging-assets rekey` (old key in IMAGING_ASSETS_OLD_PSEUDONYM_KEY)")
        if legacy:
            raise PseudonymKeyError(
                f"{wh.duckdb_path} holds patient keys but no key fingerprint (made before key fingerprints), so "
                "it cannot tell whether the configured key made them. Nothing was written. Run `imaging-assets "
                "rekey` with IMAGING_ASSETS_OLD_PSEUDONYM_KEY set to the key used so far (the public development "
                "key if none was set); or delete the warehouse and build it again")
    with wh.connect() as con, transaction(con):
        if current_fingerprint(con) is None:  # first use (another process may have recorded it meanwhile)
            record_fingerprint(con, fp)
        elif current_fingerprint(con) != fp:
            raise PseudonymKeyMismatch(f"{wh.duckdb_path}: another process recorded a different key fingerprint "
                                       "just now; nothing was written")
    return resolved


#: Where ``imaging-assets rekey`` reads the old key (an environment variable, never a command-line argument).
OLD_KEY_ENV = "IMAGING_ASSETS_OLD_PSEUDONYM_KEY"


def old_key(key_file: str | Path | None = None) -> str:
    """The old key of a rotation: from ``key_file`` (owner-only, as a key file) or :data:`OLD_KEY_ENV`.

    Raises
    ------
    PseudonymKeyError
        Neither gives a key ("give the old key ..."), or the file is unsafe or unreadable.
    """
    import os

    from imaging_assets.dicom.pseudonym import read_key_file

    secret = read_key_file(Path(key_file).expanduser()) if key_file else os.environ.get(OLD_KEY_ENV, "")
    if not secret:
        raise PseudonymKeyError(f"give the old key: {OLD_KEY_ENV}=... or --old-key-file PATH (a secret is never a "
                                "command-line argument)")
    return secret


def _dicom_pairs(rows: Sequence[dict[str, Any]], old: str, new: str) -> tuple[dict[str, str], int, list[str]]:
    """Old key -> new key from every catalogued file still readable (header only)."""
    from imaging_assets.dicom.headers import read_file_record

    pairs: dict[str, str] = {}
    changed: list[str] = []
    read = 0
    for r in rows:
        rec_old, _ = read_file_record(r["path"], r["size"], r["mtime_ns"], old)
        if rec_old is None:
            continue
        read += 1
        if rec_old["patient_key"] != r["patient_key"]:
            changed.append(r["path"])
            continue
        rec_new, _ = read_file_record(r["path"], r["size"], r["mtime_ns"], new)
        if rec_old["patient_key"] is not None and rec_new is not None:
            pairs[rec_old["patient_key"]] = rec_new["patient_key"]
    return pairs, read, changed


def _manifest_pairs(manifests: Sequence[str | Path], old: str, new: str) -> dict[str, str]:
    from imaging_assets.dicom.segmentations import read_manifest

    pairs: dict[str, str] = {}
    for m in manifests:
        if not Path(m).exists():
            continue
        _, segs_old = read_manifest(Path(m), secret=old)
        _, segs_new = read_manifest(Path(m), secret=new)
        for a, b in zip(segs_old, segs_new):
            if a["patient_key"] is not None:
                pairs[a["patient_key"]] = b["patient_key"]
    return pairs


def _outcome_pairs(files: Sequence[str], old: str, new: str) -> tuple[dict[str, str], int]:
    from imaging_assets.analysis.outcomes import OutcomeFileError, read_outcome_file, validate_row

    pairs: dict[str, str] = {}
    read = 0
    for f in files:
        try:
            table = read_outcome_file(Path(f))
        except (OutcomeFileError, OSError):
            continue
        read += 1
        for raw in table.rows:
            values, _ = validate_row(raw, table.date_orders, table.columns)
            pid = values.get("patient_id")
            if pid is not None:
                pairs[patient_key(pid, old)] = patient_key(pid, new)
    return pairs, read


def rekey(wh: Warehouse, old_secret: str, new_secret: str | None = None,
          manifests: Sequence[str | Path] = (), forget_unmapped: bool = False,
          sync_lance: bool = True) -> RekeyResult:
    """Re-derive every stored patient key with the new key, in one transaction (see the module docstring).

    Parameters
    ----------
    old_secret
        The key the warehouse was built with (checked against the stored fingerprint, when there is one).
    new_secret
        The new key; default the configured one (environment or key file).
    manifests
        NIfTI/NRRD manifests whose rows carry patient ids (as configured for discovery).
    forget_unmapped
        Set stored keys no source gives any more to NULL instead of refusing.
    sync_lance
        Re-sync the Lance vectors from DuckDB afterwards (when a robust feature set exists).

    Raises
    ------
    PseudonymKeyError
        The old key is not the warehouse's, files changed since the last discovery run, or stored keys have
        no source any more (and not ``forget_unmapped``). Nothing was written.
    """
    t0 = time.perf_counter()
    new = pseudonym_secret(new_secret)
    old_fp, new_fp = key_fingerprint(old_secret), key_fingerprint(new)
    if not wh.duckdb_path.exists():
        raise PseudonymKeyError(f"{wh.duckdb_path} does not exist: nothing to rekey")
    with wh.connect(read_only=True) as con:
        stored_fp = current_fingerprint(con)
        stored = stored_patient_keys(con)
        files = [dict(zip(("path", "size", "mtime_ns", "patient_key"), r)) for r in con.execute(
            "SELECT path, size, mtime_ns, patient_key FROM dicom_files WHERE patient_key IS NOT NULL "
            "AND status = 'active' ORDER BY path").fetchall()]
        has_outcomes = con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = "
                                   "'outcome_files'").fetchall()[0][0]
        outcome_files = [r[0] for r in con.execute(
            "SELECT source_file FROM outcome_files WHERE status <> 'gone' ORDER BY 1").fetchall()] if has_outcomes else []
    if stored_fp is not None and stored_fp != old_fp:
        raise PseudonymKeyError(f"{wh.duckdb_path}: the old key given (fingerprint {old_fp[:12]}…) is not the key "
                                f"this warehouse was built with (fingerprint {stored_fp[:12]}…); nothing was written")
    if old_fp == new_fp:
        raise PseudonymKeyError("the new key is the old key: nothing to rekey")
    pairs, n_read, changed = _dicom_pairs(files, old_secret, new)
    if changed:
        raise PseudonymKeyError(
            f"{len(changed)} catalogued file(s) no longer give their stored patient key with the old key (e.g. "
            f"{changed[0]}): changed since the last discovery run, or the old key is wrong. Materialize dicom_files "
            "first; nothing was written")
    pairs.update(_manifest_pairs(manifests, old_secret, new))
    outcome_pairs, n_outcome = _outcome_pairs(outcome_files, old_secret, new)
    pairs.update(outcome_pairs)
    all_keys = set().union(*stored.values()) if stored else set()
    unmapped = {k for k in all_keys if k not in pairs}
    notes: list[str] = []
    if unmapped:
        where = Counter({f"{s}.{t}.{c}": len(keys & unmapped) for (s, t, c), keys in stored.items() if keys & unmapped})
        text = ", ".join(f"{w} ({n})" for w, n in sorted(where.items()))
        if not forget_unmapped:
            raise PseudonymKeyError(
                f"{len(unmapped)} stored patient key(s) come from no readable source any more (files removed or "
                f"changed, outcome files gone), so they cannot be re-derived: {text}. Nothing was written. Run "
                "discovery and the outcomes load first, or pass --forget-unmapped to set them to NULL")
        notes.append(f"{len(unmapped)} patient key(s) without a source set to NULL: {text}")
    mapping: dict[str, str | None] = {k: pairs[k] for k in all_keys if k in pairs}
    mapping.update({k: None for k in unmapped})
    with wh.connect() as con, transaction(con):
        if current_fingerprint(con) != stored_fp:
            raise PseudonymKeyError(f"{wh.duckdb_path}: the key fingerprint changed while rekeying; nothing was written")
        changed_rows = replace_patient_keys(con, mapping)
        record_fingerprint(con, new_fp, patients=len(all_keys) - len(unmapped))
    lance_synced = False
    if sync_lance and any(n for col, n in changed_rows.items() if col == "main.lesions.patient_key"):
        from imaging_assets.errors import NoRobustSetError
        from imaging_assets.stages.vectors import build_lesion_vectors

        try:
            build_lesion_vectors(wh)
            lance_synced = True
        except NoRobustSetError:
            notes.append("no robust feature set yet: no Lance vectors to re-sync")
        from imaging_assets.stages.embeddings import build_lesion_embeddings, embeddings_frame

        if embeddings_frame(wh.lance_uri)[0] is not None:  # the embeddings carry patient keys too (not re-embedded)
            build_lesion_embeddings(wh)
    logger.info("rekeyed %d patients (%d rows) in %s", len(mapping) - len(unmapped), sum(changed_rows.values()),
                wh.duckdb_path)
    return RekeyResult(patients=len(mapping) - len(unmapped), rows_changed={k: v for k, v in changed_rows.items() if v},
                       files_read=n_read, outcome_files_read=n_outcome, forgotten=len(unmapped),
                       old_fingerprint=stored_fp, new_fingerprint=new_fp, lance_synced=lance_synced,
                       elapsed_s=round(time.perf_counter() - t0, 3), notes=notes)
