"""The Encoder deployment: uploads embedded (batched) and objects found, exactly as the pipeline does."""
import asyncio

import numpy as np
from ray import serve

from engine import detect
from engine.config import DetectConfig, EmbedConfig
from engine.embed import Embedder, embed_by_version


@serve.deployment(name="Encoder")
class Encoder:
    """uint8 HWC images -> unit vectors, batched across concurrent requests; one model per
    embedding model version the config names (``embed.categories``)."""

    def __init__(self, embed_cfg: dict, batch_size: int = 16, batch_wait_s: float = 0.005,
                 storage_options: dict | None = None, detect_cfg: dict | None = None):
        self.cfg = EmbedConfig.model_validate(embed_cfg)
        self.embedders = {mv: Embedder(c, storage_options=storage_options) for mv, c in self.cfg.models().items()}
        self.detect_cfg = DetectConfig.model_validate(detect_cfg or {})
        device = next(iter(self.embedders.values())).device  # a replica given a GPU detects on it too
        self.detector = detect.load(self.detect_cfg, device, storage_options) if self.detect_cfg.enabled else None
        self.embed.set_max_batch_size(batch_size)
        self.embed.set_batch_wait_timeout_s(batch_wait_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def embed(self, images: list[np.ndarray], versions: list[str]) -> list[np.ndarray]:
        return list(embed_by_version(self.embedders, images, versions))

    async def objects(self, image: bytes, size: tuple[int, int], whole: np.ndarray | None = None) -> list[dict]:
        """Detected objects of an RGB image (raw bytes, ``size`` = (width, height)), one per item, each
        with the categories to search it in (``routes``) and its vector by each of their models
        (``vectors``); none found: []. Inputs are made exactly as the pipeline's detect stage makes
        them (engine.detect.embed_input; ``whole``: the photo's whole-image input)."""
        from PIL import Image

        img = Image.frombytes("RGB", size, image)
        found = await asyncio.get_running_loop().run_in_executor(
            None, lambda: detect.find(self.detector, self.detect_cfg, [img])[0])
        jobs = []  # (object, model version, input)
        for o in found:
            o["routes"] = detect.routes(o, self.detect_cfg)
            pixels = detect.embed_input(img, o, self.detect_cfg, self.cfg.image_size, whole)
            jobs += [(o, mv, pixels) for mv in dict.fromkeys(self.cfg.version_of(c) for c in o["routes"])]
        vectors = embed_by_version(self.embedders, [p for _, _, p in jobs], [mv for _, mv, _ in jobs])
        for (o, mv, _), v in zip(jobs, vectors):
            o.setdefault("vectors", {})[mv] = v
        return found
