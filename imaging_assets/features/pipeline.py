"""From linked segmentations to lesion rows and extraction jobs: the code behind the ``features`` assets
and ``imaging-assets extract`` (one code path for both).

* :func:`lesion_rows` decodes every linked segmentation onto its series grid (in a process pool) and
  returns one row per lesion (:data:`LESION_FIELDS`), masks not kept: rows carry counts, statuses and a
  source fingerprint, so an unchanged segmentation is not decoded again on the next run.
* :class:`SeriesLesionLoader` is the picklable loader an :class:`~imaging_assets.features.extract.ExtractionJob`
  carries: inside the worker it loads the series image, decodes the one lesion and hands both to the
  cropped pyradiomics extraction.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from imaging_assets.dicom.records import LESION_FIELDS  # noqa: F401  (re-exported)
from imaging_assets.features.extract import ExtractionJob, default_workers
from imaging_assets.features.lesions import LesionMask, load_lesions
from imaging_assets.features.params import params_hash, preset_for_modality, resolve_params
from imaging_assets.features.volumes import load_series_image

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class LesionOptions:
    """How segments become lesions (part of every lesion's source fingerprint)."""

    split_components: bool = False
    fractional_threshold: float = 0.5
    roi_mapping: tuple[tuple[str, str], ...] | None = None


def source_fingerprint(series: Mapping[str, Any], segmentation: Mapping[str, Any], options: LesionOptions) -> str:
    """sha1 of the series files, the segmentation file (path, size, mtime), the series' geometry flags
    and the lesion options.

    A file that changes on disk, or other options, give another fingerprint: its lesions are decoded and
    extracted again; anything else is reused.
    """
    h = hashlib.sha1()
    paths = list(series.get("files") or []) + [segmentation.get("path") or "", segmentation.get("image_path") or ""]
    for p in paths:
        try:
            st = os.stat(p) if p else None
        except OSError:
            st = None
        h.update(f"{p}\0{st.st_size if st else -1}\0{st.st_mtime_ns if st else -1}\n".encode("utf-8", "surrogateescape"))
    h.update(json.dumps([series.get("flags"), segmentation.get("segment_numbers"), options.split_components,
                         options.fractional_threshold, options.roi_mapping], default=str).encode())
    return h.hexdigest()[:20]


def _row(les: LesionMask, series: Mapping[str, Any], fingerprint: str) -> dict[str, Any]:
    return {
        "lesion_id": les.lesion_id,
        "series_key": les.series_key,
        "seg_key": les.seg_key,
        "series_instance_uid": series.get("series_instance_uid"),
        "patient_key": series.get("patient_key"),
        "modality": series.get("modality"),
        "study_date": series.get("study_date"),
        "body_part": series.get("body_part"),
        "segment_number": int(les.segment_number),
        "raw_label": les.raw_label,
        "roi_name": les.roi_name,
        "component": int(les.component),
        "n_voxels": int(les.n_voxels),
        "volume_mm3": float(les.volume_mm3),
        "status": les.status,
        "reason": les.reason,
        "notes": list(les.notes),
        "extractable": les.status == "ok" and bool(series.get("usable")),
        "source_fingerprint": fingerprint,
    }


def lesions_of_segmentation(series: Mapping[str, Any], segmentation: Mapping[str, Any],
                            options: LesionOptions = LesionOptions()) -> list[dict[str, Any]]:
    """Lesion rows of one linked segmentation (decodes its masks on the series grid; never raises)."""
    fingerprint = source_fingerprint(series, segmentation, options)
    lesions = load_lesions(
        dict(segmentation), dict(series), image=None, split_components=options.split_components,
        fractional_threshold=options.fractional_threshold,
        roi_mapping=list(options.roi_mapping) if options.roi_mapping else None,
    )
    rows = [_row(les, series, fingerprint) for les in lesions]
    if not series.get("usable"):
        reason = "series failed geometry QC: " + "; ".join(series.get("flag_details") or series.get("flags") or [])
        for r in rows:
            if r["status"] == "ok":
                r["status"], r["reason"] = "series_flagged", reason
    return rows


def _lesions_task(args: tuple[dict, dict, LesionOptions]) -> list[dict[str, Any]]:
    series, segmentation, options = args
    return lesions_of_segmentation(series, segmentation, options)


def lesion_rows(
    series_rows: Sequence[Mapping[str, Any]],
    segmentation_rows: Sequence[Mapping[str, Any]],
    options: LesionOptions = LesionOptions(),
    previous: Sequence[Mapping[str, Any]] = (),
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """Lesion rows for every linked segmentation, reusing ``previous`` rows whose fingerprint still holds.

    Returns
    -------
    (rows, decoded)
        All lesion rows (sorted by lesion_id) and how many segmentations were decoded this time.
    """
    series_by_key = {s["series_key"]: s for s in series_rows}
    prev_by_seg: dict[str, list[Mapping[str, Any]]] = {}
    for r in previous:
        prev_by_seg.setdefault(r["seg_key"], []).append(r)
    rows: list[dict[str, Any]] = []
    todo: list[tuple[dict, dict, LesionOptions]] = []
    for seg in segmentation_rows:
        series = series_by_key.get(seg.get("linked_series_key") or "")
        if series is None:
            continue
        fp = source_fingerprint(series, seg, options)
        old = prev_by_seg.get(seg["seg_key"], [])
        if old and all(r["source_fingerprint"] == fp for r in old):
            rows.extend(dict(r) for r in old)
        else:
            todo.append((dict(series), dict(seg), options))
    n = default_workers() if workers is None else max(1, workers)
    if n == 1 or len(todo) < 4:
        for i, task in enumerate(todo, 1):
            rows.extend(_lesions_task(task))
            if progress:
                progress(i, len(todo))
    else:
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=n, mp_context=ctx) as pool:
            for i, result in enumerate(pool.map(_lesions_task, todo, chunksize=2), 1):
                rows.extend(result)
                if progress:
                    progress(i, len(todo))
    rows.sort(key=lambda r: r["lesion_id"])
    return rows, len(todo)


# ------------------------------------------------------------------------------------------- extraction
_IMAGE_CACHE: dict[str, sitk.Image] = {}


def _cached_series_image(series: Mapping[str, Any]) -> sitk.Image:
    """The series image, kept for the next lesion of the same series in this worker (one entry)."""
    key = series["series_key"]
    if key not in _IMAGE_CACHE:
        _IMAGE_CACHE.clear()
        _IMAGE_CACHE[key] = load_series_image(dict(series))
    return _IMAGE_CACHE[key]


@dataclass(frozen=True)
class SeriesLesionLoader:
    """Picklable loader: image of a series and one lesion's mask, decoded inside the worker."""

    series: dict[str, Any]
    segmentation: dict[str, Any]
    segment_number: int
    component: int = 0
    options: LesionOptions = LesionOptions()

    def __call__(self) -> tuple[sitk.Image, sitk.Image, int]:
        image = _cached_series_image(self.series)
        seg = dict(self.segmentation)
        labels = list(seg.get("segment_labels") or [])
        numbers = list(seg.get("segment_numbers") or [])
        if self.segment_number in numbers:
            seg["segment_labels"] = [labels[numbers.index(self.segment_number)]] if labels else []
        seg["segment_numbers"] = [self.segment_number]
        lesions = load_lesions(
            seg, dict(self.series), image=image, split_components=self.options.split_components,
            fractional_threshold=self.options.fractional_threshold,
            roi_mapping=list(self.options.roi_mapping) if self.options.roi_mapping else None,
        )
        for les in lesions:
            if les.component == self.component:
                if les.mask is None or les.status not in ("ok",):
                    raise ValueError(f"{seg.get('path')}: segment {self.segment_number} component "
                                     f"{self.component}: {les.status}: {les.reason}")
                return image, les.mask, 1
        raise ValueError(f"{seg.get('path')}: segment {self.segment_number} component {self.component} not found")


def params_for(modality: str | None, override: str | Path | None = None) -> dict[str, Any]:
    """pyradiomics parameters for a modality: the user's YAML when given, else the modality preset."""
    return resolve_params(override if override else preset_for_modality(modality))


def extraction_jobs(
    lesions: Iterable[Mapping[str, Any]],
    series_rows: Sequence[Mapping[str, Any]],
    segmentation_rows: Sequence[Mapping[str, Any]],
    params_override: str | Path | None = None,
    options: LesionOptions = LesionOptions(),
) -> list[tuple[ExtractionJob, str]]:
    """One (job, params hash) per extractable lesion, sorted by series so workers reuse loaded images."""
    series_by_key = {s["series_key"]: s for s in series_rows}
    seg_by_key = {s["seg_key"]: s for s in segmentation_rows}
    params_cache: dict[str | None, dict[str, Any]] = {}
    jobs = []
    for les in sorted(lesions, key=lambda r: (r["series_key"], r["lesion_id"])):
        if not les.get("extractable"):
            continue
        series = series_by_key[les["series_key"]]
        modality = series.get("modality")
        if modality not in params_cache:
            params_cache[modality] = params_for(modality, params_override)
        params = params_cache[modality]
        loader = SeriesLesionLoader(dict(series), dict(seg_by_key[les["seg_key"]]),
                                    int(les["segment_number"]), int(les["component"]), options)
        jobs.append((ExtractionJob(les["lesion_id"], loader, params=params), params_hash(params)))
    return jobs


def split_feature_name(name: str) -> tuple[str, str, str]:
    """``'log-sigma-1-0-mm-3D_glcm_Idm'`` -> ``('log-sigma-1-0-mm-3D', 'glcm', 'Idm')``."""
    image_type, feature_class, feature = name.split("_", 2)
    return image_type, feature_class, feature
