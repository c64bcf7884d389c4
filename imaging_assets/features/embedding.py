"""Deep lesion embeddings: a small self-supervised 3-D CNN trained on CPU, and a loader for any encoder.

Pure code (torch, numpy; onnxruntime only to run an ONNX model). Crops come from
:func:`imaging_assets.features.crops.lesion_crop`: ``(2, S, S, S)`` arrays, channel 0 the normalised
intensity, channel 1 the mask fraction.

Encoder (:class:`LesionEncoder`)
    The crop is first resampled to ``internal_size``^3 (24: 2 mm voxels for the 48 mm crop; trilinear, which
    for a factor 2 is the 2x2x2 mean) and the image is kept only within ``focus_vox`` voxels (4 mm) of the
    mask, so the encoder describes the lesion and its margin rather than the anatomy around it (otherwise
    instance discrimination learns "where in the chest"). Four stages, each a stride-2 3x3x3 convolution and
    a stride-1 3x3x3 convolution (BatchNorm + GELU after each), widths 16-32-64-``embedding_dim``:
    24^3 -> 12^3 -> 6^3 -> 3^3 -> 2^3; then global mean, global max and mask-weighted mean pooling
    concatenated and a linear layer to ``embedding_dim``. ~0.65 M parameters; inference well above 100
    crops/s on two CPU cores. BatchNorm, not GroupNorm: a per-crop normalisation removes the crop's absolute
    intensity level, the very thing that tells ground-glass from solid lesions (measured: GroupNorm
    embeddings carried lesion volume but hardly density). In eval mode (what is exported) BatchNorm uses its
    running statistics, so a lesion's embedding does not depend on its batch. The stored embedding is this
    representation; the 2-layer projection head is used only for the self-supervised loss and not exported.

Self-supervised objective
    SimCLR (NT-Xent, temperature :attr:`TrainConfig.temperature` 0.1): two augmented views of each crop in
    a batch attract, all other crops of the batch repel. VICReg is available as ``method="vicreg"`` but was
    not tuned (on the demo cohort only SimCLR was measured to the end). Defaults (25 epochs of 32 crops,
    AdamW 1e-3 with 2 warm-up epochs and a cosine decay) train the 223-lesion demo cohort in about 2.5-4.5
    minutes on two heavily shared CPU cores, in about 30 s on two idle ones. (Batches of 16 at lr 2e-3
    collapsed to a constant embedding in one
    measured run; 32 gives ~7 optimiser steps per epoch on the demo.)

Augmentations (identity-preserving, one random affine per view applied with one ``grid_sample``)
    random flips of every axis and a random axis permutation (the 48 signed permutations: all 90-degree
    rotations and mirrors), a small rotation (+-``rotate_deg`` about each axis), isotropic scale
    (+-``scale``), a shift of up to ``shift_vox`` voxels; both channels move together. Channel 0 only:
    gain (1 +- ``gain``), offset (+- ``offset``) and Gaussian noise (SD ``noise``).

Determinism
    The weights are a function of the seed, the crops (in order) and the config: ``torch.manual_seed``, a
    :class:`numpy.random.Generator` and a :class:`torch.Generator` from the seed, a fixed thread count and
    ``torch.use_deterministic_algorithms(True)`` during training (the previous global settings are restored
    afterwards). ``max_seconds`` is a safety cap: no epoch starts that would end past it (by the slowest epoch so far);
    a run that hits it is marked
    ``stopped_early`` and is then no longer a function of the seed alone.

Memory
    Crops are read from a :class:`CropSource` one batch at a time; the cohort is never stacked.

Bring your own model
    :func:`save_encoder` writes TorchScript plus a JSON sidecar ``<file>.json``;
    :func:`imaging_assets.features.embedder.load_embedder` loads that or a user's TorchScript or ONNX file the
    same way.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

#: Version of the encoder's definition (architecture, objective, augmentations), for content hashes.
ENCODER_VERSION = "1"
TORCHSCRIPT_SUFFIXES = (".pt", ".ts", ".torchscript", ".pth", ".jit")
ONNX_SUFFIXES = (".onnx",)
INTENSITY_MODES = ("project", "zscore", "minmax")
SINGLE_CHANNEL_MODES = ("image", "image_times_mask")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (all of it goes into the model's sidecar)."""

    seed: int = 0
    epochs: int = 25
    batch_size: int = 32
    embedding_dim: int = 96
    learning_rate: float = 1e-3
    max_seconds: float = 300.0
    threads: int = 0
    method: str = "simclr"  # "simclr" (NT-Xent) or "vicreg"
    temperature: float = 0.1
    weight_decay: float = 1e-4
    widths: tuple[int, ...] = (16, 32, 64)  # stage widths before the last stage (whose width is embedding_dim)
    projection_dim: int = 64
    rotate_deg: float = 10.0
    scale: float = 0.1
    shift_vox: float = 3.0
    gain: float = 0.1
    offset: float = 0.05
    noise: float = 0.02
    flips: bool = True  # random flips and axis permutations
    warmup_epochs: int = 2
    focus_vox: int = 2  # the image is kept only within this many (internal) voxels of the mask; -1: whole crop
    norm: str = "batch"  # "batch" (keeps absolute intensity levels) or "group" (per-crop normalisation)
    internal_size: int = 24  # the encoder resamples its input to this cube first (24: 2 mm for a 48 mm crop)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d


class CropSource(Protocol):
    """Lazy, indexable crops: ``len(source)`` crops, ``source[i]`` a ``(2, S, S, S)`` array."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> np.ndarray: ...


@dataclass
class TrainedEncoder:
    """A trained encoder (eval mode, input ``(N, 2, S, S, S)`` float32 -> ``(N, embedding_dim)``)."""

    module: nn.Module
    loss_curve: list[float]
    epochs: int
    elapsed_s: float
    stopped_early: bool
    config: TrainConfig
    input_size: int


# ------------------------------------------------------------------------------------------- model
def _block(cin: int, cout: int, stride: int, norm: str = "batch") -> list[nn.Module]:
    if norm == "batch":
        layer: nn.Module = nn.BatchNorm3d(cout)
    elif norm == "group":
        layer = nn.GroupNorm(min(8, cout // 4) or 1, cout)
    else:
        raise ValueError(f"unknown norm {norm!r}; expected 'batch' or 'group'")
    return [nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False), layer, nn.GELU()]


def _dilate(m: torch.Tensor, r: int) -> torch.Tensor:
    """Box dilation (max filter of half-width ``r``) of (N, C, D, H, W), one axis at a time (max_pool3d with
    stride 1 is slow on CPU)."""
    for dim in (2, 3, 4):
        pads = [0, 0, 0, 0, 0, 0]
        pads[2 * (4 - dim)] = r
        pads[2 * (4 - dim) + 1] = r
        p = F.pad(m, pads)
        n = m.shape[dim]
        out = p.narrow(dim, 0, n)
        for i in range(1, 2 * r + 1):
            out = torch.maximum(out, p.narrow(dim, i, n))
        m = out
    return m


class LesionEncoder(nn.Module):
    """The small 3-D CNN (see the module docstring)."""

    def __init__(self, in_channels: int = 2, widths: tuple[int, ...] = (16, 32, 64), embedding_dim: int = 96,
                 internal_size: int = 24, focus_vox: int = 2, norm: str = "batch"):
        super().__init__()
        self.internal_size = int(internal_size)
        self.focus_vox = int(focus_vox)
        layers: list[nn.Module] = []
        cin = in_channels
        for w in (*widths, embedding_dim):
            layers += _block(cin, w, 2, norm) + _block(w, w, 1, norm)
            cin = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(3 * embedding_dim, embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.internal_size
        if x.shape[2] != s or x.shape[3] != s or x.shape[4] != s:
            x = F.interpolate(x, size=[s, s, s], mode="trilinear", align_corners=False)
        if self.focus_vox >= 0 and x.shape[1] == 2:
            near = _dilate(x[:, 1:2], self.focus_vox)
            x = torch.cat([x[:, 0:1] * near, x[:, 1:2]], dim=1)
        h = self.features(x)
        w = F.adaptive_avg_pool3d(x[:, -1:], h.shape[2:])
        inside = (h * w).sum(dim=(2, 3, 4)) / (w.sum(dim=(2, 3, 4)) + 1e-3)
        pooled = torch.cat([h.mean(dim=(2, 3, 4)), h.amax(dim=(2, 3, 4)), inside], dim=1)
        return self.head(pooled)


class _Projector(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ------------------------------------------------------------------------------------------- losses
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalised temperature-scaled cross entropy of two views (N, D) each."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, target)


def vicreg(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """VICReg (invariance 25, variance 25, covariance 1)."""
    inv = F.mse_loss(z1, z2)
    loss = 25.0 * inv
    for z in (z1, z2):
        z = z - z.mean(dim=0)
        std = torch.sqrt(z.var(dim=0) + 1e-4)
        loss = loss + 25.0 * torch.mean(F.relu(1.0 - std)) / 2
        cov = (z.T @ z) / max(1, z.shape[0] - 1)
        off = cov - torch.diag(torch.diag(cov))
        loss = loss + (off.pow(2).sum() / z.shape[1]) / 2
    return loss


# ------------------------------------------------------------------------------------------- augmentation
_SIGNED_PERMS = [np.diag(s)[list(p)] for p in
                 ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))
                 for s in ((a, b, c) for a in (1, -1) for b in (1, -1) for c in (1, -1))]


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    r = np.eye(3)
    for axis, ang in enumerate(np.deg2rad(rng.uniform(-max_deg, max_deg, 3))):
        c, s = math.cos(ang), math.sin(ang)
        i, j = [a for a in range(3) if a != axis]
        m = np.eye(3)
        m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
        r = m @ r
    return r


def augment(x: torch.Tensor, cfg: TrainConfig, rng: np.random.Generator, gen: torch.Generator,
            out_size: int | None = None) -> torch.Tensor:
    """One random view of each crop of ``x`` (N, 2, S, S, S), sampled on an ``out_size`` cube covering the same
    field of view (default S; see the module docstring)."""
    n, s = x.shape[0], x.shape[2]
    o = int(out_size or s)
    thetas = np.zeros((n, 3, 4))
    for b in range(n):
        m = _SIGNED_PERMS[int(rng.integers(len(_SIGNED_PERMS)))] if cfg.flips else np.eye(3)
        m = _rotation(rng, cfg.rotate_deg) @ m * (1.0 + rng.uniform(-cfg.scale, cfg.scale))
        thetas[b, :, :3] = m
        thetas[b, :, 3] = rng.uniform(-cfg.shift_vox, cfg.shift_vox, 3) * 2.0 / s
    theta = torch.from_numpy(thetas).float()
    grid = F.affine_grid(theta, [n, x.shape[1], o, o, o], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    gain = torch.from_numpy(1.0 + rng.uniform(-cfg.gain, cfg.gain, (n, 1, 1, 1))).float()
    off = torch.from_numpy(rng.uniform(-cfg.offset, cfg.offset, (n, 1, 1, 1))).float()
    img = out[:, 0] * gain + off + cfg.noise * torch.randn(out[:, 0].shape, generator=gen)
    return torch.stack([img, out[:, 1]], dim=1)


# ------------------------------------------------------------------------------------------- training
@contextlib.contextmanager
def _torch_settings(threads: int, deterministic: bool) -> Iterator[None]:
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


def _batch(crops: CropSource, idx: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(crops[int(i)], dtype=np.float32) for i in idx]))


def train_encoder(crops: CropSource, config: TrainConfig = TrainConfig(),
                  progress: Callable[[int, float], None] | None = None) -> TrainedEncoder:
    """Train the encoder self-supervised on ``crops`` (see the module docstring).

    Parameters
    ----------
    crops
        At least 2 crops, all of one shape ``(2, S, S, S)``.
    config
        The run's settings.
    progress
        Called after each epoch with (epoch number from 1, mean loss).
    """
    n = len(crops)
    if n < 2:
        raise ValueError(f"train_encoder needs at least 2 crops, got {n}")
    first = np.asarray(crops[0])
    if first.ndim != 4 or first.shape[0] != 2 or len(set(first.shape[1:])) != 1:
        raise ValueError(f"train_encoder: crops must be (2, S, S, S), got {first.shape}")
    size = int(first.shape[1])
    if config.method not in ("simclr", "vicreg"):
        raise ValueError(f"unknown method {config.method!r}; expected 'simclr' or 'vicreg'")
    threads = config.threads or os.cpu_count() or 1
    t0 = time.perf_counter()
    with _torch_settings(threads, True):
        torch.manual_seed(config.seed)
        rng = np.random.default_rng([config.seed, 1])
        gen = torch.Generator().manual_seed(config.seed)
        encoder = LesionEncoder(2, tuple(config.widths), config.embedding_dim, config.internal_size,
                                config.focus_vox, config.norm)
        projector = _Projector(config.embedding_dim, 2 * config.embedding_dim, config.projection_dim)
        params = list(encoder.parameters()) + list(projector.parameters())
        opt = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
        bs = max(2, min(config.batch_size, n))
        steps_per_epoch = max(1, sum(1 for s in range(0, n, bs) if min(bs, n - s) >= 2))
        total = max(1, config.epochs * steps_per_epoch)
        warm = max(0, config.warmup_epochs * steps_per_epoch)

        def lr_at(step: int) -> float:
            if step < warm:
                return config.learning_rate * (step + 1) / warm
            t = (step - warm) / max(1, total - warm)
            return config.learning_rate * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

        encoder.train()
        projector.train()
        curve: list[float] = []
        step = 0
        stopped = False
        last = slowest = 0.0
        for epoch in range(1, config.epochs + 1):
            order = rng.permutation(n)
            losses, weights = [], []
            for start in range(0, n, bs):
                idx = order[start:start + bs]
                if len(idx) < 2:
                    continue
                x = _batch(crops, idx)
                v1 = augment(x, config, rng, gen, config.internal_size)
                v2 = augment(x, config, rng, gen, config.internal_size)
                z = projector(encoder(torch.cat([v1, v2])))
                z1, z2 = z[:len(idx)], z[len(idx):]
                loss = nt_xent(z1, z2, config.temperature) if config.method == "simclr" else vicreg(z1, z2)
                for g in opt.param_groups:
                    g["lr"] = lr_at(step)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                losses.append(float(loss.detach()))
                weights.append(len(idx))
            mean = float(np.average(losses, weights=weights)) if losses else float("nan")
            curve.append(mean)
            if progress is not None:
                progress(epoch, mean)
            # stop before an epoch that would end past the cap (the slowest epoch so far as its estimate)
            spent = time.perf_counter() - t0
            slowest = max(slowest, spent - last)
            last = spent
            if epoch < config.epochs and spent + slowest > config.max_seconds:
                stopped = True
                break
    encoder.eval()
    return TrainedEncoder(module=encoder, loss_curve=curve, epochs=len(curve),
                          elapsed_s=round(time.perf_counter() - t0, 3), stopped_early=stopped,
                          config=config, input_size=size)


# ------------------------------------------------------------------------------------------- files
def file_sha256(path: Path) -> str:
    """sha256 (hex) of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def sidecar_path(path: str | Path) -> Path:
    """``<path>.json``: the settings of a model file."""
    p = Path(path)
    return p.with_name(p.name + ".json")


def weights_digest(trained: TrainedEncoder) -> str:
    """sha256 of what a trained encoder computes: its parameter and buffer names, shapes, dtypes and bytes, the
    input size and :data:`ENCODER_VERSION`. Unlike the TorchScript file's bytes (which carry class names that
    TorchScript numbers per process), it is the same for the same weights in any process."""
    h = hashlib.sha256(f"{ENCODER_VERSION}|{trained.input_size}".encode())
    for name, tensor in trained.module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"|{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def save_encoder(trained: TrainedEncoder, path: str | Path, metadata: dict) -> str:
    """Write ``trained.module`` as TorchScript at ``path`` and its sidecar ``<path>.json``; the file's sha256.

    The sidecar holds ``input_size``, ``channels`` (2), ``embedding_dim``, ``intensity`` ("project": crops as
    :func:`~imaging_assets.features.crops.lesion_crop` makes them), the training config, loss curve and
    ``metadata``. Both files are written to temporary names and moved into place (the model first).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = trained.module.eval()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is what users' tools load
        try:
            scripted = torch.jit.script(module)
        except Exception:  # noqa: BLE001 - a module script cannot compile: trace it at its input size
            s = trained.input_size
            with torch.no_grad():
                scripted = torch.jit.trace(module, torch.zeros(1, 2, s, s, s))
        torch.jit.save(scripted, str(tmp))
    os.replace(tmp, path)
    digest = file_sha256(path)
    side = {
        "format": "torchscript",
        "input_size": int(trained.input_size),
        "channels": 2,
        "embedding_dim": int(trained.config.embedding_dim),
        "intensity": "project",
        "encoder_version": ENCODER_VERSION,
        "sha256": digest,
        "config": trained.config.to_dict(),
        "epochs": trained.epochs,
        "loss_curve": [float(v) for v in trained.loss_curve],
        "elapsed_s": trained.elapsed_s,
        "stopped_early": trained.stopped_early,
        "metadata": dict(metadata),
    }
    _atomic_write_bytes(sidecar_path(path), json.dumps(side, indent=2, default=str).encode())
    return digest
