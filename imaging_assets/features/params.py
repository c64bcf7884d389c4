"""pyradiomics parameter presets, their hash, and the crop margin their filters need.

Presets are pyradiomics YAML parameter files in ``data/params/`` (:data:`PRESETS_DIR`): ``ct.yaml``,
``mr.yaml``, ``pet.yaml`` and ``default.yaml`` (modality-agnostic fallback). Every extraction stores
:func:`params_hash` of the parameters it ran with, so features from different settings are never mixed.

The crop margin
---------------
:func:`crop_margin_voxels` (and its physical summary :func:`crop_margin_mm`) answers: how far beyond
the lesion's bounding box must an image be kept so that pyradiomics, run on the cropped image, computes
the same features as on the whole image? pyradiomics preprocesses in one of three ways, and the margin
follows from what each one reads:

1. **Resampling** (``interpolator`` and ``resampledPixelSpacing`` set). pyradiomics itself resamples only
   the bounding box plus ``padDistance`` voxels of the *new* grid and then runs every filter on that
   box, so filters need nothing from further out. The new grid is anchored at the corner of the whole
   image (``imageoperations.resampleImage``); :mod:`imaging_assets.features.extract` therefore computes it
   from the whole mask and only the *intensities* come from the crop. The crop must hold the padded box
   plus the interpolator's support: 1 voxel for nearest/linear; for B-splines the kernel (2 voxels for
   cubic) plus the recursive prefilter's reach: ITK's ``BSplineDecompositionImageFilter`` spreads a change
   at distance ``d`` by ``|z|**d`` (cubic: ``z = sqrt(3) - 2``, ``|z|**20 < 4e-12``), so
   :data:`PREFILTER_VOXELS` voxels change interpolated values by < 1e-11 of the intensity range
   (measured: bit-identical features on lung1/lung2).
2. **preCrop** without resampling: pyradiomics crops to the box plus ``padDistance`` voxels before
   filtering; a crop containing that box gives it the very same array.
3. **Filters on the whole image** (neither): the margin is the largest reach of the enabled filters:

   - ``LoG``: SimpleITK's ``LaplacianRecursiveGaussian`` is a 4th-order Deriche IIR filter; its impulse
     response decays like ``exp(-1.37 |x| / sigma)``, and a crop edge at distance ``d`` changes the
     output by at most ``A * exp(-1.37 d / sigma)`` (``A`` the intensity range). Measured here on noise
     and on lung1: 8 sigma leaves 1e-4..2e-3 HU, **12 sigma** leaves float32 rounding (1e-5 on 300), so
     the margin is ``ceil(12 * sigma_max / spacing)`` voxels per axis (:data:`LOG_SIGMAS`).
   - ``Wavelet``: pyradiomics' ``_swt3`` applies ``pywt.swtn(level=1)`` ``start_level + level`` times
     (undecimated, so translation-equivariant: no alignment of the crop to ``2**level`` is needed; it
     is not *dilated* either, so each pass reaches ``dec_len - 1`` voxels). The margin is
     ``passes * (dec_len - 1) + 1`` voxels (coif1, one level: 6). The transform is *periodic*: where the
     lesion lies closer than that to the image border, stock values wrap around to the opposite side,
     so the extraction keeps that whole axis (see ``extract._crop_region``).
   - ``Gradient``: 2 voxels; ``LBP2D``: ``ceil(lbp2DRadius) + 2`` voxels; ``Original``: 0.
   - ``Square``, ``SquareRoot``, ``Logarithm``, ``Exponential`` rescale by the whole image's maximum and
     ``LBP3D`` prefilters the whole array: they cannot be cropped (:func:`crop_margin_voxels` returns
     ``None`` and the extraction runs on the whole image).

Intensity normalisation (``normalize``) uses the whole image's mean and SD; the extraction applies it to
the whole image before cropping, exactly as pyradiomics does, so it needs no margin.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from imaging_assets.settings import PROJECT_ROOT

logger = logging.getLogger(__name__)

#: Folder of the committed pyradiomics presets.
PRESETS_DIR: Path = PROJECT_ROOT / "data" / "params"

#: Preset file per DICOM modality code (upper case); anything else gets ``default.yaml`` and a warning.
MODALITY_PRESETS: dict[str, str] = {
    "CT": "ct.yaml",
    "MR": "mr.yaml",
    "MRI": "mr.yaml",
    "PT": "pet.yaml",
    "PET": "pet.yaml",
}
DEFAULT_PRESET = "default.yaml"

#: LoG crop margin in units of sigma (see the module docstring for the measurement behind it).
LOG_SIGMAS = 12.0
#: Voxels of B-spline prefilter reach kept around the resampling box, per spline order
#: (``ceil(log(1e-12) / log|z_max|)`` plus the kernel half-width, ``z_max`` the dominant pole).
PREFILTER_VOXELS: dict[int, int] = {2: 18, 3: 23, 4: 31, 5: 36}
#: Image types whose output at a voxel depends on the whole image: never cropped.
UNCROPPABLE_IMAGE_TYPES = frozenset({"Square", "SquareRoot", "Logarithm", "Exponential", "LBP3D"})

_DEFAULT_SETTINGS: dict[str, Any] = {"padDistance": 5, "interpolator": "sitkBSpline"}


def preset_path(name: str) -> Path:
    """Path of the preset ``name`` (``"ct"``, ``"mr.yaml"``, ...) in :data:`PRESETS_DIR`.

    Raises
    ------
    FileNotFoundError
        When no such preset exists (the message lists the available ones).
    """
    fname = name if name.endswith((".yaml", ".yml")) else f"{name}.yaml"
    path = PRESETS_DIR / fname
    if not path.is_file():
        available = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no pyradiomics preset {fname!r} in {PRESETS_DIR} (available: {available})")
    return path


def preset_for_modality(modality: str | None) -> Path:
    """The preset file for a DICOM modality code.

    Parameters
    ----------
    modality : str or None
        ``"CT"``, ``"MR"``, ``"PT"`` (or ``"PET"``), case-insensitive.

    Returns
    -------
    pathlib.Path
        ``ct.yaml``, ``mr.yaml`` or ``pet.yaml`` in :data:`PRESETS_DIR`; ``default.yaml`` (intensity-scale
        free: fixed bin count) with a logged warning for any other modality.
    """
    key = (modality or "").strip().upper()
    fname = MODALITY_PRESETS.get(key)
    if fname is None:
        logger.warning("no pyradiomics preset for modality %r: using %s", modality, DEFAULT_PRESET)
        fname = DEFAULT_PRESET
    return preset_path(fname)


def load_params(path: Path | str) -> dict[str, Any]:
    """Read a pyradiomics YAML (or JSON) parameter file.

    Parameters
    ----------
    path : pathlib.Path or str
        A file, or the name of a preset (``"ct"``, ``"mr"``, ``"pet"``, ``"default"``).

    Returns
    -------
    dict
        The parameters with the top-level keys pyradiomics knows (``imageType``, ``featureClass``,
        ``setting``, ``voxelSetting``). Full validation happens when pyradiomics builds its extractor.

    Raises
    ------
    FileNotFoundError, ValueError
        Missing file, or content that is not a mapping with only known top-level keys.
    """
    p = Path(path)
    if not p.is_file():
        if isinstance(path, str) and p.suffix in ("", ".yaml", ".yml") and len(p.parts) == 1:
            p = preset_path(path)
        else:
            raise FileNotFoundError(f"pyradiomics parameter file {p} does not exist")
    with p.open("r", encoding="utf-8") as fh:
        params = yaml.safe_load(fh)
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ValueError(f"{p}: a pyradiomics parameter file must be a mapping, got {type(params).__name__}")
    unknown = set(params) - {"imageType", "featureClass", "setting", "voxelSetting"}
    if unknown:
        raise ValueError(
            f"{p}: unknown top-level keys {sorted(unknown)} (pyradiomics expects imageType, featureClass, "
            "setting, voxelSetting)"
        )
    return params


def resolve_params(params: Mapping[str, Any] | str | Path | None) -> dict[str, Any]:
    """Parameters as a dict: a dict is deep-copied, a path or preset name is loaded, ``None`` is
    ``default.yaml``."""
    if params is None:
        return load_params(preset_path(DEFAULT_PRESET))
    if isinstance(params, Mapping):
        return copy.deepcopy(dict(params))
    return load_params(params)


def _canonical(obj: Any) -> Any:
    """JSON-able canonical form: tuples as lists, Paths as str, numpy scalars as Python numbers."""
    if isinstance(obj, Mapping):
        return {str(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalar
        return obj.item()
    return obj


#: Version of how an image is prepared before pyradiomics sees it; part of :func:`params_hash`, so features
#: computed under an earlier rule are re-extracted instead of mixed with new ones. ``float32-input-1``: every
#: source enters as float32 voxels with float32 geometry (see ``imaging_assets.features.extract``).
EXTRACTION_RULE = "float32-input-1"


def params_hash(params: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of ``params`` (sorted keys, no whitespace) and the
    :data:`EXTRACTION_RULE`.

    Equal parameter sets hash equally whatever their key order or YAML formatting.
    """
    text = json.dumps({"extraction_rule": EXTRACTION_RULE, "params": _canonical(params)}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _effective(params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(settings, image types with their merged per-type arguments), as pyradiomics would see them."""
    settings = dict(_DEFAULT_SETTINGS)
    settings.update(params.get("setting") or {})
    image_types = params.get("imageType")
    if image_types is None:
        image_types = {"Original": {}}
    merged: dict[str, dict[str, Any]] = {}
    for name, custom in image_types.items():
        args = dict(settings)
        args.update(custom or {})
        merged[name] = args
    return settings, merged


def resampling_enabled(settings: Mapping[str, Any]) -> bool:
    """Whether pyradiomics resamples with these settings (it needs both interpolator and spacing)."""
    return settings.get("interpolator") is not None and settings.get("resampledPixelSpacing") is not None


def interpolator_support_voxels(interpolator: Any) -> int:
    """Voxels of the source image an interpolator reads beyond a sample point (see module docstring).

    ``interpolator`` is a SimpleITK interpolator name (``"sitkBSpline"``) or its enum value.
    """
    name = str(interpolator)
    if not isinstance(interpolator, str):
        import SimpleITK as sitk

        names = [n for n in dir(sitk) if n.startswith("sitk") and isinstance(getattr(sitk, n), int)]
        matches = [n for n in names if getattr(sitk, n) == interpolator and n != "sitkUnknown"]
        interp = [n for n in matches if n in ("sitkNearestNeighbor", "sitkLinear") or "BSpline" in n
                  or "Sinc" in n or "Gaussian" in n]
        name = interp[0] if interp else name
    if name in ("sitkNearestNeighbor", "sitkLinear", "sitkBSpline1", "sitkBSplineResamplerOrder1"):
        return 1
    if "BSplineResampler" in name:  # input taken as spline coefficients: local kernel only
        return 4
    if "BSpline" in name:
        order = int(name[-1]) if name[-1].isdigit() else 3
        return PREFILTER_VOXELS.get(order, max(PREFILTER_VOXELS.values()))
    return 12  # windowed sinc / Gaussian kernels (radius <= 5): generous


def _wavelet_reach(args: Mapping[str, Any]) -> int:
    import pywt

    wavelet = args.get("wavelet", "coif1")
    w = wavelet if isinstance(wavelet, pywt.Wavelet) else pywt.Wavelet(wavelet)
    passes = int(args.get("start_level", 0)) + int(args.get("level", 1))
    return passes * (w.dec_len - 1) + 1


def wavelet_reach_voxels(params: Mapping[str, Any]) -> int:
    """Voxels the wavelet decomposition reads on each side (0 when Wavelet is off or runs on a pre-cropped
    box)."""
    settings, types = _effective(params)
    if "Wavelet" not in types or resampling_enabled(settings) or settings.get("preCrop", False):
        return 0
    return _wavelet_reach(types["Wavelet"])


def crop_margin_voxels(params: Mapping[str, Any], spacing: Sequence[float]) -> tuple[int, ...] | None:
    """Margin (voxels per axis, SimpleITK x, y, z order) to keep around the lesion's bounding box.

    Parameters
    ----------
    params : mapping
        pyradiomics parameters (see :func:`load_params`).
    spacing : sequence of float
        Voxel spacing (mm) of the image to be cropped, SimpleITK order.

    Returns
    -------
    tuple of int or None
        The margin per axis; ``None`` when an enabled image type depends on the whole image (then the
        image must not be cropped). The rule, and why it gives the stock features, is in the module
        docstring.
    """
    settings, types = _effective(params)
    sp = [float(s) for s in spacing]
    pad = int(settings.get("padDistance", 5))
    if resampling_enabled(settings):
        new = [float(r) if float(r) != 0 else s for r, s in zip(settings["resampledPixelSpacing"], sp, strict=True)]
        support = interpolator_support_voxels(settings.get("interpolator"))
        # pyradiomics' box: floor/ceil of (bb -/+ 0.5) in new voxels, +- padDistance new voxels.
        return tuple(math.ceil((pad + 2) * n / s) + support for n, s in zip(new, sp, strict=True))
    if settings.get("preCrop", False):
        return tuple(pad for _ in sp)
    if any(name in UNCROPPABLE_IMAGE_TYPES for name in types):
        return None
    margin = [0 for _ in sp]
    for name, args in types.items():
        if name == "LoG":
            sigmas = [float(s) for s in args.get("sigma", []) if float(s) > 0]
            if sigmas:
                # >= 2 also keeps the crop >= 4 voxels wherever the image is (pyradiomics skips LoG below 4)
                need = [max(2, math.ceil(LOG_SIGMAS * max(sigmas) / s)) for s in sp]
                margin = [max(m, n) for m, n in zip(margin, need, strict=True)]
        elif name == "Wavelet":
            reach = _wavelet_reach(args)
            margin = [max(m, reach) for m in margin]
        elif name == "Gradient":
            margin = [max(m, 2) for m in margin]
        elif name == "LBP2D":
            reach = math.ceil(float(args.get("lbp2DRadius", 1))) + 2
            margin = [max(m, reach) for m in margin]
        elif name != "Original":
            logger.warning("image type %r has no known crop margin: the whole image will be used", name)
            return None
    return tuple(margin)


def crop_margin_mm(params: Mapping[str, Any], spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> float:
    """Physical margin (mm) the enabled filters need around the lesion's bounding box.

    The largest over the axes of :func:`crop_margin_voxels` times the spacing; ``inf`` when the image must
    not be cropped. Grows with the LoG sigma and the wavelet levels (filters on the whole image), or with
    ``padDistance`` and the resampled spacing (resampling: filters then run on pyradiomics' padded box).

    Parameters
    ----------
    params : mapping
        pyradiomics parameters.
    spacing : sequence of float
        Voxel spacing (mm) of the image to be cropped; 1 mm isotropic by default.
    """
    vox = crop_margin_voxels(params, spacing)
    if vox is None:
        return math.inf
    return float(max(v * float(s) for v, s in zip(vox, spacing, strict=True)))


# ----------------------------------------------------------------------------------- resolved settings
#: Modality codes as feature spaces name them (DICOM codes; synonyms folded).
_MODALITY_CODES = {"MRI": "MR", "PET": "PT"}


def modality_code(modality: str | None) -> str:
    """``CT``, ``MR``, ``PT``, ... (upper case, synonyms folded; ``OT`` when unknown)."""
    key = (modality or "").strip().upper() or "OT"
    return _MODALITY_CODES.get(key, key)


@dataclass(frozen=True, eq=False)
class ExtractionSettings:
    """One validated, hashed set of pyradiomics parameters for one modality: it names its feature space.

    Built once at the edge by :func:`extraction_settings` (a preset or a user's file), then passed down;
    lesions extracted with the same settings form one feature space (:attr:`space`), and robustness, the
    robust set, scaling, vectors, clusters and search work per space, so a CT lesion is never compared
    with an MR lesion's vector.
    """

    modality: str
    params: dict[str, Any] = field(repr=False)
    params_hash: str
    source: str

    @property
    def space(self) -> str:
        """``<modality>-<first 8 hex of the params hash>``, e.g. ``CT-1a2b3c4d``."""
        return space_name(self.modality, self.params_hash)


def space_name(modality: str | None, phash: str) -> str:
    """The feature space of a modality and params hash (see :class:`ExtractionSettings`)."""
    return f"{modality_code(modality)}-{phash[:8]}"


def validate_params(params: Mapping[str, Any], source: str) -> None:
    """Validate ``params`` with pyradiomics' own schema (``radiomics/schemas/paramSchema.yaml``) before any
    extraction, so a typo stops the run at its start instead of failing every lesion.

    Raises
    ------
    ValueError
        Naming ``source`` (the file), the key or value that is wrong, and the closest valid key.
    """
    import difflib

    import pykwalify.core
    from pykwalify.errors import SchemaError
    from radiomics import getParameterValidationFiles

    schema_file, schema_funcs = getParameterValidationFiles()
    quiet = logging.getLogger("pykwalify")
    level, quiet.level = quiet.level, logging.CRITICAL  # it logs every error itself; we raise one message
    try:
        pykwalify.core.Core(source_data=_canonical(params), schema_files=[schema_file],
                            extensions=[schema_funcs]).validate(raise_exception=True)
    except SchemaError as exc:
        problems = []
        for line in str(exc.msg if hasattr(exc, "msg") else exc).splitlines():
            line = line.strip(" -")
            if not line or line.startswith(("validation.invalid", "Schema validation failed")):
                continue
            m = re.search(r"Key '([^']+)' was not defined\. Path: '([^']*)'", line)
            if m:
                key, path = m.group(1), m.group(2)
                section = path.strip("/").split("/")[0] if path.strip("/") else ""
                known = _known_keys(section)
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"unknown key {key!r} in {section or 'the top level'}{hint}")
            else:
                problems.append(line)
        raise ValueError(f"{source}: invalid pyradiomics parameters: {'; '.join(problems) or exc}") from None
    except Exception as exc:  # noqa: BLE001 - a schema function (interpolator, wavelet, ...) refused a value
        raise ValueError(f"{source}: invalid pyradiomics parameters: {exc}") from None
    finally:
        quiet.level = level


def _known_keys(section: str) -> list[str]:
    """Keys pyradiomics' schema allows in a section (``setting``, ``imageType``, ``featureClass``, top)."""
    import yaml as _yaml
    from radiomics import getParameterValidationFiles

    schema_file, _ = getParameterValidationFiles()
    with open(schema_file, encoding="utf-8") as fh:
        schema = _yaml.safe_load(fh)
    mapping = schema.get("mapping", {})
    if not section:
        return list(mapping)
    node = mapping.get(section, {})
    return list(node.get("mapping", {}) or {})


_SETTINGS_CACHE: dict[tuple[str, str, int], ExtractionSettings] = {}


def extraction_settings(modality: str | None, override: str | Path | Mapping[str, Any] | None = None
                        ) -> ExtractionSettings:
    """The settings a lesion of ``modality`` is extracted with: the user's parameters when given, else the
    modality's preset; validated (:func:`validate_params`) and hashed once.

    Parameters
    ----------
    modality
        DICOM modality code of the image (``CT``, ``MR``, ``PT``; others use ``default.yaml``).
    override
        A pyradiomics YAML path (or preset name), or a parameter mapping, used for every modality.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        The file is not valid pyradiomics parameters; the message names the file and the key.
    """
    if isinstance(override, Mapping):
        params = resolve_params(override)
        validate_params(params, "params")
        return ExtractionSettings(modality_code(modality), params, params_hash(params), "params")
    if not override:
        path = preset_for_modality(modality)
    elif Path(override).is_file():
        path = Path(override)
    elif len(Path(override).parts) == 1 and Path(override).suffix in ("", ".yaml", ".yml"):
        path = preset_path(str(override))  # a preset name: "ct", "mr.yaml"
    else:
        raise FileNotFoundError(f"pyradiomics parameter file {override} does not exist")
    key = (modality_code(modality), str(path), path.stat().st_mtime_ns)
    cached = _SETTINGS_CACHE.get(key)
    if cached is None:
        params = load_params(path)
        validate_params(params, str(path))
        cached = _SETTINGS_CACHE[key] = ExtractionSettings(key[0], params, params_hash(params), str(path))
    return cached
