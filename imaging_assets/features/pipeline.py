"""From linked segmentations to lesion rows and extraction jobs: the code behind the ``features`` assets
and ``imaging-assets extract`` (one code path for both).

* :func:`lesion_rows` decodes every linked segmentation onto its series grid (in a process pool) and
  returns one row per lesion (:data:`~imaging_assets.dicom.records.LESION_FIELDS`), masks not kept: rows carry
  counts, statuses and a source fingerprint, so an unchanged segmentation is not decoded again on the next run.
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

from imaging_assets.dicom.records import NRRD_SUFFIXES, VOLUME_SUFFIXES
from imaging_assets.features.extract import ExtractionJob, default_workers
from imaging_assets.features.lesions import LesionMask, load_lesions
from imaging_assets.features.params import ExtractionSettings, extraction_settings
from imaging_assets.features.volumes import load_series_image

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class LesionOptions:
    """How segments become lesions (part of every lesion's source fingerprint)."""

    split_components: bool = False
    fractional_threshold: float = 0.5
    roi_mapping: tuple[tuple[str, str], ...] | None = None
    #: Resample NIfTI / NRRD masks whose geometry does not belong to their image instead of refusing them
    #: (:func:`~imaging_assets.features.lesions.check_mask_geometry`).
    resample_mask: bool = False


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
    if options.resample_mask:  # only when set, so fingerprints made before the option still hold
        h.update(b"resample_mask")
    return h.hexdigest()[:20]


def mask_centroid_mm(mask: sitk.Image | None) -> list[float] | None:
    """Centre of mass of a 0/1 mask in patient coordinates (mm); None for an empty or missing mask."""
    import numpy as np

    if mask is None:
        return None
    zyx = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)
    if zyx.size == 0:
        return None
    mean_xyz = zyx.mean(axis=0)[::-1]
    return [float(v) for v in mask.TransformContinuousIndexToPhysicalPoint([float(v) for v in mean_xyz])]


def _row(les: LesionMask, series: Mapping[str, Any], fingerprint: str) -> dict[str, Any]:
    return {
        "lesion_id": les.lesion_id,
        "series_key": les.series_key,
        "seg_key": les.seg_key,
        "series_instance_uid": series.get("series_instance_uid"),
        "study_instance_uid": series.get("study_instance_uid"),
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
        "centroid_mm": mask_centroid_mm(les.mask),
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
        resample_mask=options.resample_mask,
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
    for seg in sorted(segmentation_rows, key=lambda r: r.get("path") or ""):
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
    return _one_row_per_lesion(rows, {s["seg_key"]: s.get("path") or "" for s in segmentation_rows}), len(todo)


def _one_row_per_lesion(rows: list[dict[str, Any]], seg_paths: Mapping[str, str]) -> list[dict[str, Any]]:
    """Copies of one SEG/RTSTRUCT instance (same SOPInstanceUID, e.g. exported twice) give the same lesion
    ids: keep one row per lesion, a decodable one first, then the copy with the first path."""
    best: dict[str, dict[str, Any]] = {}
    for r in sorted(rows, key=lambda r: (r["status"] not in ("ok", "series_flagged"), seg_paths.get(r["seg_key"], ""))):
        if r["lesion_id"] in best:
            logger.warning("lesion %s: %s is another copy of %s; counted once", r["lesion_id"],
                           seg_paths.get(r["seg_key"]), seg_paths.get(best[r["lesion_id"]]["seg_key"]))
            continue
        best[r["lesion_id"]] = r
    return sorted(best.values(), key=lambda r: r["lesion_id"])


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
            resample_mask=self.options.resample_mask,
        )
        for les in lesions:
            if les.component == self.component:
                if les.mask is None or les.status not in ("ok",):
                    raise ValueError(f"{seg.get('path')}: segment {self.segment_number} component "
                                     f"{self.component}: {les.status}: {les.reason}")
                return image, les.mask, 1
        raise ValueError(f"{seg.get('path')}: segment {self.segment_number} component {self.component} not found")


def extraction_jobs(
    lesions: Iterable[Mapping[str, Any]],
    series_rows: Sequence[Mapping[str, Any]],
    segmentation_rows: Sequence[Mapping[str, Any]],
    params_override: str | Path | None = None,
    options: LesionOptions = LesionOptions(),
) -> list[tuple[ExtractionJob, ExtractionSettings]]:
    """One (job, settings) per extractable lesion, sorted by series so workers reuse loaded images.

    The settings of every modality are resolved and validated first (:func:`extraction_settings`), so a
    bad parameter file raises here, naming the file and the key, before anything is extracted or stored.
    """
    series_by_key = {s["series_key"]: s for s in series_rows}
    seg_by_key = {s["seg_key"]: s for s in segmentation_rows}
    todo = [les for les in sorted(lesions, key=lambda r: (r["series_key"], r["lesion_id"])) if les.get("extractable")]
    settings = {m: extraction_settings(m, params_override)
                for m in sorted({series_by_key[les["series_key"]].get("modality") or "" for les in todo})}
    jobs = []
    for les in todo:
        series = series_by_key[les["series_key"]]
        chosen = settings[series.get("modality") or ""]
        loader = SeriesLesionLoader(dict(series), dict(seg_by_key[les["seg_key"]]),
                                    int(les["segment_number"]), int(les["component"]), options)
        jobs.append((ExtractionJob(les["lesion_id"], loader, params=chosen.params), chosen))
    return jobs


def split_feature_name(name: str) -> tuple[str, str, str]:
    """``'log-sigma-1-0-mm-3D_glcm_Idm'`` -> ``('log-sigma-1-0-mm-3D', 'glcm', 'Idm')``."""
    image_type, feature_class, feature = name.split("_", 2)
    return image_type, feature_class, feature


# ------------------------------------------------------------------------------- one lesion, no warehouse
def _is_volume(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(VOLUME_SUFFIXES)


def resolve_inputs(image: str | Path, mask: str | Path, modality: str | None = None) -> tuple[dict, dict]:
    """Series row and linked segmentation row for an image (DICOM folder, NIfTI, NRRD) and a mask
    (DICOM SEG, RTSTRUCT, NIfTI, NRRD), built by the same discovery code the assets use.

    Raises
    ------
    ValueError
        Naming the file and the problem (no series, several series, unlinkable mask, ...).
    """
    import csv
    import tempfile

    from imaging_assets.dicom.crawl import crawl
    from imaging_assets.dicom.segmentations import link_segmentations, read_manifest
    from imaging_assets.dicom.series import assemble_series

    image, mask = Path(image), Path(mask)
    for p in (image, mask):
        if not p.exists():
            raise ValueError(f"{p}: no such file or folder")
    if _is_volume(image):
        if not _is_volume(mask):
            raise ValueError(f"{mask}: a NIfTI/NRRD image needs a NIfTI/NRRD mask (DICOM SEG/RTSTRUCT need "
                             "the DICOM image series)")
        with tempfile.TemporaryDirectory() as tmp:
            manifest = Path(tmp) / "manifest.csv"
            with open(manifest, "w", newline="") as fh:
                csv.writer(fh).writerows([["image_path", "mask_path", "patient_id", "modality"],
                                          [str(image.resolve()), str(mask.resolve()), "", modality or "CT"]])
            series_rows, seg_rows = read_manifest(manifest, require_same_grid=False)
        if not series_rows:
            raise ValueError(f"{image}: {seg_rows[0]['unlinked_reason'] if seg_rows else 'could not be read'}")
        return series_rows[0], seg_rows[0]
    if not image.is_dir():
        raise ValueError(f"{image}: expected a folder of one DICOM series, a NIfTI or an NRRD file")
    roots = [str(image)] + ([] if _is_volume(mask) else [str(mask)])
    result = crawl(roots, workers=1)
    inside = os.path.join(os.path.abspath(image), "")  # the crawl records absolute paths
    images = [r for r in result.records if r["kind"] == "image" and os.path.abspath(r["path"]).startswith(inside)]
    series = assemble_series(images)
    if not series:
        why = "; ".join(f"{q['path']}: {q['message']}" for q in result.quarantined[:3])
        raise ValueError(f"{image}: no DICOM image series found" + (f" ({why})" if why else ""))
    if _is_volume(mask):
        if len(series) != 1:
            raise ValueError(f"{image}: holds {len(series)} series; point --image at one series")
        s = series[0]
        seg = {"seg_key": hashlib.sha1(str(mask.resolve()).encode()).hexdigest()[:16], "path": str(mask),
               "kind": "nrrd" if mask.name.lower().endswith(NRRD_SUFFIXES) else "nifti",
               "sop_instance_uid": None, "series_instance_uid": None, "frame_of_reference_uid": None,
               "patient_key": s.get("patient_key"), "segmentation_type": None, "n_segments": None,
               "segment_numbers": [], "segment_labels": [], "image_path": None,
               "linked_series_key": s["series_key"], "link_rule": "manifest", "unlinked_reason": None}
        return s, seg
    mask_abs = os.path.abspath(mask)
    seg_files = [r for r in result.records
                 if r["kind"] in ("seg", "rtstruct") and os.path.abspath(r["path"]) == mask_abs]
    if not seg_files:
        why = next((q["message"] for q in result.quarantined if os.path.abspath(q["path"]) == mask_abs),
                   "not a SEG or RTSTRUCT")
        raise ValueError(f"{mask}: {why}")
    seg = link_segmentations(seg_files, series)[0]
    if not seg["linked_series_key"]:
        raise ValueError(f"{mask}: does not link to the series in {image}: {seg['unlinked_reason']}")
    return next(s for s in series if s["series_key"] == seg["linked_series_key"]), seg


def choose_segment(seg: Mapping[str, Any], label: int | None = None, segment: str | None = None) -> int:
    """The segment number picked by ``label`` (number) or ``segment`` (raw or harmonised name)."""
    from imaging_assets.features.lesions import harmonise_roi_name

    numbers = [int(n) for n in seg.get("segment_numbers") or []]
    labels = list(seg.get("segment_labels") or [])
    listing = ", ".join(f"{n}={labels[i] if i < len(labels) else '?'}" for i, n in enumerate(numbers)) or "none listed"
    if label is not None:
        if numbers and label not in numbers:
            raise ValueError(f"{seg['path']}: no segment/label {label} (available: {listing})")
        return int(label)
    if segment is not None:
        wanted = segment.strip().lower()
        for i, n in enumerate(numbers):
            name = labels[i] if i < len(labels) else ""
            if name.strip().lower() == wanted:
                return n
        matches = [n for i, n in enumerate(numbers) if i < len(labels)
                   and harmonise_roi_name(labels[i]).lower() == wanted]
        if len(matches) == 1:
            return matches[0]
        raise ValueError(f"{seg['path']}: no single segment named {segment!r} (available: {listing})")
    if len(numbers) == 1:
        return numbers[0]
    if not numbers:
        return 1
    raise ValueError(f"{seg['path']}: {len(numbers)} segments; choose one with --label or --segment ({listing})")


def extract_one(image: str | Path, mask: str | Path, label: int | None = None, segment: str | None = None,
                params: str | Path | None = None, modality: str | None = None, resample_mask: bool = False):
    """Extract one lesion from files, through exactly the asset's path (loader + cropped extraction).

    Parameters
    ----------
    image, mask : str or pathlib.Path
        A DICOM series folder, NIfTI or NRRD image; a DICOM SEG, RTSTRUCT, NIfTI or NRRD mask.
    label, segment : optional
        Which segment (see :func:`choose_segment`).
    params : str or pathlib.Path, optional
        pyradiomics YAML (or preset name); default the modality's preset.
    modality : str, optional
        Used when the image does not say (NIfTI / NRRD).
    resample_mask : bool
        A NIfTI / NRRD mask on another grid whose geometry does not belong to the image (another scan:
        rotated, shifted away, lesion outside the image; see
        :func:`~imaging_assets.features.lesions.check_mask_geometry`) is refused by default; True
        resamples it onto the image grid anyway. A mask on the image's grid (within float tolerance), or
        one that belongs (a PET mask on its CT), needs no option.

    Returns
    -------
    ExtractionOutcome
        ``features`` keyed by pyradiomics' own names, or ``error``.

    Raises
    ------
    MaskGeometryError
        (a ``ValueError``) The mask does not belong to the image; the message names both and the mismatch.
    ValueError
        The inputs cannot be resolved (no series, unlinkable mask, no such segment, ...).
    """
    from imaging_assets.features.extract import run_job

    lid, series, loader = lesion_loader(image, mask, label, segment, modality, resample_mask)
    p = extraction_settings(series.get("modality") or modality, params).params
    return run_job(ExtractionJob(lid, loader, params=p))


def lesion_loader(image: str | Path, mask: str | Path, label: int | None = None, segment: str | None = None,
                  modality: str | None = None, resample_mask: bool = False) -> tuple[str, dict, SeriesLesionLoader]:
    """One lesion of files as the pipeline loads it: (lesion id, series row, loader giving image and mask).
    Parameters and errors as :func:`extract_one`."""
    from imaging_assets.features.lesions import check_volume_mask, lesion_id

    series, seg = resolve_inputs(image, mask, modality)
    number = choose_segment(seg, label, segment)
    if not resample_mask:
        check_volume_mask(seg, series, image_name=str(image))
    lid = lesion_id(str(series.get("series_instance_uid") or series["series_key"]),
                    str(seg.get("sop_instance_uid") or seg["seg_key"]), number, 0)
    return lid, series, SeriesLesionLoader(dict(series), dict(seg), number,
                                           options=LesionOptions(resample_mask=resample_mask))
