"""The embedding backends: same weights, same vectors, whichever backend or process runs them."""
from pathlib import Path

import numpy as np
import pytest

from engine import imaging, sample
from engine.config import EmbedConfig
from engine.embed import Embedder, resolve_backend


@pytest.fixture(scope="module")
def images():
    items, _ = sample.load()
    return np.stack([imaging.preprocess(sample.render(items[i]), 224) for i in range(0, 400, 25)])


@pytest.fixture(scope="module")
def embedders(tmp_path_factory):
    cfg = EmbedConfig(cache_dir=str(tmp_path_factory.mktemp("onnx-cache")))
    return Embedder(cfg, device="cpu", backend="onnx", threads=2), Embedder(cfg, device="cpu", backend="torch", threads=2)


def test_onnx_matches_torch_within_1e4_relative(embedders, images):
    onnx, torch_ = embedders
    fo, ft = onnx.features(images), torch_.features(images)
    assert fo.shape == ft.shape == (len(images), 1280)
    assert np.abs(fo - ft).max() <= 1e-4 * np.abs(ft).max()
    vo, vt = onnx(images), torch_(images)
    np.testing.assert_allclose(np.linalg.norm(vo, axis=1), 1.0, atol=1e-5)
    assert (vo * vt).sum(axis=1).min() > 0.99999  # cosine of the two backends' vectors


def test_export_is_cached_and_reused(embedders, tmp_path):
    onnx, _ = embedders
    folder = onnx.cfg.cache_dir
    files = sorted(p.name for p in Path(folder).iterdir())
    assert len(files) == 1 and files[0].endswith(".onnx")
    again = Embedder(onnx.cfg, device="cpu", backend="onnx", threads=1)
    assert sorted(p.name for p in Path(folder).iterdir()) == files
    assert again.session is not None


def test_a_cpu_actor_with_a_cached_export_never_imports_torch(embedders):
    """torch's import is most of an embed actor's start on a small node (and of a diff run's fixed cost)."""
    import subprocess
    import sys

    code = (f"import sys; from engine.config import EmbedConfig; from engine.embed import Embedder; "
            f"e = Embedder(EmbedConfig(cache_dir={embedders[0].cfg.cache_dir!r}), device='cpu'); "
            f"print(e.backend, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == ["onnx", "False"]


def test_pretrained_features_tell_fashion_classes_apart(embedders):
    """Guards the model, not just the plumbing: a wrong activation or scaling still "works" but
    loses about a third of this (ReLU6 swapped for swish: 0.52)."""
    onnx, _ = embedders
    items, labels = sample.load()
    imgs = np.stack([imaging.preprocess(sample.render(items[i]), 224) for i in range(300)])
    v = np.concatenate([onnx(imgs[i:i + 50]) for i in range(0, 300, 50)])
    sims = v @ v.T
    np.fill_diagonal(sims, -2)
    assert (labels[:300][sims.argmax(1)] == labels[:300]).mean() >= 0.72


def test_batch_composition_does_not_change_a_vector(embedders, images):
    onnx, _ = embedders
    alone = onnx(images[:1])
    batched = onnx(images)[:1]
    np.testing.assert_allclose(alone, batched, atol=1e-5)


def test_backend_choice_and_clear_errors(tmp_path):
    assert resolve_backend("auto", "cpu") == "onnx"
    assert resolve_backend("auto", "cuda") == "torch"
    with pytest.raises(RuntimeError, match="runs on CPU"):
        resolve_backend("onnx", "cuda")
    import torch

    if not torch.cuda.is_available():  # never a hang: a clear error at start-up
        with pytest.raises(RuntimeError, match="no CUDA device"):
            Embedder(EmbedConfig(device="cuda"))
        assert Embedder(EmbedConfig(cache_dir=str(tmp_path)), device="auto", threads=1).device == "cpu"
