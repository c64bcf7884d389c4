"""MR and PET series of the synthetic demo patients (the mixed cohort, ``modalities=("CT", "MR", "PT")``).

Both render the *same* analytic anatomy and lesions as the patient's CT
(:func:`imaging_assets.demo.phantom.anatomy_labels`, :meth:`~imaging_assets.demo.phantom.Lesion.evaluate`),
on their own grid, with their own contrast, noise and segmentation:

MR (``Modality`` MR, MR Image Storage)
    T1-weighted spin echo at 1.5 T in arbitrary units (0..~2000, stored as 12-bit unsigned integers, no
    Rescale Slope / Intercept, as most MR scanners write): fat bright, muscle intermediate, lung and cortical
    bone dark, fatty marrow bright, flowing blood dark. Lesions are iso- to hypointense to muscle with a
    phenotype-dependent texture (the CT texture field, scaled), fluid cores dark. A smooth multiplicative
    bias field (10-30 % over the field of view) and Rician noise (magnitude of complex Gaussian noise).
    About 1 x 1 mm in-plane, 3 or 4 mm slices. The patient was repositioned: shifted by up to 5 mm, with
    its own FrameOfReferenceUID. Masks: the lesion sampled at voxel centres, as on the CT.
PET (``Modality`` PT, PET Image Storage, ``Units`` BQML)
    18F-FDG activity concentration (Bq/ml) decay-corrected to the series start: tissue SUVs (lung 0.3-0.5,
    muscle 0.6-0.9, blood pool 1.5-2.2, marrow 1.3-1.9, ...), lesion SUVs by phenotype (ground-glass
    1-2, small nodules 2.5-5, necrotic rims 6-12 around a photopenic core, large heterogeneous masses 5-14)
    with a heterogeneous uptake texture. Partial volume (3 x 3 x 3 sub-samples per voxel), a Gaussian
    point-spread function (5.5-7.5 mm FWHM) and correlated noise growing with the square root of the
    uptake. 32 x 32 voxels of 3.6-4.2 mm, 3.2-4.0 mm slices. Stored as uint16 with a per-slice Rescale
    Slope (``max / 32767``), as scanners do. Acquired on a PET/CT: same FrameOfReferenceUID as the
    primary CT, patient not moved. Masks: a 42 %-of-maximum threshold of the lesion's own blurred uptake
    (the EANM fixed-threshold rule), so even a 3 mm nodule is a few voxels, as on real PET contours.
    ``SUV = value x PatientWeight (g) / (RadionuclideTotalDose x 2^(-(SeriesTime -
    RadiopharmaceuticalStartTime) / RadionuclideHalfLife))``.

Everything is drawn from its own random stream (``default_rng([seed, patient, 2, modality])``), so adding
MR/PET to a cohort leaves its CT series, segmentations and outcomes byte-identical.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import MRImageStorage, PositronEmissionTomographyImageStorage
from scipy import ndimage

from imaging_assets.demo.dataset import new_dataset, set_slice_plane
from imaging_assets.demo.phantom import TISSUES, Anatomy, Grid, Lesion, anatomy_labels

logger = logging.getLogger(__name__)

#: Modality codes a demo cohort may hold, in the order their series are written.
MODALITIES: tuple[str, ...] = ("CT", "MR", "PT")
_ALIASES = {"PET": "PT", "MRI": "MR"}
#: Series number (and folder ``SE<nnn>_<modality>``) of each extra modality; its segmentation is 100 higher.
SERIES_NUMBERS: dict[str, int] = {"MR": 3, "PT": 4}
MR_MATRIX = 128
PET_MATRIX = 32
F18_HALF_LIFE_S = 6586.2
PET_THRESHOLD = 0.42  # fraction of the lesion's maximum uptake (EANM fixed threshold)
PET_SUPERSAMPLE = 3

#: T1 signal ranges (a.u.) per tissue, in :data:`~imaging_assets.demo.phantom.TISSUES` order.
_MR_TISSUE = {"air": (0.0, 0.0), "fat": (1450.0, 1750.0), "muscle": (550.0, 700.0), "heart": (420.0, 560.0),
              "lung": (60.0, 120.0), "vessel": (200.0, 350.0), "aorta": (150.0, 300.0), "rib": (700.0, 900.0),
              "bone": (80.0, 150.0), "marrow": (900.0, 1200.0)}
#: SUV ranges per tissue ("heart" is the mediastinal blood pool of this phantom).
_PET_TISSUE = {"air": (0.0, 0.0), "fat": (0.25, 0.45), "muscle": (0.6, 0.9), "heart": (1.5, 2.2),
               "lung": (0.3, 0.5), "vessel": (1.4, 1.9), "aorta": (1.5, 2.0), "rib": (0.8, 1.2),
               "bone": (0.6, 0.9), "marrow": (1.3, 1.9)}
#: Per phenotype: (MR signal range, MR texture CV range, SUV range, SUV texture CV range).
_LESION = {
    "small_smooth": ((500.0, 700.0), (0.04, 0.08), (2.5, 5.0), (0.08, 0.15)),
    "necrotic_rim": ((600.0, 800.0), (0.05, 0.10), (6.0, 12.0), (0.10, 0.20)),
    "lobulated_heterogeneous": ((450.0, 750.0), (0.12, 0.20), (5.0, 14.0), (0.25, 0.40)),
    "spiculated": ((450.0, 650.0), (0.06, 0.12), (3.0, 9.0), (0.12, 0.25)),
    "ground_glass": ((180.0, 300.0), (0.10, 0.20), (1.0, 2.0), (0.15, 0.30)),
}
_MR_CORE = (150.0, 300.0)  # fluid core: dark on T1
_PET_CORE = (0.4, 1.0)  # necrotic core: photopenic
_HOLLOW_MR, _HOLLOW_SUV = 30.0, 0.05  # air-filled cavity


def normalise_modalities(modalities: Any) -> tuple[str, ...]:
    """Validated modality codes in :data:`MODALITIES` order (``"PET"`` → ``"PT"``, ``"MRI"`` → ``"MR"``).

    Parameters
    ----------
    modalities : str or iterable of str
        E.g. ``("CT", "MR", "PT")`` or ``"CT,MR,PT"``; CT must be among them (every patient's primary series).

    Returns
    -------
    tuple of str

    Raises
    ------
    ValueError
        An unknown code, or no CT.
    """
    items = modalities.split(",") if isinstance(modalities, str) else list(modalities)
    codes = {_ALIASES.get(str(m).strip().upper(), str(m).strip().upper()) for m in items if str(m).strip()}
    unknown = sorted(codes - set(MODALITIES))
    if unknown:
        raise ValueError(f"unknown modality {', '.join(unknown)}: the demo writes {', '.join(MODALITIES)}")
    if "CT" not in codes:
        raise ValueError("the demo cohort always holds CT (every patient's primary series); "
                         f"got {', '.join(sorted(codes)) or 'none'}")
    return tuple(m for m in MODALITIES if m in codes)


@dataclass(frozen=True, eq=False)
class ModalityPlan:
    """One MR or PET series of a patient, its segmentation object and its acquisition parameters."""

    modality: str
    grid: Grid
    shift: tuple[float, float, float]
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
    dimension_organization_uid: str
    #: tissue values (by tissue name), per-lesion (value, texture CV, core value) and scanner settings.
    acquisition: dict[str, Any]
    is_retest: bool = False

    @property
    def folder(self) -> str:
        """Series folder name."""
        return f"SE{self.series_number:03d}_{self.modality}"


def _cover(rng: np.random.Generator, ct: Grid, dz: float) -> tuple[float, ...]:
    """Slice positions of spacing ``dz`` covering the CT slab (centred on it, +-1 mm jitter)."""
    lo, hi = ct.z_positions[0], ct.z_positions[-1]
    n = int(np.ceil((hi - lo) / dz)) + 1
    z0 = 0.5 * (lo + hi) - 0.5 * (n - 1) * dz + float(rng.uniform(-1.0, 1.0))
    return tuple(round(z0 + k * dz, 3) for k in range(n))


def _centred_grid(rng: np.random.Generator, ct: Grid, matrix: int, ps: float, dz: float) -> Grid:
    x0 = round(-(matrix - 1) / 2 * ps + float(rng.uniform(-1.0, 1.0)), 3)
    y0 = round(-(matrix - 1) / 2 * ps + float(rng.uniform(-1.0, 1.0)), 3)
    return Grid(matrix, matrix, ps, x0, y0, _cover(rng, ct, dz), dz)


def sample_acquisition(
    rng: np.random.Generator, modality: str, ct: Grid, lesions: tuple[Lesion, ...], sex: str
) -> tuple[Grid, tuple[float, float, float], dict[str, Any]]:
    """Draw the grid, patient shift and acquisition parameters of one MR or PET series.

    Parameters
    ----------
    rng : numpy.random.Generator
        The series' own generator.
    modality : str
        ``"MR"`` or ``"PT"``.
    ct : Grid
        The patient's primary CT grid (the new series covers its slab).
    lesions : tuple of Lesion
        The patient's lesions (one value and texture amplitude is drawn per lesion).
    sex : str
        ``"F"`` or ``"M"`` (PET patient weight).

    Returns
    -------
    grid, shift, acquisition
    """
    def draw(ranges: dict[str, tuple[float, float]]) -> dict[str, float]:
        return {name: float(rng.uniform(*ranges[name])) for name in TISSUES}

    if modality == "MR":
        ps = round(float(rng.uniform(0.9, 1.1)), 3)
        dz = float(rng.choice([3.0, 4.0]))
        grid = _centred_grid(rng, ct, MR_MATRIX, ps, dz)
        shift = (round(float(rng.uniform(-5.0, 5.0)), 2), round(float(rng.uniform(-5.0, 5.0)), 2),
                 round(float(rng.uniform(-4.0, 4.0)), 2))
        tissue = draw(_MR_TISSUE)
        per_lesion = []
        for les in lesions:
            value, cv = _LESION[les.phenotype][0], _LESION[les.phenotype][1]
            core = _HOLLOW_MR if les.hollow else float(rng.uniform(*_MR_CORE))
            per_lesion.append((float(rng.uniform(*value)), float(rng.uniform(*cv)), core))
        acq = {"tissue": tissue, "lesions": per_lesion, "noise_sigma": float(rng.uniform(12.0, 25.0)),
               "bias": [float(v) for v in rng.normal(0.0, 0.08, 5)], "repetition_time": 550.0,
               "echo_time": float(rng.choice([10.0, 12.0, 14.0])), "field_strength": 1.5}
        return grid, shift, acq
    if modality != "PT":
        raise ValueError(f"no renderer for modality {modality!r}")
    ps = round(float(rng.uniform(3.6, 4.2)), 4)
    dz = round(float(rng.uniform(3.2, 4.0)), 2)
    grid = _centred_grid(rng, ct, PET_MATRIX, ps, dz)
    tissue = draw(_PET_TISSUE)
    per_lesion = []
    for les in lesions:
        value, cv = _LESION[les.phenotype][2], _LESION[les.phenotype][3]
        core = _HOLLOW_SUV if les.hollow else float(rng.uniform(*_PET_CORE))
        per_lesion.append((float(rng.uniform(*value)), float(rng.uniform(*cv)), core))
    weight = float(rng.uniform(55.0, 85.0) if sex == "F" else rng.uniform(65.0, 100.0))
    acq = {"tissue": tissue, "lesions": per_lesion, "fwhm_mm": float(rng.uniform(5.5, 7.5)),
           "noise_c": float(rng.uniform(0.12, 0.2)), "weight_kg": round(weight, 1),
           "height_m": round(float(rng.uniform(1.55, 1.75) if sex == "F" else rng.uniform(1.65, 1.90)), 2),
           "dose_bq": round(float(rng.uniform(250e6, 400e6)), -4), "uptake_s": int(rng.integers(55 * 60, 76 * 60)),
           "frame_s": 180}
    return grid, (0.0, 0.0, 0.0), acq


def _lesion_values(les: Lesion, outer: np.ndarray, core: np.ndarray, hu: np.ndarray,
                   value: float, cv: float, core_value: float) -> np.ndarray:
    """Lesion intensity from the lesion's CT texture field: ``value x (1 + cv x t)``, t of unit variance."""
    tex = (hu - les.hu_base) / max(les.hu_sd, 1e-6)
    out = value * (1.0 + cv * tex)
    if les.core_frac > 0:
        tex_core = (hu - les.hu_core) / max(0.25 * les.hu_sd, 1e-6)
        out = np.where(core, core_value * (1.0 + 0.3 * cv * tex_core), out)
    return np.maximum(out, 0.0)


def _lesion_box(les: Lesion, xs: np.ndarray, ys: np.ndarray, zs: np.ndarray, pad: float) -> tuple[slice, ...] | None:
    reach = les.r_max + pad
    ix = np.nonzero(np.abs(xs - les.center[0]) <= reach)[0]
    iy = np.nonzero(np.abs(ys - les.center[1]) <= reach)[0]
    iz = np.nonzero(np.abs(zs - les.center[2]) <= reach)[0]
    if not (len(ix) and len(iy) and len(iz)):
        return None
    return slice(iz[0], iz[-1] + 1), slice(iy[0], iy[-1] + 1), slice(ix[0], ix[-1] + 1)


def render_mr(plan: ModalityPlan, anatomy: Anatomy, lesions: list[Lesion],
              noise_rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    """T1-weighted MR volume (uint16, a.u.) and one lesion mask per lesion (voxel centres inside).

    Returns
    -------
    signal : numpy.ndarray of uint16
        ``(slices, rows, columns)``.
    masks : list of numpy.ndarray of bool
    """
    g, acq = plan.grid, plan.acquisition
    xs, ys, zs = g.xs() - plan.shift[0], g.ys() - plan.shift[1], g.zs() - plan.shift[2]
    lut = np.array([acq["tissue"][name] for name in TISSUES], dtype=np.float32)
    vol = lut[anatomy_labels(anatomy, xs[None, None, :], ys[None, :, None], zs[:, None, None])]
    masks = []
    for les, (value, cv, core_value) in zip(lesions, acq["lesions"], strict=True):
        mask = np.zeros(g.shape, dtype=bool)
        sl = _lesion_box(les, xs, ys, zs, g.pixel_spacing + g.slice_spacing)
        if sl is not None:
            outer, core, hu = les.evaluate(xs[sl[2]][None, None, :], ys[sl[1]][None, :, None], zs[sl[0]][:, None, None])
            sub = vol[sl]
            values = _lesion_values(les, outer, core, hu, value, cv, core_value)
            sub[outer] = values[outer]
            mask[sl] = (outer & ~core) if les.hollow else outer
        masks.append(mask)
    # smooth multiplicative bias field over the field of view (coil sensitivity)
    c = acq["bias"]
    u = (xs / 60.0)[None, None, :]
    v = (ys / 60.0)[None, :, None]
    w = ((zs - zs.mean()) / 80.0)[:, None, None]
    bias = np.exp(c[0] * u + c[1] * v + c[2] * w + c[3] * (u * u + v * v) + c[4] * u * v).astype(np.float32)
    vol = vol * bias
    sigma = np.float32(acq["noise_sigma"])
    real = vol + sigma * noise_rng.standard_normal(g.shape, dtype=np.float32)
    imag = sigma * noise_rng.standard_normal(g.shape, dtype=np.float32)
    magnitude = np.sqrt(real * real + imag * imag)  # Rician
    return np.clip(np.rint(magnitude), 0, 4095).astype(np.uint16), masks


def render_pet(plan: ModalityPlan, anatomy: Anatomy, lesions: list[Lesion],
               noise_rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    """PET activity concentration (float32, Bq/ml, decay-corrected to the series start) and lesion masks.

    Returns
    -------
    activity : numpy.ndarray of float32
        ``(slices, rows, columns)``, non-negative.
    masks : list of numpy.ndarray of bool
        The 42 %-of-maximum threshold of each lesion's blurred own uptake (its connected part holding
        the maximum); never empty.
    """
    g, acq = plan.grid, plan.acquisition
    s = PET_SUPERSAMPLE
    offsets = (np.arange(s) - (s - 1) / 2) / s  # sub-voxel centres, in voxels

    def fine(axis: np.ndarray, step: float, shift: float) -> np.ndarray:
        return ((axis[:, None] + offsets[None, :] * step).ravel() - shift).astype(np.float64)

    fx, fy = fine(g.xs(), g.pixel_spacing, plan.shift[0]), fine(g.ys(), g.pixel_spacing, plan.shift[1])
    fz = fine(g.zs(), g.slice_spacing, plan.shift[2])
    lut = np.array([acq["tissue"][name] for name in TISSUES], dtype=np.float32)
    suv = lut[anatomy_labels(anatomy, fx[None, None, :], fy[None, :, None], fz[:, None, None])]
    nz, ny, nx = g.shape

    def pool(a: np.ndarray) -> np.ndarray:
        return a.reshape(nz, s, ny, s, nx, s).mean(axis=(1, 3, 5))

    sigma_vox = (acq["fwhm_mm"] / 2.3548) / np.array([g.slice_spacing, g.pixel_spacing, g.pixel_spacing])
    own = []
    for les, (value, cv, core_value) in zip(lesions, acq["lesions"], strict=True):
        uptake = np.zeros(suv.shape, dtype=np.float32)
        sl = _lesion_box(les, fx, fy, fz, 0.0)
        if sl is not None:
            outer, core, hu = les.evaluate(fx[sl[2]][None, None, :], fy[sl[1]][None, :, None], fz[sl[0]][:, None, None])
            values = _lesion_values(les, outer, core, hu, value, cv, core_value).astype(np.float32)
            sub = suv[sl]
            sub[outer] = values[outer]
            uptake[sl] = np.where(outer, values, 0.0)
        own.append(ndimage.gaussian_filter(pool(uptake), sigma_vox))
    img = ndimage.gaussian_filter(pool(suv), sigma_vox)
    noise = ndimage.gaussian_filter(noise_rng.standard_normal(g.shape, dtype=np.float32), 0.7)
    noise *= np.float32(1.0 / max(float(noise.std()), 1e-6))
    img = np.maximum(img + acq["noise_c"] * np.sqrt(np.maximum(img, 0.0) + 0.05) * noise, 0.0)
    masks = []
    for blurred in own:
        mask = np.zeros(g.shape, dtype=bool)
        peak = float(blurred.max())
        if peak > 0:
            labels, _ = ndimage.label(blurred >= PET_THRESHOLD * peak)
            mask = labels == labels[np.unravel_index(int(np.argmax(blurred)), blurred.shape)]
        masks.append(mask)
    return (img * np.float32(bq_per_ml_per_suv(acq))).astype(np.float32), masks


def bq_per_ml_per_suv(acq: dict[str, Any]) -> float:
    """Activity concentration (Bq/ml, decay-corrected to the series start) of SUV 1 for a PET plan."""
    dose_at_start = acq["dose_bq"] * 2.0 ** (-acq["uptake_s"] / F18_HALF_LIFE_S)
    return dose_at_start / (acq["weight_kg"] * 1000.0)


def _ds(v: float) -> str:
    """A DS string of at most 16 characters."""
    return f"{v:.10g}"


def encode_pet_slice(values: np.ndarray) -> tuple[np.ndarray, str]:
    """Stored uint16 pixels and the Rescale Slope string of one PET slice (``max / 32767``, intercept 0)."""
    peak = float(values.max())
    slope = _ds(peak / 32767.0) if peak > 0 else "1"
    stored = np.clip(np.rint(values.astype(np.float64) / float(slope)), 0, 65535).astype("<u2")
    return stored, slope


def modality_dataset(spec: Any, plan: ModalityPlan, k: int, pixels: np.ndarray, *, manufacturer: str,
                     implementation_class_uid: str, software_versions: str) -> Dataset:
    """Slice ``k`` of an MR or PET series: the patient and study of the CT, the modality's own series,
    geometry, attributes and pixels.

    Parameters
    ----------
    spec : imaging_assets.demo.generator.PatientSpec
        The patient (identifiers, study).
    plan : ModalityPlan
    k : int
        Slice index (ascending z).
    pixels : numpy.ndarray
        The slice as rendered: uint16 MR signal, or float32 PET activity (quantised here).
    manufacturer, implementation_class_uid, software_versions : str
        As on the cohort's CT files.

    Returns
    -------
    pydicom.dataset.Dataset
        With file meta (Explicit VR Little Endian), ready for ``save_as``.
    """
    g = plan.grid
    sop_class = MRImageStorage if plan.modality == "MR" else PositronEmissionTomographyImageStorage
    sop_uid = plan.sop_instance_uids[k]
    ds = new_dataset(sop_class, sop_uid, implementation_class_uid)
    ds.InstanceCreationDate = spec.study_date
    ds.InstanceCreationTime = plan.series_time
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = spec.study_date
    ds.StudyTime = spec.study_time
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = plan.series_time
    ds.AccessionNumber = spec.accession_number
    ds.Modality = plan.modality
    ds.Manufacturer = manufacturer
    ds.InstitutionName = "Demo General Hospital"
    ds.ReferringPhysicianName = "WATSON^JOHN"
    ds.StudyDescription = "CT CHEST"  # study-level: the same in every series of the study
    if plan.modality == "MR":
        ds.StationName, ds.ManufacturerModelName, ds.SeriesDescription = "MR01", "Phantom MR 1.5T", "T1 SE AX"
    else:
        ds.StationName, ds.ManufacturerModelName, ds.SeriesDescription = "PETCT01", "Phantom PET/CT", "PET WB AC"
    ds.PatientName = spec.patient_name
    ds.PatientID = spec.patient_id
    ds.PatientBirthDate = spec.birth_date
    ds.PatientSex = spec.sex
    ds.PatientAge = f"{spec.age:03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = f"{g.slice_thickness:g}"
    ds.SpacingBetweenSlices = f"{g.slice_spacing:g}"
    ds.DeviceSerialNumber = "DEMO-0001"
    ds.SoftwareVersions = software_versions
    ds.PatientPosition = "HFS"
    set_slice_plane(ds, spec.study_instance_uid, plan, k)
    if plan.modality == "MR":
        add_mr_module(ds, plan)
        stored = pixels.astype("<u2")
    else:
        stored, slope = encode_pet_slice(pixels)
        add_pet_module(ds, plan, k, slope)
    ds.add_new(0x7FE00010, "OW", stored.tobytes())
    return ds


def add_mr_module(ds: Dataset, plan: ModalityPlan) -> None:
    """MR image attributes (T1 spin echo) and pixel description for 12-bit unsigned pixels; no rescale."""
    acq = plan.acquisition
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = "NONE"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.SequenceName = "se2d1"
    ds.RepetitionTime = _ds(acq["repetition_time"])
    ds.EchoTime = _ds(acq["echo_time"])
    ds.EchoTrainLength = 1
    ds.NumberOfAverages = "1"
    ds.ImagingFrequency = "63.86"
    ds.ImagedNucleus = "1H"
    ds.MagneticFieldStrength = _ds(acq["field_strength"])
    ds.FlipAngle = "90"
    ds.InPlanePhaseEncodingDirection = "ROW"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = "800"
    ds.WindowWidth = "1600"


def add_pet_module(ds: Dataset, plan: ModalityPlan, k: int, slope: str) -> None:
    """PET series / image / isotope attributes (BQML, decay-corrected to START) for slice ``k``."""
    acq = plan.acquisition
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SeriesType = ["WHOLE BODY", "IMAGE"]
    ds.Units = "BQML"
    ds.CountsSource = "EMISSION"
    ds.CorrectedImage = ["DECY", "ATTN", "SCAT", "DTIM", "RAN", "NORM"]
    ds.RandomsCorrectionMethod = "DLYD"
    ds.AttenuationCorrectionMethod = "CT"
    ds.ScatterCorrectionMethod = "MODEL"
    ds.DecayCorrection = "START"
    ds.ReconstructionMethod = "OSEM 3i21s"
    ds.NumberOfSlices = len(plan.sop_instance_uids)
    ds.ImageIndex = k + 1
    ds.ActualFrameDuration = acq["frame_s"] * 1000
    ds.FrameReferenceTime = "0"
    ds.DecayFactor = "1"
    ds.SliceSensitivityFactor = "1"
    ds.PatientWeight = _ds(acq["weight_kg"])
    ds.PatientSize = _ds(acq["height_m"])
    code = Dataset()
    code.CodeValue = "C-111A1"
    code.CodingSchemeDesignator = "SRT"
    code.CodeMeaning = "^18^Fluorine"
    radio = Dataset()
    radio.Radiopharmaceutical = "Fluorodeoxyglucose"
    seconds = _seconds(plan.series_time) - int(acq["uptake_s"])
    radio.RadiopharmaceuticalStartTime = f"{seconds // 3600:02d}{(seconds // 60) % 60:02d}{seconds % 60:02d}"
    radio.RadionuclideTotalDose = _ds(acq["dose_bq"])
    radio.RadionuclideHalfLife = _ds(F18_HALF_LIFE_S)
    radio.RadionuclidePositronFraction = "0.9673"
    radio.RadionuclideCodeSequence = DicomSequence([code])
    ds.RadiopharmaceuticalInformationSequence = DicomSequence([radio])
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = slope
    ds.WindowCenter = _ds(round(3.0 * bq_per_ml_per_suv(acq)))
    ds.WindowWidth = _ds(round(6.0 * bq_per_ml_per_suv(acq)))


def _seconds(tm: str) -> int:
    return int(tm[:2]) * 3600 + int(tm[2:4]) * 60 + int(tm[4:6])
