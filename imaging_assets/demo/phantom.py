"""Analytic chest phantom and lesion shapes for the synthetic demo cohort.

Everything here is defined in patient coordinates (millimetres, DICOM LPS: +x to the patient's left,
+y posterior, +z superior) and rasterised by evaluating the analytic shapes at voxel centres of a
:class:`Grid`. That makes a test-retest pair honest: the second series is the *same* anatomy and the
*same* lesion shapes, shifted and sampled on another grid, with fresh noise.

Lesion phenotypes (:data:`PHENOTYPES`):

``small_smooth``
    small (3-6 mm) near-spherical, homogeneous soft-tissue nodule.
``necrotic_rim``
    7-11 mm, enhancing rim (90-150 HU) around a low-density core (55-75 % of the radius). The core is
    fluid (0-25 HU, part of the lesion mask) or, for "hollow" (cavitating, 10 %) lesions, air
    (-950..-850 HU) and *excluded* from the mask, so the mask is a closed shell whose mid slices are rings
    (RTSTRUCT outer + inner contour).
``lobulated_heterogeneous``
    large (9-13 mm), lobulated outline (broad bumps and dents), strongly heterogeneous texture (10-50 HU).
``spiculated``
    5-8 mm core with 8-16 spikes (3-5 mm wide at the base) reaching 0.8-1.4 core radii further out.
``ground_glass``
    5-10 mm, low density (-700..-450 HU) heterogeneous opacity, always inside a lung.

Sizes, densities and texture amplitudes of the phenotypes overlap so that none of them is separable by a
single feature.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

#: Lesion phenotypes, in the order used to cycle the first lesion of each patient.
PHENOTYPES: tuple[str, ...] = (
    "small_smooth",
    "necrotic_rim",
    "lobulated_heterogeneous",
    "spiculated",
    "ground_glass",
)

HU_MIN = -1024
HU_MAX = 3071


@dataclass(frozen=True)
class Grid:
    """An axial image grid (identity orientation) in patient coordinates.

    Attributes
    ----------
    rows, columns : int
        In-plane matrix size.
    pixel_spacing : float
        Square in-plane spacing in mm.
    origin_x, origin_y : float
        Patient x/y (mm) of the centre of pixel (row 0, column 0).
    z_positions : tuple of float
        Patient z (mm) of each slice, ascending.
    slice_thickness : float
        Nominal slice thickness in mm.
    """

    rows: int
    columns: int
    pixel_spacing: float
    origin_x: float
    origin_y: float
    z_positions: tuple[float, ...]
    slice_thickness: float

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(slices, rows, columns)``."""
        return (len(self.z_positions), self.rows, self.columns)

    @property
    def slice_spacing(self) -> float:
        """Distance between consecutive slice centres (mm)."""
        if len(self.z_positions) < 2:
            return self.slice_thickness
        return float(round(self.z_positions[1] - self.z_positions[0], 6))

    def xs(self) -> np.ndarray:
        """Patient x (mm) of each column centre."""
        return self.origin_x + np.arange(self.columns) * self.pixel_spacing

    def ys(self) -> np.ndarray:
        """Patient y (mm) of each row centre."""
        return self.origin_y + np.arange(self.rows) * self.pixel_spacing

    def zs(self) -> np.ndarray:
        """Patient z (mm) of each slice centre."""
        return np.asarray(self.z_positions, dtype=np.float64)


@dataclass(frozen=True, eq=False)
class Anatomy:
    """Analytic chest anatomy parameters (mm, HU), centred on the patient axis."""

    body_ax: float
    body_ay: float
    fat_thickness: float
    lung_cx: float
    lung_cy: float
    lung_ax: float
    lung_ay: float
    z_center: float
    z_half: float
    spine_cy: float
    spine_r: float
    heart_cx: float
    heart_cy: float
    heart_ax: float
    heart_ay: float
    aorta_cx: float
    aorta_cy: float
    aorta_r: float
    ribs: np.ndarray  # (n, 3): x, y, radius
    vessels: np.ndarray  # (n, 5): x, y at z_center, slope x, slope y, radius
    hu_fat: float
    hu_muscle: float
    hu_lung: float
    hu_heart: float
    hu_bone: float

    def lung_scale(self, z: np.ndarray) -> np.ndarray:
        """Relative lung cross-section scale at patient z (1 at the centre, 0.8 at the slab ends)."""
        t = np.clip((np.asarray(z, dtype=np.float64) - self.z_center) / self.z_half, -1.0, 1.0)
        return 0.8 + 0.2 * np.cos(0.5 * np.pi * t)


@dataclass(frozen=True, eq=False)
class Lesion:
    """One analytic lesion: a deformed, rotated ellipsoid with an optional core and a texture field.

    The outer surface in normalised coordinates ``u = R.T @ (p - c) / axes`` is
    ``|u| <= 1 + sum_k w_k exp(kappa_k (d . v_k - 1))`` with ``d = u/|u|``: broad bumps give lobulation,
    narrow ones spicules. The core is ``|u| <= core_frac``.
    """

    phenotype: str
    center: np.ndarray  # (3,) mm, anatomy frame
    axes: np.ndarray  # (3,) mm
    rotation: np.ndarray  # (3, 3)
    bump_dirs: np.ndarray  # (k, 3) unit vectors
    bump_weights: np.ndarray  # (k,)
    bump_kappa: np.ndarray  # (k,)
    core_frac: float
    hollow: bool
    hu_base: float
    hu_sd: float
    hu_core: float
    tex_freq: np.ndarray  # (m, 3) rad/mm
    tex_phase: np.ndarray  # (m,)
    location: str
    r_max: float = field(default=0.0)

    def evaluate(
        self, px: np.ndarray, py: np.ndarray, pz: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Evaluate the lesion at points given in the anatomy frame.

        Parameters
        ----------
        px, py, pz : numpy.ndarray
            Broadcastable coordinate arrays (mm).

        Returns
        -------
        outer : numpy.ndarray of bool
            Inside the outer surface.
        core : numpy.ndarray of bool
            Inside the core (all False when the lesion has no core).
        hu : numpy.ndarray of float
            Lesion density (HU) at the points (texture included), meaningful where ``outer``.
        """
        qx, qy, qz = np.broadcast_arrays(px - self.center[0], py - self.center[1], pz - self.center[2])
        q = np.stack([qx, qy, qz], axis=-1)
        u = (q @ self.rotation) / self.axes
        rho = np.sqrt(np.sum(u * u, axis=-1))
        limit = np.ones_like(rho)
        if len(self.bump_weights):
            d = u / np.maximum(rho, 1e-9)[..., None]
            cos = d @ self.bump_dirs.T
            limit = limit + np.sum(self.bump_weights * np.exp(self.bump_kappa * (cos - 1.0)), axis=-1)
        outer = rho <= limit
        core = rho <= self.core_frac if self.core_frac > 0 else np.zeros_like(outer)
        phase = q @ self.tex_freq.T + self.tex_phase
        tex = np.sqrt(2.0 / len(self.tex_phase)) * np.sum(np.cos(phase), axis=-1)
        hu = self.hu_base + self.hu_sd * tex
        if self.core_frac > 0:
            hu = np.where(core, self.hu_core + 0.25 * self.hu_sd * tex, hu)
        return outer, core, hu

    def volume_mm3(self, step: float = 0.5) -> float:
        """Outer volume (mm^3) by quadrature on a regular ``step`` mm grid (deterministic)."""
        n = int(np.ceil(self.r_max / step)) + 1
        g = (np.arange(-n, n + 1) * step)
        outer, _, _ = self.evaluate(
            self.center[0] + g[None, None, :],
            self.center[1] + g[None, :, None],
            self.center[2] + g[:, None, None],
        )
        return float(outer.sum() * step**3)


def _fibonacci_sphere(n: int) -> np.ndarray:
    i = np.arange(n) + 0.5
    phi = np.arccos(1.0 - 2.0 * i / n)
    theta = np.pi * (1.0 + 5.0**0.5) * i
    return np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], axis=1)


_SPHERE = _fibonacci_sphere(4000)


def _max_limit(dirs: np.ndarray, w: np.ndarray, k: np.ndarray) -> float:
    """Maximum of the normalised outer radius ``1 + sum_k w_k exp(kappa_k (d.v_k - 1))`` over directions."""
    if len(w) == 0:
        return 1.0
    d = np.concatenate([_SPHERE, dirs])
    limit = 1.0 + np.sum(w * np.exp(k * (d @ dirs.T - 1.0)), axis=1)
    return float(limit.max())


def _rotation(rng: np.random.Generator) -> np.ndarray:
    """A random rotation matrix (QR of a Gaussian matrix, sign-fixed)."""
    a = rng.standard_normal((3, 3))
    q, r = np.linalg.qr(a)
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _unit_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def sample_anatomy(rng: np.random.Generator, z_center: float, z_half: float) -> Anatomy:
    """Draw the anatomy of one patient.

    Parameters
    ----------
    rng : numpy.random.Generator
        Patient random generator.
    z_center, z_half : float
        Centre and half length (mm) of the scanned slab; lungs taper towards its ends.

    Returns
    -------
    Anatomy
    """
    ax = float(rng.uniform(36.0, 40.0))
    ay = float(rng.uniform(27.0, 31.0))
    fat = float(rng.uniform(3.0, 6.0))
    n_ribs = 8
    angles = np.linspace(0.15 * np.pi, 0.85 * np.pi, n_ribs // 2)
    angles = np.concatenate([angles, angles + np.pi]) + rng.uniform(-0.05, 0.05, n_ribs)
    rib_rows = []
    for a in angles:
        rr = 1.0 - (fat + 1.5) / min(ax, ay)
        rib_rows.append([rr * ax * np.cos(a), rr * ay * np.sin(a), rng.uniform(1.2, 2.0)])
    lung_cx = 0.45 * ax
    lung_cy = -0.05 * ay
    lung_ax = 0.36 * ax
    lung_ay = 0.72 * ay
    vessels = []
    for side in (-1.0, 1.0):
        for _ in range(int(rng.integers(4, 8))):
            r = np.sqrt(rng.uniform(0.0, 0.7**2))
            t = rng.uniform(0, 2 * np.pi)
            vessels.append(
                [
                    side * lung_cx + r * lung_ax * np.cos(t),
                    lung_cy + r * lung_ay * np.sin(t),
                    rng.uniform(-0.15, 0.15),
                    rng.uniform(-0.15, 0.15),
                    rng.uniform(0.6, 1.4),
                ]
            )
    return Anatomy(
        body_ax=ax,
        body_ay=ay,
        fat_thickness=fat,
        lung_cx=lung_cx,
        lung_cy=lung_cy,
        lung_ax=lung_ax,
        lung_ay=lung_ay,
        z_center=z_center,
        z_half=z_half,
        spine_cy=0.68 * ay,
        spine_r=float(rng.uniform(4.0, 5.0)),
        heart_cx=0.05 * ax,
        heart_cy=-0.25 * ay,
        heart_ax=0.25 * ax,
        heart_ay=0.35 * ay,
        aorta_cx=-0.1 * ax,
        aorta_cy=0.28 * ay,
        aorta_r=float(rng.uniform(3.0, 4.0)),
        ribs=np.asarray(rib_rows, dtype=np.float64),
        vessels=np.asarray(vessels, dtype=np.float64),
        hu_fat=float(rng.uniform(-110.0, -85.0)),
        hu_muscle=float(rng.uniform(40.0, 55.0)),
        hu_lung=float(rng.uniform(-870.0, -830.0)),
        hu_heart=float(rng.uniform(30.0, 42.0)),
        hu_bone=float(rng.uniform(850.0, 1000.0)),
    )


def _in_lung(an: Anatomy, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    s = an.lung_scale(z)
    ex = (np.abs(x) - an.lung_cx) / (an.lung_ax * s)
    ey = (y - an.lung_cy) / (an.lung_ay * s)
    return ex * ex + ey * ey <= 1.0


#: Tissue classes of :func:`anatomy_labels` (index = label value); later ones are drawn over earlier ones.
TISSUES: tuple[str, ...] = ("air", "fat", "muscle", "heart", "lung", "vessel", "aorta", "rib", "bone", "marrow")


def anatomy_labels(an: Anatomy, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Tissue class (index into :data:`TISSUES`) at broadcastable anatomy-frame coordinates (mm).

    The same geometry for every modality: :func:`anatomy_hu` maps it to HU, the MR and PET renderers of
    :mod:`imaging_assets.demo.modalities` to their own intensities.
    """
    x, y, z = np.broadcast_arrays(x, y, z)
    t = {name: i for i, name in enumerate(TISSUES)}
    lab = np.zeros(x.shape, dtype=np.uint8)
    lab[(x / an.body_ax) ** 2 + (y / an.body_ay) ** 2 <= 1.0] = t["fat"]
    inner_ax = an.body_ax - an.fat_thickness
    inner_ay = an.body_ay - an.fat_thickness
    lab[(x / inner_ax) ** 2 + (y / inner_ay) ** 2 <= 1.0] = t["muscle"]
    lab[((x - an.heart_cx) / an.heart_ax) ** 2 + ((y - an.heart_cy) / an.heart_ay) ** 2 <= 1.0] = t["heart"]
    lung = _in_lung(an, x, y, z)
    lab[lung] = t["lung"]
    for vx, vy, sx, sy, vr in an.vessels:
        dz = z - an.z_center
        ves = (x - (vx + sx * dz)) ** 2 + (y - (vy + sy * dz)) ** 2 <= vr * vr
        lab[ves & lung] = t["vessel"]
    lab[(x - an.aorta_cx) ** 2 + (y - an.aorta_cy) ** 2 <= an.aorta_r**2] = t["aorta"]
    for rx, ry, rr in an.ribs:
        lab[(x - rx) ** 2 + (y - ry) ** 2 <= rr * rr] = t["rib"]
    d2 = x**2 + (y - an.spine_cy) ** 2
    lab[d2 <= an.spine_r**2] = t["bone"]
    lab[d2 <= (0.7 * an.spine_r) ** 2] = t["marrow"]  # trabecular core
    return lab


def anatomy_hu(an: Anatomy, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Noise-free background density (HU) at broadcastable anatomy-frame coordinates.

    Parameters
    ----------
    an : Anatomy
    x, y, z : numpy.ndarray
        Coordinates (mm), e.g. shaped ``(1, 1, nx)``, ``(1, ny, 1)``, ``(nz, 1, 1)``.

    Returns
    -------
    numpy.ndarray of float32
        Densities with the broadcast shape.
    """
    lut = np.array([-1000.0, an.hu_fat, an.hu_muscle, an.hu_heart, an.hu_lung, an.hu_heart, an.hu_heart + 5.0,
                    an.hu_bone - 150.0, an.hu_bone, an.hu_bone - 150.0], dtype=np.float32)  # TISSUES order
    return lut[anatomy_labels(an, x, y, z)]


def _texture(rng: np.random.Generator, wavelength: float, m: int = 10) -> tuple[np.ndarray, np.ndarray]:
    freq = _unit_vectors(rng, m) * (2.0 * np.pi / wavelength) * rng.uniform(0.7, 1.3, (m, 1))
    phase = rng.uniform(0.0, 2.0 * np.pi, m)
    return freq, phase


def sample_lesion_shape(
    rng: np.random.Generator, phenotype: str, *, hollow: bool = False
) -> dict[str, object]:
    """Draw size, shape, density and texture parameters of one lesion of a phenotype.

    Parameters
    ----------
    rng : numpy.random.Generator
    phenotype : str
        One of :data:`PHENOTYPES`.
    hollow : bool
        For ``necrotic_rim`` only: air-filled core excluded from the mask.

    Returns
    -------
    dict
        Keyword arguments for :class:`Lesion` (without ``center`` and ``location``).
    """
    no_bumps = (np.zeros((0, 3)), np.zeros(0), np.zeros(0))
    core_frac, hu_core = 0.0, 0.0
    if phenotype == "small_smooth":
        r = rng.uniform(3.0, 6.0)
        axes = r * rng.uniform(0.85, 1.15, 3)
        dirs, w, k = no_bumps
        hu_base, hu_sd = rng.uniform(5.0, 60.0), rng.uniform(3.0, 10.0)
        tex = _texture(rng, rng.uniform(4.0, 8.0))
    elif phenotype == "lobulated_heterogeneous":
        r = rng.uniform(9.0, 13.0)
        axes = r * rng.uniform(0.8, 1.2, 3)
        n = int(rng.integers(4, 8))
        dirs = _unit_vectors(rng, n)
        w = rng.uniform(0.12, 0.3, n) * np.where(rng.uniform(size=n) < 0.7, 1.0, -0.6)
        k = rng.uniform(3.0, 6.0, n)
        hu_base, hu_sd = rng.uniform(10.0, 50.0), rng.uniform(25.0, 45.0)
        tex = _texture(rng, rng.uniform(3.0, 6.0))
    elif phenotype == "necrotic_rim":
        r = rng.uniform(7.0, 11.0)
        axes = r * rng.uniform(0.9, 1.1, 3)
        n = 3
        dirs = _unit_vectors(rng, n)
        w = rng.uniform(0.02, 0.06, n)
        k = rng.uniform(2.0, 4.0, n)
        hu_base, hu_sd = rng.uniform(90.0, 150.0), rng.uniform(8.0, 15.0)
        core_frac = float(rng.uniform(0.55, 0.75))
        hu_core = float(rng.uniform(-950.0, -850.0) if hollow else rng.uniform(0.0, 25.0))
        tex = _texture(rng, rng.uniform(3.0, 6.0))
    elif phenotype == "spiculated":
        r = rng.uniform(5.0, 8.0)
        axes = r * rng.uniform(0.85, 1.15, 3)
        n = int(rng.integers(8, 17))
        dirs = _unit_vectors(rng, n)
        w = rng.uniform(0.8, 1.4, n)
        k = rng.uniform(30.0, 80.0, n)
        hu_base, hu_sd = rng.uniform(20.0, 70.0), rng.uniform(8.0, 18.0)
        tex = _texture(rng, rng.uniform(3.0, 6.0))
    elif phenotype == "ground_glass":
        r = rng.uniform(5.0, 10.0)
        axes = r * rng.uniform(0.8, 1.2, 3)
        n = 4
        dirs = _unit_vectors(rng, n)
        w = rng.uniform(0.05, 0.12, n)
        k = rng.uniform(2.0, 4.0, n)
        hu_base, hu_sd = rng.uniform(-700.0, -450.0), rng.uniform(25.0, 50.0)
        tex = _texture(rng, rng.uniform(3.0, 6.0))
    else:
        raise ValueError(f"unknown phenotype {phenotype!r}; expected one of {PHENOTYPES}")
    rotation = _rotation(rng)
    r_max = float(np.max(axes) * _max_limit(np.asarray(dirs), np.asarray(w), np.asarray(k)) * 1.05)
    return {
        "phenotype": phenotype,
        "axes": np.asarray(axes, dtype=np.float64),
        "rotation": rotation,
        "bump_dirs": np.asarray(dirs, dtype=np.float64),
        "bump_weights": np.asarray(w, dtype=np.float64),
        "bump_kappa": np.asarray(k, dtype=np.float64),
        "core_frac": core_frac,
        "hollow": bool(hollow and phenotype == "necrotic_rim"),
        "hu_base": float(hu_base),
        "hu_sd": float(hu_sd),
        "hu_core": hu_core,
        "tex_freq": tex[0],
        "tex_phase": tex[1],
        "r_max": r_max,
    }


def place_lesions(
    rng: np.random.Generator,
    anatomy: Anatomy,
    shapes: list[dict[str, object]],
    z_low: float,
    z_high: float,
    margin: float = 10.0,
    max_tries: int = 200,
) -> list[Lesion]:
    """Place lesion shapes inside the lungs (or mediastinum) without overlap.

    Parameters
    ----------
    rng : numpy.random.Generator
    anatomy : Anatomy
    shapes : list of dict
        Output of :func:`sample_lesion_shape`; the first one is always placed.
    z_low, z_high : float
        Patient z range (mm) of the scanned slab.
    margin : float
        Extra distance (mm) kept from the slab ends (covers test-retest shifts).
    max_tries : int
        Rejection-sampling attempts per lesion; a lesion (other than the first) that cannot be placed
        is dropped.

    Returns
    -------
    list of Lesion
    """
    placed: list[Lesion] = []
    for i, shape in enumerate(shapes):
        r_max = float(shape["r_max"])  # type: ignore[arg-type]
        zl, zh = z_low + r_max + margin, z_high - r_max - margin
        if zh <= zl:  # slab too short for the margins: centre the lesion
            zl = zh = 0.5 * (z_low + z_high)
        for _attempt in range(max_tries):
            cz = float(rng.uniform(zl, zh))
            ground_glass = shape["phenotype"] == "ground_glass"
            if not ground_glass and rng.uniform() < 0.2:
                location = "mediastinum"
                cx = float(rng.uniform(-0.12, 0.12) * anatomy.body_ax)
                cy = float(rng.uniform(-0.45, 0.1) * anatomy.body_ay)
            else:
                location = "lung"
                side = 1.0 if rng.uniform() < 0.5 else -1.0
                s = float(anatomy.lung_scale(np.asarray(cz)))
                rr = np.sqrt(rng.uniform(0.0, 0.55**2))
                t = rng.uniform(0.0, 2.0 * np.pi)
                cx = float(side * anatomy.lung_cx + rr * anatomy.lung_ax * s * np.cos(t))
                cy = float(anatomy.lung_cy + rr * anatomy.lung_ay * s * np.sin(t))
            c = np.array([cx, cy, cz])
            if all(np.linalg.norm(c - p.center) > r_max + p.r_max + 2.0 for p in placed):
                placed.append(Lesion(center=c, location=location, **shape))  # type: ignore[arg-type]
                break
        else:
            if i == 0:
                raise RuntimeError("could not place the first lesion")
            logger.debug("dropped lesion %d after %d tries", i, max_tries)
    return placed


def render(
    grid: Grid,
    anatomy: Anatomy,
    lesions: list[Lesion],
    shift: tuple[float, float, float],
    noise_sigma: float,
    noise_rng: np.random.Generator,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Rasterise anatomy and lesions on a grid and add correlated Gaussian noise.

    Parameters
    ----------
    grid : Grid
    anatomy : Anatomy
    lesions : list of Lesion
    shift : tuple of float
        Translation (mm) of the patient (anatomy frame) in patient coordinates for this acquisition.
    noise_sigma : float
        Noise standard deviation (HU).
    noise_rng : numpy.random.Generator
        Generator used only for the noise.

    Returns
    -------
    hu : numpy.ndarray of int16
        ``(slices, rows, columns)`` densities in HU, clipped to [-1024, 3071].
    masks : list of numpy.ndarray of bool
        One ``(slices, rows, columns)`` mask per lesion.
    """
    xs = grid.xs() - shift[0]
    ys = grid.ys() - shift[1]
    zs = grid.zs() - shift[2]
    vol = anatomy_hu(anatomy, xs[None, None, :], ys[None, :, None], zs[:, None, None])
    masks: list[np.ndarray] = []
    for les in lesions:
        mask = np.zeros(grid.shape, dtype=bool)
        reach = les.r_max + grid.pixel_spacing
        ix = np.nonzero(np.abs(xs - les.center[0]) <= reach)[0]
        iy = np.nonzero(np.abs(ys - les.center[1]) <= reach)[0]
        iz = np.nonzero(np.abs(zs - les.center[2]) <= reach + grid.slice_spacing)[0]
        if len(ix) and len(iy) and len(iz):
            sl = (slice(iz[0], iz[-1] + 1), slice(iy[0], iy[-1] + 1), slice(ix[0], ix[-1] + 1))
            outer, core, hu = les.evaluate(
                xs[sl[2]][None, None, :], ys[sl[1]][None, :, None], zs[sl[0]][:, None, None]
            )
            sub = vol[sl]
            sub[outer] = hu[outer]
            if les.core_frac > 0:
                sub[core] = hu[core]
            mask[sl] = (outer & ~core) if les.hollow else outer
        masks.append(mask)
    noise = noise_rng.standard_normal(grid.shape, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, sigma=(0.0, 0.6, 0.6))
    noise *= np.float32(noise_sigma / max(float(noise.std()), 1e-6))
    vol += noise
    hu_out = np.clip(np.rint(vol), HU_MIN, HU_MAX).astype(np.int16)
    return hu_out, masks
