"""The search service: a FastAPI ingress on Ray Serve, an Encoder deployment for uploads.

``SearchAPI`` replicas hold the published index (Annoy files are mmap'd, so replicas on one
node share the pages) and answer ``/similar`` without touching the model. ``/search`` decodes
and checks the upload in the ingress (cheap, and the error codes belong there), then sends the
pixels to ``Encoder`` replicas, which batch concurrent requests through the same preprocessing
and model as the pipeline. A watcher thread per replica loads each newly published LATEST and
swaps it in with one assignment: requests in flight keep the index they started with, and a
version that fails to load is logged and skipped while the last good one keeps serving.
"""

import logging
import os
import threading
import time

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine import imaging, metrics, publish
from engine.config import Config, EmbedConfig
from engine.embed import Embedder
from engine.index import IndexLoadError, LoadedIndex
from engine.storage import Storage, gcs_options

log = logging.getLogger("lookalike.serve")

api = FastAPI(
    title="Lookalike",
    description="Visual similarity search over a product catalog. Results are best first; "
                "score is cosine similarity (1 = identical).",
    version="1",
)
api.add_middleware(metrics.LatencyMiddleware)  # latency per route on the Ray dashboard


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


@api.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError):
    return _error(exc.status, exc.message)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError):
    parts = ["{}: {}".format(".".join(str(p) for p in e["loc"]), e["msg"]) for e in exc.errors()]
    return _error(422, "; ".join(parts))


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException):
    return _error(exc.status_code, str(exc.detail))


@api.exception_handler(Exception)
async def _unexpected(_: Request, exc: Exception):
    log.exception("unhandled error")
    return _error(500, f"internal error ({type(exc).__name__}); see the replica log")


@serve.deployment(name="Encoder")
class Encoder:
    """uint8 HWC images -> unit vectors, batched across concurrent requests."""

    def __init__(self, embed_cfg: dict, batch_size: int = 16, batch_wait_s: float = 0.005,
                 storage_options: dict | None = None):
        self.embedder = Embedder(EmbedConfig.model_validate(embed_cfg), storage_options=storage_options)
        self.embed.set_max_batch_size(batch_size)
        self.embed.set_batch_wait_timeout_s(batch_wait_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def embed(self, images: list[np.ndarray]) -> list[np.ndarray]:
        return list(self.embedder(np.stack(images)))


class IndexHolder:
    """The current index and a thread that swaps in newer published versions."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.storage = Storage.from_config(cfg.storage)
        self.model_version = cfg.embed.model_version
        self.current: LoadedIndex | None = None
        self.last_error: str | None = None
        self.failed: set[str] = set()
        self.refresh()
        threading.Thread(target=self._watch, name="index-watcher", daemon=True).start()

    def refresh(self) -> bool:
        version = publish.latest(self.storage, self.model_version)
        if version is None or version in self.failed:
            return False
        if self.current is not None and self.current.version == version:
            return False
        try:
            loaded = LoadedIndex.load(self.storage, self.model_version, version, self.cfg.serve.cache_dir)
        except (IndexLoadError, OSError, ValueError) as exc:
            self.failed.add(version)
            self.last_error = f"index {version} not loaded: {exc}"
            log.error("%s; still serving %s", self.last_error, self.current and self.current.version)
            return False
        previous, self.current = self.current, loaded
        log.info("serving index %s (was %s)", version, previous and previous.version)
        metrics.safely(metrics.service().index_swapped, self.model_version, version, previous and previous.version)
        return True

    def _watch(self) -> None:
        while True:
            time.sleep(self.cfg.serve.reload_interval_s)
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - the watcher must outlive storage hiccups
                log.exception("index refresh failed; keeping %s", self.current and self.current.version)

    def get(self) -> LoadedIndex:
        index = self.current
        if index is None:
            hint = f" ({self.last_error})" if self.last_error else ""
            raise ApiError(503, f"no index published yet for model {self.model_version}{hint}")
        return index


def _categories(index: LoadedIndex, category: str | None) -> list[str] | None:
    if not category:
        return None
    names = [c.strip() for c in category.split(",") if c.strip()]
    unknown = [c for c in names if c not in index.categories]
    if unknown:
        raise ApiError(404, f"unknown category {unknown}; known: {sorted(index.categories)}")
    return names


@serve.deployment(name="SearchAPI")
@serve.ingress(api)
class SearchAPI:
    def __init__(self, encoder, cfg: dict):
        self.cfg = Config.model_validate(cfg)
        self.encoder = encoder
        self.index = IndexHolder(self.cfg)

    def _k(self, k: int | None) -> int:
        k = self.cfg.serve.default_k if k is None else k
        if not 1 <= k <= self.cfg.serve.max_k:
            raise ApiError(400, f"k must be between 1 and {self.cfg.serve.max_k}, got {k}")
        return k

    @api.get("/healthz")
    def healthz(self):
        index = self.index.get()
        return {"status": "ok", "index_version": index.version}

    @api.get("/version")
    def version(self):
        return {**self.index.get().summary(), "last_error": self.index.last_error}

    @api.get("/similar/{product_id}")
    def similar(self, product_id: str, k: int | None = Query(None, description="number of results"),
                category: str | None = Query(None, description="comma-separated; default: the product's own")):
        index = self.index.get()
        k = self._k(k)
        found = index.locate(product_id)
        if found is None:
            raise ApiError(404, f"unknown product_id {product_id!r} in index {index.version}")
        own, position = found
        cats = _categories(index, category) or [own]
        results = index.search(index.vector(own, position), k, cats, exclude=product_id)
        return {"product_id": product_id, "category": own, "index_version": index.version, "results": results}

    @api.post("/search")
    async def search(self, request: Request, k: int | None = Query(None),
                     category: str | None = Query(None, description="comma-separated; default: all")):
        index = self.index.get()
        k = self._k(k)
        cats = _categories(index, category)
        data = await self._upload(request)
        try:
            img = imaging.decode(data, self.cfg.serve.max_image_pixels)
        except imaging.ImageRejected as exc:
            status = 413 if exc.reason == "too_many_pixels" else 415
            raise ApiError(status, f"not a usable image ({exc.reason}): {exc.detail}") from None
        pixels = imaging.preprocess(img, self.cfg.embed.image_size)
        vector = await self.encoder.embed.remote(pixels)
        results = index.search(vector, k, cats)
        obj = {"category": ",".join(cats) if cats else None, "box": [0, 0, img.width, img.height],
               "score": 1.0, "results": results}
        return {"index_version": index.version, "objects": [obj]}

    async def _upload(self, request: Request) -> bytes:
        limit = self.cfg.serve.max_upload_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit + 4096:
            raise ApiError(413, f"upload is {declared} bytes; the limit is {limit}")
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            form = await request.form()
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise ApiError(422, "multipart body needs a file field named 'image'")
            data = await upload.read()
        else:
            data = await request.body()
        if len(data) > limit:
            raise ApiError(413, f"upload is {len(data)} bytes; the limit is {limit}")
        if not data:
            raise ApiError(422, "empty body: send an image as raw bytes or as multipart field 'image'")
        return data


def build_app(cfg: Config):
    """The Serve application for ``serve.run``; replicas get plain dicts (picklable, re-validated)."""
    opts = {"num_cpus": cfg.serve.replica_cpus}
    encoder = Encoder.options(ray_actor_options=opts).bind(
        cfg.embed.model_dump(), cfg.serve.encoder_batch_size, cfg.serve.encoder_batch_wait_s,
        gcs_options(cfg.storage))
    return SearchAPI.options(ray_actor_options=opts).bind(encoder, cfg.to_dict())


def app_builder(args: dict):
    """For ``serve deploy`` / ``serve run``: args ``config`` (path) and ``set`` (list of key=value)."""
    from engine import config

    overrides = args.get("set") or []
    if isinstance(overrides, str):
        overrides = [overrides]
    path = args.get("config")
    if path and not os.path.isabs(path) and not os.path.exists(path):
        path = str(config.DEFAULT_CONFIG.parent.parent / path)  # relative to the project, not the worker's cwd
    return build_app(config.load(path, overrides))


def start(cfg: Config, wait_s: float = 300.0) -> str:
    """Start Serve on the connected Ray cluster (HTTP on cfg.serve.host:port) and deploy the app."""
    from engine import raycluster

    raycluster.connect(cfg.ray)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(build_app(cfg), name="lookalike", route_prefix="/", blocking=False)
    url = f"http://{cfg.serve.host}:{cfg.serve.port}"
    _wait_ready(url, wait_s)
    return url


def _wait_ready(url: str, wait_s: float) -> None:
    """Until /healthz answers at all (200, or 503 when nothing is published yet)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + wait_s
    while True:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=5):
                return
        except urllib.error.HTTPError as exc:
            if exc.code == 503 and b'"error"' in exc.read():
                return  # our own answer: up, but nothing published yet
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"service at {url} not ready after {wait_s:.0f}s; see `serve status`")
        time.sleep(0.5)
