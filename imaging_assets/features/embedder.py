"""Running an encoder: our own (:func:`~imaging_assets.features.embedding.save_encoder`) or a user's TorchScript
(``.pt`` / ``.ts`` / ``.torchscript``) or ONNX (``.onnx``) file, loaded the same way on the CPU (never downloaded),
with its settings (input size, channels, intensity convention) from the arguments, else the sidecar
``<file>.json``, else (ONNX only) the model's static input shape. :meth:`Embedder.embed` turns crops of
:func:`~imaging_assets.features.crops.lesion_crop` into L2-normalised embeddings.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from imaging_assets.features.embedding import (
    INTENSITY_MODES,
    ONNX_SUFFIXES,
    SINGLE_CHANNEL_MODES,
    TORCHSCRIPT_SUFFIXES,
    file_sha256,
    sidecar_path,
)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size and x.shape[-3] == size:
        return x
    return F.interpolate(x, size=(size, size, size), mode="trilinear", align_corners=False)


@dataclass
class Embedder:
    """A loaded encoder: :meth:`embed` turns crops into L2-normalised embeddings."""

    name: str
    path: str
    sha256: str
    input_size: int
    channels: int
    dim: int
    intensity: str = "project"
    single_channel: str = "image"
    kind: str = "torchscript"
    _run: Callable[[np.ndarray], np.ndarray] | None = field(default=None, repr=False)
    _fixed_batch: int | None = field(default=None, repr=False)

    def prepare(self, crops: np.ndarray) -> torch.Tensor:
        """Crops ``(N, 2, S, S, S)`` -> the model's input (normalisation, channels, size), float32."""
        x = torch.from_numpy(np.ascontiguousarray(crops, dtype=np.float32))
        if x.ndim != 5 or x.shape[1] != 2:
            raise ValueError(f"embed needs crops of shape (N, 2, S, S, S), got {tuple(x.shape)}")
        img, msk = x[:, :1], x[:, 1:]
        if self.intensity == "zscore":
            mean = img.mean(dim=(2, 3, 4), keepdim=True)
            sd = img.std(dim=(2, 3, 4), keepdim=True).clamp_min(1e-6)
            img = (img - mean) / sd
        elif self.intensity == "minmax":
            lo = img.amin(dim=(2, 3, 4), keepdim=True)
            hi = img.amax(dim=(2, 3, 4), keepdim=True)
            img = (img - lo) / (hi - lo).clamp_min(1e-6)
        if self.channels == 1:
            x = img * msk if self.single_channel == "image_times_mask" else img
        else:
            x = torch.cat([img, msk], dim=1)
        return _resize(x, self.input_size).contiguous()

    def embed(self, crops: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """``(N, 2, S, S, S)`` crops -> ``(N, dim)`` float32 with L2-normalised rows."""
        crops = np.asarray(crops)
        if crops.ndim == 4:
            crops = crops[None]
        n = crops.shape[0]
        out = np.zeros((n, self.dim), dtype=np.float32)
        bs = self._fixed_batch or max(1, int(batch_size))
        for start in range(0, n, bs):
            part = crops[start:start + bs]
            x = self.prepare(part).numpy()
            m = x.shape[0]
            if self._fixed_batch and m < self._fixed_batch:  # pad a static-batch ONNX model's last batch
                x = np.concatenate([x, np.zeros((self._fixed_batch - m, *x.shape[1:]), np.float32)])
            y = np.asarray(self._run(x), dtype=np.float32).reshape(x.shape[0], -1)[:m]
            if y.shape[1] != self.dim:
                raise ValueError(f"{self.path}: the model gave {y.shape[1]} values per crop, expected {self.dim}")
            out[start:start + m] = y
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return (out / np.maximum(norms, 1e-12)).astype(np.float32)


def _read_sidecar(path: Path) -> dict[str, Any]:
    side = sidecar_path(path)
    if not side.is_file():
        return {}
    try:
        data = json.loads(side.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{side}: unreadable model sidecar: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{side}: model sidecar is not a JSON object")
    return data


def _torchscript_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{path}: not a loadable TorchScript model: {exc}") from exc
    module.eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            y = module(torch.from_numpy(x))
        if isinstance(y, (tuple, list)):
            y = y[0]
        if isinstance(y, dict):
            y = next(iter(y.values()))
        return y.detach().float().numpy()

    return run


def _onnx_runner(path: Path) -> tuple[Callable[[np.ndarray], np.ndarray], list[Any]]:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ValueError(f"{path}: ONNX models need the onnxruntime package") from exc
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = os.cpu_count() or 1
    try:
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{path}: not a loadable ONNX model: {exc}") from exc
    inp = sess.get_inputs()[0]

    def run(x: np.ndarray) -> np.ndarray:
        return sess.run(None, {inp.name: x})[0]

    return run, list(inp.shape)


def load_embedder(path: str | Path, input_size: int | None = None, channels: int | None = None,
                  intensity: str | None = None) -> Embedder:
    """Load our own encoder or a user's TorchScript / ONNX model (never downloads anything).

    Parameters
    ----------
    path
        ``.pt`` / ``.ts`` / ``.torchscript`` (TorchScript, loaded on CPU) or ``.onnx`` (onnxruntime, CPU).
    input_size, channels, intensity
        The model's cube size, input channels (1 or 2) and intensity convention ("project", "zscore",
        "minmax"); each from the argument, else the sidecar ``<path>.json``, else (ONNX) the model's static
        input shape. A 1-channel model gets channel 0, or image x mask when the sidecar's
        ``single_channel`` is ``"image_times_mask"``.

    Raises
    ------
    ValueError
        Missing or unreadable file, unknown suffix, or a setting found nowhere (the message names the file).
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: model file not found")
    suffix = p.suffix.lower()
    if suffix not in TORCHSCRIPT_SUFFIXES + ONNX_SUFFIXES:
        raise ValueError(f"{p}: unknown model format {suffix!r}; expected one of "
                         f"{', '.join(TORCHSCRIPT_SUFFIXES + ONNX_SUFFIXES)}")
    side = _read_sidecar(p)
    fixed_batch = None
    shape: list[Any] = []
    if suffix in ONNX_SUFFIXES:
        run, shape = _onnx_runner(p)
        kind = "onnx"
        if shape and isinstance(shape[0], int) and shape[0] > 0:
            fixed_batch = int(shape[0])
    else:
        run = _torchscript_runner(p)
        kind = "torchscript"
    static = lambda i: shape[i] if len(shape) == 5 and isinstance(shape[i], int) and shape[i] > 0 else None  # noqa: E731
    size = input_size or side.get("input_size") or static(2)
    chans = channels or side.get("channels") or static(1)
    mode = intensity or side.get("intensity") or ("project" if side else None)
    missing = [name for name, v in (("input_size", size), ("channels", chans), ("intensity", mode)) if not v]
    if missing:
        raise ValueError(f"{p}: model settings missing ({', '.join(missing)}): pass them to load_embedder or "
                         f"write them to {sidecar_path(p).name}")
    if int(chans) not in (1, 2):
        raise ValueError(f"{p}: channels must be 1 or 2, got {chans}")
    if mode not in INTENSITY_MODES:
        raise ValueError(f"{p}: intensity must be one of {', '.join(INTENSITY_MODES)}, got {mode!r}")
    single = side.get("single_channel", "image")
    if single not in SINGLE_CHANNEL_MODES:
        raise ValueError(f"{p}: single_channel must be one of {', '.join(SINGLE_CHANNEL_MODES)}, got {single!r}")
    emb = Embedder(name=str(side.get("name") or p.stem), path=str(p), sha256=file_sha256(p), input_size=int(size),
                   channels=int(chans), dim=0, intensity=str(mode), single_channel=str(single), kind=kind,
                   _run=run, _fixed_batch=fixed_batch)
    try:  # the output size, from one probe crop (checks the model runs at the stated settings)
        probe = emb.prepare(np.zeros((fixed_batch or 1, 2, emb.input_size, emb.input_size, emb.input_size),
                                     np.float32)).numpy()
        y = np.asarray(run(probe))
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{p}: the model does not run on input (N, {emb.channels}, {emb.input_size}, "
                         f"{emb.input_size}, {emb.input_size}): {exc}") from exc
    emb.dim = int(y.reshape(y.shape[0], -1).shape[1])
    stated = side.get("embedding_dim")
    if stated and int(stated) != emb.dim:
        raise ValueError(f"{p}: sidecar says embedding_dim {stated} but the model gives {emb.dim}")
    return emb
