"""Synthetic CT cohort with lesion segmentations, test-retest scans, broken files and outcomes; optionally
MR and PET series of the same lesions (a mixed cohort, several feature spaces).

This is the embedded default dataset (``make demo`` and many tests). Public entry point::

    from imaging_assets.demo.generator import generate_cohort, DemoCohort
    cohort = generate_cohort(out_dir, n_patients=100, seed=0, workers=None)            # CT only
    mixed = generate_cohort(out_dir, n_patients=6, seed=0, modalities=("CT", "MR", "PT"))

Layout written under ``out_dir``::

    dicom/case_<NNNN>/study_<StudyDate>/SE001_CT/IM0001.dcm ...   image series (CT Image Storage)
    dicom/case_<NNNN>/study_<StudyDate>/SE002_CT/...               test-retest series (some patients)
    dicom/case_<NNNN>/study_<StudyDate>/SE101_SEG/SEG0001.dcm      DICOM SEG of series 1 (or
    dicom/case_<NNNN>/study_<StudyDate>/SE101_RTSTRUCT/RS0001.dcm  RTSTRUCT of series 1), SE102_* for 2
    dicom/case_<NNNN>/study_<StudyDate>/SE003_MR/, SE004_PT/       mixed cohorts only: T1 MR, FDG PET
    dicom/case_<NNNN>/study_<StudyDate>/SE103_*/, SE104_*/         ... and their SEG / RTSTRUCT
    outcomes.csv       patient_id, time_months, event, age, sex, stage
    ground_truth.csv   one row per written segment / ROI (never read by the pipeline); mixed cohorts add a
                       last column ``modality``
    manifest.json      seed, n_patients, generator version, file counts, the deliberately broken files
                       (mixed cohorts: ``modalities``, ``n_series_by_modality``)

Folder names carry no identifier (case number and study date only): discovery stores paths, and the
analytic tables must never hold a PatientID, PatientName or birth date.

Rules (all deterministic for a seed; patient ``i`` is drawn from ``numpy.random.default_rng([seed, i])``
and its noise from ``default_rng([seed, i, 1, series])``, so patients are independent):

* the first lesion's phenotype cycles through :data:`~imaging_assets.demo.phantom.PHENOTYPES` with the
  patient index (balanced cohort); further lesions (1-3 per patient) are drawn at random;
* segmentation kind: RTSTRUCT when ``i % 4 == 1`` (25 %), DICOM SEG otherwise;
* test-retest: a second CT series when ``i % 8 in (1, 4)`` (25 %) -- patient shifted by up to 3 mm, slices
  offset by half a slice spacing, new noise, new FrameOfReferenceUID, its own segmentation;
* patient 1's first lesion is a hollow (cavitating) ``necrotic_rim`` lesion in an RTSTRUCT series, so
  RTSTRUCT inner contours (holes) are always present for ``n_patients >= 2``;
* broken files (``n_patients >= 4``): patient 0 gets a text file named ``NOTES.dcm`` inside its CT series
  folder, patient 2 a truncated CT slice (``SE901_CT``) and a CT slice without PixelData (``SE902_CT``),
  patient 3's primary series lacks one middle slice (a lesion-free one where possible);
* outcomes: Weibull proportional hazards on stage, age and the phenotype of the patient's *largest*
  lesion (outer volume by quadrature), with administrative and random censoring;
* mixed cohorts (:mod:`imaging_assets.demo.modalities`): every patient also gets an MR and a PET series in
  the same study, with the patient's segmentation kind and labels, drawn from their own random streams, so
  the CT series, segmentations and outcomes are byte-identical to the CT-only cohort of the same seed
  (only the two tables gain the modality). Broken files and test-retest series stay CT-only.

UIDs are ``2.25.<uuid>`` values whose UUID is a SHA-256 hash of the seed and the object's role (note that
``pydicom.uid.generate_uid(prefix=None, ...)`` ignores ``entropy_srcs`` and is random).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import multiprocessing
import os
import shutil
import time
import uuid
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage

from imaging_assets.demo import modalities as extra
from imaging_assets.demo import phantom
from imaging_assets.demo.dataset import new_dataset, set_slice_plane
from imaging_assets.demo.modalities import ModalityPlan, normalise_modalities
from imaging_assets.demo.phantom import PHENOTYPES, Anatomy, Grid, Lesion

logger = logging.getLogger(__name__)

#: Bump when the generated content changes.
GENERATOR_VERSION = "1.1.0"
MANUFACTURER = "ImagingAssets Demo"
RESCALE_INTERCEPT = -1024
ROWS = COLUMNS = 128

#: log hazard ratios of the outcome model (reference: small_smooth, stage I). Ground-glass (non-solid)
#: lesions are indolent and large solid, heterogeneous or necrotic ones aggressive, as in lung
#: adenocarcinoma; the spread (HR 0.3 to 3.3 against the reference, about 0.2 for ground-glass against
#: solid lesions) is of the size reported for such phenotypes. It is planted so that the 100-patient
#: demo detects it through the phenotype clusters: re-drawing the outcomes of seed 0's patients 300 times
#: with its clusters fixed gave log-rank p < 0.01 in 99.7 % of draws (median p 1.3e-6).
PHENOTYPE_LOG_HR: dict[str, float] = {
    "small_smooth": 0.0,
    "ground_glass": -1.2,
    "spiculated": 0.8,
    "lobulated_heterogeneous": 0.9,
    "necrotic_rim": 1.2,
}
STAGE_LOG_HR: dict[str, float] = {"I": 0.0, "II": 0.4, "III": 0.9, "IV": 1.5}
AGE_LOG_HR_PER_YEAR = 0.02
WEIBULL_SHAPE = 1.3
WEIBULL_SCALE_MONTHS = 40.0

OUTCOME_COLUMNS = ("patient_id", "time_months", "event", "age", "sex", "stage")
GROUND_TRUTH_COLUMNS = (
    "patient_id",
    "lesion_index",
    "phenotype",
    "location",
    "has_hole",
    "study_instance_uid",
    "series_instance_uid",
    "frame_of_reference_uid",
    "is_retest",
    "seg_kind",
    "seg_series_instance_uid",
    "seg_sop_instance_uid",
    "segment_number",
    "segment_label",
    "volume_voxels",
    "volume_mm3",
    "center_x",
    "center_y",
    "center_z",
    "largest_lesion",
)

_FIRST_F = ("JANE", "MARY", "ANNA", "LINDA", "SUSAN", "KAREN", "MARIA", "ELENA", "SARAH", "EMMA")
_FIRST_M = ("JOHN", "JAMES", "ROBERT", "MICHAEL", "DAVID", "PETER", "THOMAS", "PAUL", "MARK", "LUCAS")
_LAST = ("DOE", "SMITH", "JOHNSON", "BROWN", "MILLER", "GARCIA", "MUELLER", "ROSSI", "NOVAK", "JANSEN",
         "KOWALSKI", "DUBOIS")
_LABELS_NUMBERED = ("GTV {n}", "gtv_{n}", "GTV-{n}", "Tumor {n}", "tumour {n}", "Lesion_{n}", "lesion {n}",
                    "GTV{n}")
_LABELS_SINGLE = ("GTVp", "Tumor", "tumour", "Lesion")

RTSTRUCT_RULE = 4  # i % 4 == 1
RETEST_RESIDUES = (1, 4)  # i % 8
HOLE_PATIENT = 1


def demo_uid(*parts: object) -> str:
    """Deterministic ``2.25`` UID from a SHA-256 hash of the given parts.

    Parameters
    ----------
    *parts : object
        Anything with a stable ``str`` (seed, patient index, role, counters).

    Returns
    -------
    str
        A UID of the form ``2.25.<decimal UUID>`` (at most 44 characters).
    """
    digest = hashlib.sha256("|".join(["imaging_assets.demo", *map(str, parts)]).encode()).digest()
    return f"2.25.{uuid.UUID(bytes=digest[:16], version=4).int}"


IMPLEMENTATION_CLASS_UID = demo_uid("implementation", GENERATOR_VERSION)


def _hash_int(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "big")


@dataclass(frozen=True)
class SeriesPlan:
    """One CT series of a patient and its segmentation object."""

    series_index: int
    is_retest: bool
    grid: Grid
    shift: tuple[float, float, float]
    noise_sigma: float
    series_number: int
    series_time: str
    series_instance_uid: str
    frame_of_reference_uid: str
    sop_instance_uids: tuple[str, ...]
    seg_series_number: int
    seg_series_instance_uid: str
    seg_sop_instance_uid: str
    seg_date: str
    seg_time: str

    @property
    def folder(self) -> str:
        """Series folder name."""
        return f"SE{self.series_number:03d}_CT"


@dataclass(frozen=True, eq=False)
class PatientSpec:
    """Everything drawn for one patient before rendering (cheap to compute)."""

    seed: int
    index: int
    patient_id: str
    patient_name: str
    sex: str
    birth_date: str
    age: int
    study_date: str
    study_time: str
    accession_number: str
    study_instance_uid: str
    stage: str
    anatomy: Anatomy
    lesions: tuple[Lesion, ...]
    labels: tuple[str, ...]
    lesion_volumes_mm3: tuple[float, ...]
    seg_kind: str
    series: tuple[SeriesPlan, ...]
    outcome_phenotype: str
    time_months: float
    event: int

    @property
    def case_folder(self) -> str:
        """Patient folder name: a case number, never an identifier (paths are stored by discovery)."""
        return f"case_{self.index + 1:04d}"

    @property
    def study_folder(self) -> str:
        """Study folder name (the study date; no accession number, which identifies the patient)."""
        return f"study_{self.study_date}"

    @property
    def phenotypes(self) -> tuple[str, ...]:
        """Phenotype of each lesion."""
        return tuple(les.phenotype for les in self.lesions)


@dataclass(eq=False)
class RenderedPatient:
    """In-memory images and masks of one patient, exactly as written to DICOM.

    Attributes
    ----------
    spec : PatientSpec
    volumes : list of numpy.ndarray
        One ``(slices, rows, columns)`` int16 HU volume per series (``spec.series`` order), slices in
        ascending patient z (the InstanceNumber order).
    masks : list of list of numpy.ndarray
        ``masks[s][l]``: boolean mask of lesion ``l`` on series ``s``.
    """

    spec: PatientSpec
    volumes: list[np.ndarray]
    masks: list[list[np.ndarray]]


@dataclass
class DemoCohort:
    """Where a generated cohort lives and what it holds."""

    out_dir: Path
    dicom_dir: Path
    outcomes_csv: Path
    ground_truth_csv: Path
    manifest_json: Path
    seed: int
    n_patients: int
    n_files: int
    n_lesions: int
    n_series: int
    n_segmentations: int
    broken: list[dict[str, Any]] = field(default_factory=list)
    elapsed_s: float = 0.0


def _fmt_date(d: date) -> str:
    return d.strftime("%Y%m%d")


def _fmt_time(seconds: int) -> str:
    seconds = int(seconds) % 86400
    return f"{seconds // 3600:02d}{(seconds // 60) % 60:02d}{seconds % 60:02d}"


def patient_id_for(seed: int, index: int) -> str:
    """The PatientID of patient ``index`` (unique within a cohort, e.g. ``MRN0041234``)."""
    return f"MRN{(7654321 * index + _hash_int('mrn', seed)) % 10**7:07d}"


def _label(rng: np.random.Generator, n: int, n_lesions: int) -> str:
    if n == 1 and n_lesions == 1 and rng.uniform() < 0.4:
        return str(rng.choice(_LABELS_SINGLE))
    return str(rng.choice(_LABELS_NUMBERED)).format(n=n)


def _place_ok(les: Lesion) -> bool:
    return abs(les.center[0]) + les.r_max <= 39.0 and abs(les.center[1]) + les.r_max <= 39.0


def patient_spec(seed: int, index: int) -> PatientSpec:
    """Draw everything about one patient without rendering images.

    Parameters
    ----------
    seed : int
        Cohort seed (non-negative).
    index : int
        Patient index (0-based).

    Returns
    -------
    PatientSpec
    """
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    rng = np.random.default_rng([seed, index])

    # demographics
    sex = "F" if rng.uniform() < 0.5 else "M"
    first = str(rng.choice(_FIRST_F if sex == "F" else _FIRST_M))
    last = str(rng.choice(_LAST))
    birth = date(1940, 1, 1) + timedelta(days=int(rng.integers(0, 365 * 51)))
    study = date(2015, 1, 1) + timedelta(days=int(rng.integers(0, 365 * 9)))
    age = study.year - birth.year - ((study.month, study.day) < (birth.month, birth.day))
    study_seconds = int(rng.integers(7 * 3600, 18 * 3600))
    accession = f"ACC{(1234567 * index + _hash_int('acc', seed)) % 10**7:07d}"
    stage = str(rng.choice(["I", "II", "III", "IV"], p=[0.25, 0.25, 0.3, 0.2]))

    # primary grid
    ps = round(float(rng.uniform(0.7, 0.9)), 3)
    dz = round(float(rng.uniform(2.0, 3.0)), 1)
    nz = int(rng.integers(40, 61))
    z0 = round(float(rng.uniform(-150.0, -50.0)), 2)
    x0 = round(-(COLUMNS - 1) / 2 * ps + float(rng.uniform(-1.0, 1.0)), 3)
    y0 = round(-(ROWS - 1) / 2 * ps + float(rng.uniform(-1.0, 1.0)), 3)
    zs = tuple(round(z0 + k * dz, 3) for k in range(nz))
    grid = Grid(ROWS, COLUMNS, ps, x0, y0, zs, dz)

    anatomy = phantom.sample_anatomy(rng, z_center=0.5 * (zs[0] + zs[-1]), z_half=0.5 * (zs[-1] - zs[0]))

    # lesions
    n_lesions = int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2]))
    phenos = [PHENOTYPES[index % len(PHENOTYPES)]] + [str(rng.choice(PHENOTYPES)) for _ in range(n_lesions - 1)]
    shapes = []
    for li, ph in enumerate(phenos):
        hollow = ph == "necrotic_rim" and (
            (index == HOLE_PATIENT and li == 0) or bool(rng.uniform() < 0.1)
        )
        shapes.append(phantom.sample_lesion_shape(rng, ph, hollow=hollow))
    lesions: list[Lesion] = []
    for _ in range(20):  # rare: re-place when a lesion would reach the field-of-view edge
        lesions = phantom.place_lesions(rng, anatomy, shapes, zs[0], zs[-1])
        if all(_place_ok(les) for les in lesions):
            break
    lesions = [les for les in lesions if _place_ok(les)] or lesions[:1]
    labels = tuple(_label(rng, n, len(lesions)) for n in range(1, len(lesions) + 1))
    volumes = tuple(les.volume_mm3(step=0.75) for les in lesions)
    largest = int(np.argmax(volumes))
    outcome_pheno = lesions[largest].phenotype

    # outcome: Weibull PH with censoring
    lp = PHENOTYPE_LOG_HR[outcome_pheno] + STAGE_LOG_HR[stage] + AGE_LOG_HR_PER_YEAR * (age - 65)
    t_event = WEIBULL_SCALE_MONTHS * (rng.exponential() * np.exp(-lp)) ** (1.0 / WEIBULL_SHAPE)
    t_censor = min(rng.uniform(24.0, 96.0), rng.exponential(150.0))
    time_months = max(round(float(min(t_event, t_censor)), 2), 0.1)
    event = int(t_event <= t_censor)

    seg_kind = "rtstruct" if index % RTSTRUCT_RULE == 1 else "seg"
    has_retest = index % 8 in RETEST_RESIDUES

    seg_day = study + timedelta(days=int(rng.integers(1, 15)))
    plans = []
    for s in range(2 if has_retest else 1):
        if s == 0:
            g, shift, sigma, t_series = grid, (0.0, 0.0, 0.0), float(rng.uniform(10.0, 20.0)), study_seconds
        else:
            g = Grid(ROWS, COLUMNS, ps, x0, y0, tuple(round(z + dz / 2, 3) for z in zs), dz)
            shift = (
                round(float(rng.uniform(-3.0, 3.0)), 2),
                round(float(rng.uniform(-3.0, 3.0)), 2),
                round(float(rng.uniform(-2.0, 2.0)), 2),
            )
            sigma = plans[0].noise_sigma * float(rng.uniform(0.85, 1.15))
            t_series = study_seconds + int(rng.integers(600, 1200))
        n = len(g.z_positions)
        plans.append(
            SeriesPlan(
                series_index=s,
                is_retest=s > 0,
                grid=g,
                shift=shift,
                noise_sigma=sigma,
                series_number=1 + s,
                series_time=_fmt_time(t_series),
                series_instance_uid=demo_uid(seed, index, "series", s),
                frame_of_reference_uid=demo_uid(seed, index, "frame-of-reference", s),
                sop_instance_uids=tuple(demo_uid(seed, index, "ct", s, k) for k in range(n)),
                seg_series_number=101 + s,
                seg_series_instance_uid=demo_uid(seed, index, "seg-series", s),
                seg_sop_instance_uid=demo_uid(seed, index, "seg-sop", s),
                seg_date=_fmt_date(seg_day),
                seg_time=_fmt_time(int(rng.integers(8 * 3600, 17 * 3600)) + 60 * s),
            )
        )

    return PatientSpec(
        seed=seed,
        index=index,
        patient_id=patient_id_for(seed, index),
        patient_name=f"{last}^{first}",
        sex=sex,
        birth_date=_fmt_date(birth),
        age=int(age),
        study_date=_fmt_date(study),
        study_time=_fmt_time(study_seconds),
        accession_number=accession,
        study_instance_uid=demo_uid(seed, index, "study"),
        stage=stage,
        anatomy=anatomy,
        lesions=tuple(lesions),
        labels=labels,
        lesion_volumes_mm3=volumes,
        seg_kind=seg_kind,
        series=tuple(plans),
        outcome_phenotype=outcome_pheno,
        time_months=time_months,
        event=event,
    )


def render_patient(seed: int, index: int) -> RenderedPatient:
    """Render the images and lesion masks of one patient (what :func:`generate_cohort` writes).

    Parameters
    ----------
    seed : int
        Cohort seed.
    index : int
        Patient index.

    Returns
    -------
    RenderedPatient
        HU volumes (int16) and boolean masks for each series, exactly as written to DICOM (before a
        slice is deleted for the "missing slice" broken case).
    """
    spec = patient_spec(seed, index)
    volumes, masks = [], []
    for plan in spec.series:
        noise_rng = np.random.default_rng([seed, index, 1, plan.series_index])
        hu, m = phantom.render(plan.grid, spec.anatomy, list(spec.lesions), plan.shift, plan.noise_sigma,
                               noise_rng)
        volumes.append(hu)
        masks.append(m)
    return RenderedPatient(spec=spec, volumes=volumes, masks=masks)


def _ct_dataset(spec: PatientSpec, plan: SeriesPlan, k: int, hu_slice: np.ndarray) -> Dataset:
    g = plan.grid
    sop_uid = plan.sop_instance_uids[k]
    ds = new_dataset(CTImageStorage, sop_uid, IMPLEMENTATION_CLASS_UID)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceCreationDate = spec.study_date
    ds.InstanceCreationTime = plan.series_time
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = spec.study_date
    ds.SeriesDate = spec.study_date
    ds.AcquisitionDate = spec.study_date
    ds.ContentDate = spec.study_date
    ds.StudyTime = spec.study_time
    ds.SeriesTime = plan.series_time
    ds.AcquisitionTime = plan.series_time
    ds.ContentTime = plan.series_time
    ds.AccessionNumber = spec.accession_number
    ds.Modality = "CT"
    ds.Manufacturer = MANUFACTURER
    ds.InstitutionName = "Demo General Hospital"
    ds.ReferringPhysicianName = "WATSON^JOHN"
    ds.StationName = "CT01"
    ds.StudyDescription = "CT CHEST"
    ds.SeriesDescription = "CHEST AXIAL REPEAT" if plan.is_retest else "CHEST AXIAL"
    ds.ManufacturerModelName = "Phantom CT"
    ds.PatientName = spec.patient_name
    ds.PatientID = spec.patient_id
    ds.PatientBirthDate = spec.birth_date
    ds.PatientSex = spec.sex
    ds.PatientAge = f"{spec.age:03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = f"{g.slice_thickness:g}"
    ds.KVP = "120"
    ds.SpacingBetweenSlices = f"{g.slice_spacing:g}"
    ds.DeviceSerialNumber = "DEMO-0001"
    ds.SoftwareVersions = GENERATOR_VERSION
    ds.PatientPosition = "HFS"
    ds.ConvolutionKernel = "STANDARD"
    set_slice_plane(ds, spec.study_instance_uid, plan, k)
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = str(RESCALE_INTERCEPT)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    stored = (hu_slice.astype(np.int32) - RESCALE_INTERCEPT).astype("<i2")
    ds.add_new(0x7FE00010, "OW", stored.tobytes())
    return ds


#: Random-stream code of each extra modality: ``default_rng([seed, patient, 2 | 3, code])``.
_MODALITY_STREAM = {"MR": 1, "PT": 2}


def _seconds(tm: str) -> int:
    return int(tm[:2]) * 3600 + int(tm[2:4]) * 60 + int(tm[4:6])


def modality_plans(spec: PatientSpec, modalities: Any = ("CT",)) -> tuple[ModalityPlan, ...]:
    """The MR / PET series of a patient in a cohort of ``modalities`` (none for a CT-only cohort).

    Each is drawn from its own generator ``default_rng([seed, index, 2, code])``, so the CT series,
    segmentations and outcomes of the patient are the same with or without them. Every patient of a mixed
    cohort gets every requested modality, in the same study, with the patient's segmentation kind and labels.

    Parameters
    ----------
    spec : PatientSpec
    modalities : iterable of str
        See :func:`~imaging_assets.demo.modalities.normalise_modalities`.

    Returns
    -------
    tuple of ModalityPlan
    """
    plans = []
    study = date(int(spec.study_date[:4]), int(spec.study_date[4:6]), int(spec.study_date[6:]))
    primary = spec.series[0]
    for modality in normalise_modalities(modalities):
        if modality == "CT":
            continue
        rng = np.random.default_rng([spec.seed, spec.index, 2, _MODALITY_STREAM[modality]])
        grid, shift, acq = extra.sample_acquisition(rng, modality, primary.grid, spec.lesions, spec.sex)
        offset = int(rng.integers(1800, 3600)) if modality == "MR" else int(rng.integers(300, 900))
        number = extra.SERIES_NUMBERS[modality]
        seg_day = study + timedelta(days=int(rng.integers(1, 15)))
        s, i = spec.seed, spec.index
        plans.append(ModalityPlan(
            modality=modality,
            grid=grid,
            shift=shift,
            series_number=number,
            series_time=_fmt_time(_seconds(spec.study_time) + offset),
            series_instance_uid=demo_uid(s, i, "series", modality),
            # PET/CT: one couch, one frame of reference; MR: the patient was repositioned elsewhere
            frame_of_reference_uid=(primary.frame_of_reference_uid if modality == "PT"
                                    else demo_uid(s, i, "frame-of-reference", modality)),
            sop_instance_uids=tuple(demo_uid(s, i, modality.lower(), k) for k in range(len(grid.z_positions))),
            seg_series_number=100 + number,
            seg_series_instance_uid=demo_uid(s, i, "seg-series", modality),
            seg_sop_instance_uid=demo_uid(s, i, "seg-sop", modality),
            seg_date=_fmt_date(seg_day),
            seg_time=_fmt_time(int(rng.integers(8 * 3600, 17 * 3600))),
            dimension_organization_uid=demo_uid(s, i, "seg-dimension-organization", modality),
            acquisition=acq,
        ))
    return tuple(plans)


def render_modality(spec: PatientSpec, plan: ModalityPlan) -> tuple[np.ndarray, list[np.ndarray]]:
    """Render one MR (uint16 a.u.) or PET (float32 Bq/ml) series and its lesion masks, as written to DICOM
    (PET before the per-slice uint16 quantisation)."""
    noise_rng = np.random.default_rng([spec.seed, spec.index, 3, _MODALITY_STREAM[plan.modality]])
    render = extra.render_mr if plan.modality == "MR" else extra.render_pet
    return render(plan, spec.anatomy, list(spec.lesions), noise_rng)


def _lesion_free_middle_slice(masks: list[np.ndarray], nz: int) -> int:
    occupied = np.zeros(nz, dtype=bool)
    for m in masks:
        occupied |= m.reshape(nz, -1).any(axis=1)
    candidates = [k for k in range(nz // 3, 2 * nz // 3 + 1) if not occupied[k]]
    if not candidates:
        return nz // 2
    return min(candidates, key=lambda k: (abs(k - nz // 2), k))


def _write_segmentation(study_dir: Path, spec: PatientSpec, plan: SeriesPlan | ModalityPlan,
                        images: list[Dataset], masks: list[np.ndarray], dimension_organization_uid: str) -> Path:
    """Write the patient's SEG or RTSTRUCT (``spec.seg_kind``) of one image series; returns its path."""
    from imaging_assets.demo.rtstruct import build_rtstruct
    from imaging_assets.demo.seg import build_seg

    if spec.seg_kind == "seg":
        obj = build_seg(
            images, masks, list(spec.labels),
            series_instance_uid=plan.seg_series_instance_uid,
            sop_instance_uid=plan.seg_sop_instance_uid,
            dimension_organization_uid=dimension_organization_uid,
            series_number=plan.seg_series_number,
            content_date=plan.seg_date,
            content_time=plan.seg_time,
            manufacturer=MANUFACTURER,
            implementation_class_uid=IMPLEMENTATION_CLASS_UID,
        )
        seg_path = study_dir / f"SE{plan.seg_series_number:03d}_SEG" / "SEG0001.dcm"
    else:
        obj = build_rtstruct(
            images, masks, list(spec.labels),
            series_instance_uid=plan.seg_series_instance_uid,
            sop_instance_uid=plan.seg_sop_instance_uid,
            series_number=plan.seg_series_number,
            structure_set_date=plan.seg_date,
            structure_set_time=plan.seg_time,
            manufacturer=MANUFACTURER,
            implementation_class_uid=IMPLEMENTATION_CLASS_UID,
        )
        seg_path = study_dir / f"SE{plan.seg_series_number:03d}_RTSTRUCT" / "RS0001.dcm"
    seg_path.parent.mkdir(parents=True, exist_ok=True)
    obj.save_as(seg_path, enforce_file_format=True)
    return seg_path


def _ground_truth_rows(spec: PatientSpec, plan: SeriesPlan | ModalityPlan, masks: list[np.ndarray], largest: int,
                       modality: str | None) -> list[dict[str, Any]]:
    """One ground-truth row per lesion mask of a series; ``modality`` is added for mixed cohorts only."""
    g = plan.grid
    voxel_mm3 = g.pixel_spacing**2 * g.slice_spacing
    rows = []
    for li, (les, m) in enumerate(zip(spec.lesions, masks, strict=True)):
        kk, jj, ii = np.nonzero(m)
        row = {
            "patient_id": spec.patient_id,
            "lesion_index": li,
            "phenotype": les.phenotype,
            "location": les.location,
            "has_hole": les.hollow,
            "study_instance_uid": spec.study_instance_uid,
            "series_instance_uid": plan.series_instance_uid,
            "frame_of_reference_uid": plan.frame_of_reference_uid,
            "is_retest": plan.is_retest,
            "seg_kind": spec.seg_kind,
            "seg_series_instance_uid": plan.seg_series_instance_uid,
            "seg_sop_instance_uid": plan.seg_sop_instance_uid,
            "segment_number": li + 1,
            "segment_label": spec.labels[li],
            "volume_voxels": int(len(kk)),
            "volume_mm3": f"{len(kk) * voxel_mm3:.2f}",
            "center_x": f"{g.origin_x + ii.mean() * g.pixel_spacing:.3f}",
            "center_y": f"{g.origin_y + jj.mean() * g.pixel_spacing:.3f}",
            "center_z": f"{float(np.interp(kk.mean(), np.arange(len(g.z_positions)), g.zs())):.3f}",
            "largest_lesion": li == largest,
        }
        if modality is not None:
            row["modality"] = modality
        rows.append(row)
    return rows


def _write_patient(out_dir: Path, seed: int, index: int, n_patients: int,
                   modalities: tuple[str, ...] = ("CT",)) -> dict[str, Any]:
    """Render and write one patient; returns rows and counts for the cohort tables."""
    rendered = render_patient(seed, index)
    spec = rendered.spec
    mixed = modalities != ("CT",)
    study_dir = out_dir / "dicom" / spec.case_folder / spec.study_folder
    with_broken = n_patients >= 4
    broken: list[dict[str, Any]] = []
    gt_rows: list[dict[str, Any]] = []
    n_files = 0
    largest = int(np.argmax(spec.lesion_volumes_mm3))

    def rel(p: Path) -> str:
        return p.relative_to(out_dir).as_posix()

    for plan, hu, masks in zip(spec.series, rendered.volumes, rendered.masks, strict=True):
        series_dir = study_dir / plan.folder
        series_dir.mkdir(parents=True, exist_ok=True)
        nz = hu.shape[0]
        cts = [_ct_dataset(spec, plan, k, hu[k]) for k in range(nz)]
        skip = -1
        if with_broken and index == 3 and plan.series_index == 0:
            skip = _lesion_free_middle_slice(masks, nz)
            path = series_dir / f"IM{skip + 1:04d}.dcm"
            broken.append({
                "path": rel(path),
                "kind": "missing_slice",
                "detail": f"slice {skip + 1} of {nz} deleted from the series; a geometry check sees a gap",
                "series_instance_uid": plan.series_instance_uid,
                "sop_instance_uid": plan.sop_instance_uids[skip],
            })
        for k, ds in enumerate(cts):
            if k != skip:
                ds.save_as(series_dir / f"IM{k + 1:04d}.dcm", enforce_file_format=True)
                n_files += 1

        _write_segmentation(study_dir, spec, plan, cts, masks,
                            demo_uid(seed, index, "seg-dimension-organization", plan.series_index))
        n_files += 1
        gt_rows.extend(_ground_truth_rows(spec, plan, masks, largest, "CT" if mixed else None))

        if with_broken and index == 0 and plan.series_index == 0:
            path = series_dir / "NOTES.dcm"
            path.write_text(
                "Scanner export notes (not DICOM).\nPatient transferred from ward 3; contrast given.\n",
                encoding="utf-8",
            )
            n_files += 1
            broken.append({"path": rel(path), "kind": "not_dicom",
                           "detail": "plain text file with a .dcm name inside a CT series folder"})
        if with_broken and index == 2 and plan.series_index == 0:
            mid = nz // 2
            for number, kind in ((901, "truncated"), (902, "no_pixel_data")):
                ds = _ct_dataset(spec, plan, mid, hu[mid])
                sop = demo_uid(seed, index, kind, "sop")
                ds.SOPInstanceUID = sop
                ds.file_meta.MediaStorageSOPInstanceUID = sop
                ds.SeriesInstanceUID = demo_uid(seed, index, kind, "series")
                ds.SeriesNumber = number
                ds.InstanceNumber = 1
                path = study_dir / f"SE{number:03d}_CT" / "IM0001.dcm"
                path.parent.mkdir(parents=True, exist_ok=True)
                buf = io.BytesIO()
                if kind == "no_pixel_data":
                    del ds.PixelData
                    ds.save_as(buf, enforce_file_format=True)
                    data = buf.getvalue()
                    detail = "CT Image Storage instance whose PixelData element was removed"
                else:
                    ds.save_as(buf, enforce_file_format=True)
                    full = buf.getvalue()
                    data = full[: len(full) // 2]
                    detail = f"valid CT slice cut to {len(data)} of {len(full)} bytes (inside PixelData)"
                path.write_bytes(data)
                n_files += 1
                broken.append({"path": rel(path), "kind": kind, "detail": detail,
                               "sop_instance_uid": sop})

    n_series = len(spec.series)
    for mplan in modality_plans(spec, modalities):
        pixels, masks = render_modality(spec, mplan)
        series_dir = study_dir / mplan.folder
        series_dir.mkdir(parents=True, exist_ok=True)
        images = [extra.modality_dataset(spec, mplan, k, pixels[k], manufacturer=MANUFACTURER,
                                         implementation_class_uid=IMPLEMENTATION_CLASS_UID,
                                         software_versions=GENERATOR_VERSION)
                  for k in range(pixels.shape[0])]
        for k, ds in enumerate(images):
            ds.save_as(series_dir / f"IM{k + 1:04d}.dcm", enforce_file_format=True)
            n_files += 1
        _write_segmentation(study_dir, spec, mplan, images, masks, mplan.dimension_organization_uid)
        n_files += 1
        n_series += 1
        gt_rows.extend(_ground_truth_rows(spec, mplan, masks, largest, mplan.modality))

    outcome = {
        "patient_id": spec.patient_id,
        "time_months": f"{spec.time_months:.2f}",
        "event": spec.event,
        "age": spec.age,
        "sex": spec.sex,
        "stage": spec.stage,
    }
    return {
        "index": index,
        "outcome": outcome,
        "ground_truth": gt_rows,
        "n_files": n_files,
        "n_lesions": len(spec.lesions),
        "n_series": n_series,
        "broken": broken,
    }


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _prepare_out_dir(out_dir: Path) -> None:
    dicom_dir = out_dir / "dicom"
    if dicom_dir.exists() and any(dicom_dir.iterdir()):
        if not (out_dir / "manifest.json").exists():
            raise FileExistsError(
                f"{dicom_dir} is not empty and has no manifest.json from a previous demo run; "
                "refusing to overwrite it"
            )
        shutil.rmtree(dicom_dir)
    dicom_dir.mkdir(parents=True, exist_ok=True)


def generate_cohort(
    out_dir: Path, n_patients: int = 100, seed: int = 0, workers: int | None = None,
    modalities: Any = ("CT",),
) -> DemoCohort:
    """Generate the synthetic demo cohort (DICOM CT [+ MR, PET] + SEG/RTSTRUCT, outcomes, ground truth).

    Parameters
    ----------
    out_dir : pathlib.Path
        Target folder; ``out_dir/dicom`` is replaced if it holds a previous demo cohort (a non-empty
        ``dicom/`` without ``manifest.json`` raises ``FileExistsError``).
    n_patients : int
        Number of patients (>= 1). Broken files are only mixed in for ``n_patients >= 4``.
    seed : int
        Non-negative seed; the same seed gives byte-identical files.
    workers : int or None
        Worker processes (default ``os.cpu_count()``); 1 generates in this process.
    modalities : iterable of str or str
        ``("CT",)`` (default, the CT-only cohort) or e.g. ``("CT", "MR", "PT")`` / ``"CT,MR,PT"``: every
        patient also gets a T1 MR and an FDG PET series of the same lesions, each with its own SEG or
        RTSTRUCT (:mod:`imaging_assets.demo.modalities`); ``ground_truth.csv`` then has a ``modality``
        column and ``manifest.json`` a ``modalities`` list. The CT part is the same either way.

    Returns
    -------
    DemoCohort
        Paths and counts of the generated cohort.
    """
    if n_patients < 1:
        raise ValueError(f"n_patients must be >= 1, got {n_patients}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    modalities = normalise_modalities(modalities)
    mixed = modalities != ("CT",)
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir)
    n_workers = max(1, min(workers if workers is not None else (os.cpu_count() or 1), n_patients))

    if n_workers == 1:
        results = [_write_patient(out_dir, seed, i, n_patients, modalities) for i in range(n_patients)]
    else:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx) as pool:
            futures = [pool.submit(_write_patient, out_dir, seed, i, n_patients, modalities)
                       for i in range(n_patients)]
            results = [f.result() for f in futures]
    results.sort(key=lambda r: r["index"])

    outcomes = [r["outcome"] for r in results]
    gt_rows = [row for r in results for row in r["ground_truth"]]
    broken = [b for r in results for b in r["broken"]]
    n_files = sum(r["n_files"] for r in results)
    n_lesions = sum(r["n_lesions"] for r in results)
    n_series = sum(r["n_series"] for r in results)

    outcomes_csv = out_dir / "outcomes.csv"
    ground_truth_csv = out_dir / "ground_truth.csv"
    manifest_json = out_dir / "manifest.json"
    _write_csv(outcomes_csv, OUTCOME_COLUMNS, outcomes)
    _write_csv(ground_truth_csv, GROUND_TRUTH_COLUMNS + (("modality",) if mixed else ()), gt_rows)
    manifest = {
        "generator": "imaging_assets.demo.generator",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "n_patients": n_patients,
        "n_files": n_files,
        "n_series": n_series,
        "n_segmentations": len({row["seg_sop_instance_uid"] for row in gt_rows}),
        "n_lesions": n_lesions,
        "n_ground_truth_rows": len(gt_rows),
        "phenotypes": list(PHENOTYPES),
        "outcome_phenotype_rule": "phenotype of the patient's largest lesion (outer volume)",
        "broken": broken,
    }
    if mixed:  # the CT-only manifest stays as it was
        manifest["modalities"] = list(modalities)
        series_modality = {(r["series_instance_uid"], r["modality"]) for r in gt_rows}
        manifest["n_series_by_modality"] = dict(sorted(Counter(m for _, m in series_modality).items()))
    manifest_json.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    elapsed = time.perf_counter() - t0
    cohort = DemoCohort(
        out_dir=out_dir,
        dicom_dir=out_dir / "dicom",
        outcomes_csv=outcomes_csv,
        ground_truth_csv=ground_truth_csv,
        manifest_json=manifest_json,
        seed=seed,
        n_patients=n_patients,
        n_files=n_files,
        n_lesions=n_lesions,
        n_series=n_series,
        n_segmentations=manifest["n_segmentations"],
        broken=broken,
        elapsed_s=elapsed,
    )
    logger.info(
        "demo cohort: %d patients, %d series, %d lesions, %d files (%d broken) in %s (seed %d, %d workers, "
        "%.1f s)",
        n_patients, n_series, n_lesions, n_files, len(broken), out_dir, seed, n_workers, elapsed,
    )
    return cohort
