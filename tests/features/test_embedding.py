"""Self-supervised lesion encoder and the model loader (imaging_assets.features.embedding), on tiny configs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from imaging_assets.features.embedder import Embedder, load_embedder
from imaging_assets.features.embedding import TrainConfig, TrainedEncoder, save_encoder, train_encoder

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit / legacy ONNX export

S = 16
TINY = TrainConfig(seed=0, epochs=2, batch_size=6, embedding_dim=12, widths=(4, 8, 8), projection_dim=8,
                   internal_size=16, threads=1, learning_rate=1e-2, warmup_epochs=0)


class ListSource:
    """A lazy crop source that counts reads (the cohort is never stacked)."""

    def __init__(self, n: int = 14, seed: int = 3):
        self.n, self.seed, self.reads = n, seed, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.n:
            raise IndexError(i)
        self.reads += 1
        rng = np.random.default_rng([self.seed, i])
        z, y, x = np.meshgrid(*[np.arange(S) - (S - 1) / 2] * 3, indexing="ij")
        r = 2.0 + (i % 5)
        mask = ((x / r) ** 2 + (y / (r * 0.8)) ** 2 + (z / r) ** 2 <= 1).astype(np.float32)
        img = 0.15 + 0.5 * mask * (0.6 + 0.1 * (i % 3)) + 0.03 * rng.standard_normal((S, S, S))
        return np.stack([np.clip(img, 0, 1), mask]).astype(np.float16)


def _crops(source: ListSource) -> np.ndarray:
    return np.stack([source[i] for i in range(len(source))]).astype(np.float32)


@pytest.fixture(scope="module")
def trained() -> TrainedEncoder:
    return train_encoder(ListSource(), TINY)


def _module_embed(trained: TrainedEncoder, crops: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        y = trained.module(torch.from_numpy(crops)).numpy()
    return y / np.linalg.norm(y, axis=1, keepdims=True)


def test_training_is_deterministic_for_a_seed(trained):
    crops = _crops(ListSource())
    again = train_encoder(ListSource(), TINY)
    a, b = _module_embed(trained, crops), _module_embed(again, crops)
    assert np.array_equal(a, b)
    for pa, pb in zip(trained.module.state_dict().values(), again.module.state_dict().values()):
        assert torch.equal(pa, pb)
    other = train_encoder(ListSource(), TrainConfig(**{**TINY.to_dict(), "widths": TINY.widths, "seed": 1}))
    assert not np.allclose(_module_embed(other, crops), a, atol=1e-4)


def test_loss_curve_epochs_and_progress():
    seen = []
    source = ListSource()
    out = train_encoder(source, TINY, progress=lambda e, loss: seen.append((e, loss)))
    assert out.epochs == TINY.epochs == len(out.loss_curve) and not out.stopped_early
    assert all(np.isfinite(out.loss_curve))
    assert [e for e, _ in seen] == [1, 2] and [v for _, v in seen] == out.loss_curve
    assert out.input_size == S and out.config == TINY and out.elapsed_s > 0
    assert not out.module.training
    assert source.reads >= TINY.epochs * len(source)  # read per batch, through the source
    assert json.loads(json.dumps(TINY.to_dict()))["seed"] == 0


def test_vicreg_trains_too():
    out = train_encoder(ListSource(n=8), TrainConfig(**{**TINY.to_dict(), "widths": TINY.widths,
                                                        "method": "vicreg", "epochs": 1}))
    assert len(out.loss_curve) == 1 and np.isfinite(out.loss_curve[0])


def test_max_seconds_stops_after_the_epoch_that_passes_it():
    cfg = TrainConfig(**{**TINY.to_dict(), "widths": TINY.widths, "epochs": 50, "max_seconds": 0.0})
    out = train_encoder(ListSource(n=8), cfg)
    assert out.stopped_early and out.epochs == 1 and len(out.loss_curve) == 1


def test_save_and_load_round_trip(trained, tmp_path):
    path = tmp_path / "models" / "encoder.pt"
    digest = save_encoder(trained, path, {"cohort": "unit-test"})
    import hashlib

    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    side = json.loads((tmp_path / "models" / "encoder.pt.json").read_text())
    assert side["input_size"] == S and side["channels"] == 2 and side["embedding_dim"] == TINY.embedding_dim
    assert side["intensity"] == "project" and side["metadata"] == {"cohort": "unit-test"}
    assert side["config"]["seed"] == 0
    assert not list((tmp_path / "models").glob(".*tmp"))
    emb = load_embedder(path)
    assert isinstance(emb, Embedder)
    assert (emb.sha256, emb.input_size, emb.channels, emb.dim) == (digest, S, 2, TINY.embedding_dim)
    crops = _crops(ListSource())
    out = emb.embed(crops, batch_size=5)
    assert out.shape == (len(crops), TINY.embedding_dim) and out.dtype == np.float32
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert np.allclose(out, _module_embed(trained, crops), atol=1e-5)
    # float16 crops as lesion_crop makes them, and another crop size (resampled to the model's)
    assert np.allclose(emb.embed(crops.astype(np.float16)), out, atol=2e-3)
    big = torch.nn.functional.interpolate(torch.from_numpy(crops), size=(24, 24, 24), mode="trilinear").numpy()
    assert emb.embed(big).shape == out.shape


class _OneChannel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.conv = torch.nn.Conv3d(1, 6, 3, stride=2)
        self.fc = torch.nn.Linear(6, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3, 4)))


def test_a_users_torchscript_model_with_another_size_and_one_channel(tmp_path):
    model = _OneChannel().eval()
    path = tmp_path / "user.ts"
    torch.jit.script(model).save(str(path))
    (tmp_path / "user.ts.json").write_text(json.dumps({"input_size": 32, "channels": 1, "intensity": "zscore",
                                                       "single_channel": "image_times_mask"}))
    emb = load_embedder(path)
    assert (emb.input_size, emb.channels, emb.dim, emb.intensity) == (32, 1, 5, "zscore")
    crops = _crops(ListSource(n=4))
    out = emb.embed(crops)
    x = torch.from_numpy(crops)
    img = x[:, :1]
    img = (img - img.mean(dim=(2, 3, 4), keepdim=True)) / img.std(dim=(2, 3, 4), keepdim=True)
    ref = torch.nn.functional.interpolate(img * x[:, 1:], size=(32, 32, 32), mode="trilinear", align_corners=False)
    with torch.no_grad():
        expected = model(ref).numpy()
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert np.allclose(out, expected, atol=1e-5)
    # arguments win over the sidecar
    assert load_embedder(path, input_size=24, intensity="minmax").input_size == 24


def test_an_onnx_model_embeds_through_the_same_loader(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model = _OneChannel().eval()
    path = tmp_path / "user.onnx"
    torch.onnx.export(model, (torch.zeros(1, 1, 20, 20, 20),), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, dynamo=False)
    emb = load_embedder(path, intensity="project")  # size and channels from the model's static shape
    assert (emb.input_size, emb.channels, emb.dim) == (20, 1, 5)
    crops = _crops(ListSource(n=7))
    out = emb.embed(crops, batch_size=3)
    ref = torch.nn.functional.interpolate(torch.from_numpy(crops[:, :1]), size=(20, 20, 20), mode="trilinear",
                                          align_corners=False)
    with torch.no_grad():
        expected = model(ref).numpy()
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert out.shape == (7, 5) and np.allclose(out, expected, atol=1e-4)
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_load_embedder_errors_name_the_file(tmp_path, trained):
    missing = tmp_path / "nope.pt"
    with pytest.raises(ValueError, match="nope.pt"):
        load_embedder(missing)
    bare = tmp_path / "bare.pt"
    torch.jit.script(_OneChannel().eval()).save(str(bare))
    with pytest.raises(ValueError, match=r"bare\.pt.*input_size"):
        load_embedder(bare)  # no sidecar, no arguments
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="corrupt.pt"):
        load_embedder(corrupt, input_size=16, channels=2, intensity="project")
    bad_onnx = tmp_path / "bad.onnx"
    bad_onnx.write_bytes(b"\x00\x01")
    with pytest.raises(ValueError, match="bad.onnx"):
        load_embedder(bad_onnx, input_size=16, channels=2, intensity="project")
    other = tmp_path / "model.bin"
    other.write_bytes(b"x")
    with pytest.raises(ValueError, match="model.bin"):
        load_embedder(other)
