"""The search service on Ray Serve: a FastAPI ingress, Searcher deployments, an Encoder.

``SearchAPI`` (ingress) checks requests, knows where every product is (a compact directory of the
index's id maps, no vectors) and fans each query out to the ``Searcher`` groups that hold the
shards of the categories asked for (serve/searcher.py), then merges their top-k by score.
``/search`` decodes and checks the upload here (the error codes belong here) and has ``Encoder``
replicas embed it, batched, with the pipeline's own preprocessing and model.

Hot swap. A watcher thread follows LATEST. A new version is prepared first: the ingress loads its
directory, and every searcher group loads and checks its shards beside the version it serves. Only
when all succeed does the ingress switch, with one assignment. Each request reads that assignment
once and names its version in every searcher call, and searchers answer from exactly that version,
so a response never mixes versions and says which one it came from. A version that fails to load
or check anywhere is refused: the old one keeps serving, and ``/healthz`` and ``/version`` say so.
"""

import asyncio
import hashlib
import hmac
import logging
import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine import detect, imaging, metrics, publish
from engine.config import Config, ConfigError, DetectConfig, EmbedConfig, ServeConfig
from engine.embed import Embedder, embed_by_version
from engine.index import (Directory, Location, category_version, merge, model_mismatch, prune_cache, read_manifest,
                          summary)
from engine.storage import Storage, gcs_options
from serve.searcher import Searcher, ShardGroup, assign

log = logging.getLogger("lookalike.serve")
PREPARE_TIMEOUT_S = 1800.0  # loading and checking a multi-GB version from object storage takes minutes

api = FastAPI(
    title="Lookalike",
    description="Visual similarity search over a product catalog. Results are best first; "
                "score is cosine similarity (1 = identical). Every answer names the index version it came from.",
    version="1",
)
api.add_middleware(metrics.LatencyMiddleware)  # latency per route on the Ray dashboard


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.headers, self.extra = status, message, headers, extra


def _error(status: int, message: str, headers: dict | None = None, **extra) -> JSONResponse:
    return JSONResponse({"error": message, "status": status, **extra}, status_code=status, headers=headers)


@api.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError):
    return _error(exc.status, exc.message, exc.headers, **exc.extra)


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

    async def objects(self, image: bytes, size: tuple[int, int]) -> list[dict]:
        """Detected objects of an RGB image (raw bytes, ``size`` = (width, height)), each with the
        vector of its padded crop by its category's model; none found: []. Crops are made exactly
        as the pipeline's detect stage makes them (engine.detect.crop_input)."""
        from PIL import Image

        img = Image.frombytes("RGB", size, image)
        found = await asyncio.get_running_loop().run_in_executor(
            None, lambda: detect.find(self.detector, self.detect_cfg, [img])[0])
        crops = [detect.crop_input(img, o["box"], self.detect_cfg.box_padding, self.cfg.image_size) for o in found]
        versions = [self.cfg.version_of(o["category"]) for o in found]
        return [{**o, "vector": v} for o, v in zip(found, embed_by_version(self.embedders, crops, versions))]


@dataclass(frozen=True)
class Routing:
    """One index version as the ingress uses it: immutable, swapped whole."""

    version: str
    manifest: dict
    directory: Directory
    owner: dict  # (category, shard) -> searcher group
    groups_of: dict = field(default_factory=dict)  # category -> sorted searcher groups

    @classmethod
    def of(cls, manifest: dict, directory: Directory, groups: int) -> "Routing":
        owner = assign(manifest, groups)
        groups_of: dict[str, set] = {}
        for (cat, _), g in owner.items():
            groups_of.setdefault(cat, set()).add(g)
        return cls(manifest["index_version"], manifest, directory, owner,
                   {c: sorted(g) for c, g in groups_of.items()})


class Swapper:
    """Follows LATEST; prepares each new version on the ingress and every searcher group, then switches."""

    def __init__(self, cfg: Config, searchers: list):
        self.cfg, self.searchers = cfg, searchers
        self.storage = Storage.from_config(cfg.storage)
        self.model_version = cfg.embed.model_version
        self.active: Routing | None = None
        self.latest: str | None = None
        self.preparing: str | None = None
        self.refused: dict[str, tuple[float, str]] = {}
        self.swapped_at: str | None = None
        self.polled = False
        self._lock = threading.Lock()
        threading.Thread(target=self._watch, name="index-watcher", daemon=True).start()

    def _watch(self) -> None:
        while True:
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - the watcher must outlive storage hiccups
                log.exception("index refresh failed; keeping %s", self.active and self.active.version)
            self.polled = True
            time.sleep(self.cfg.serve.reload_interval_s)

    def refresh(self) -> bool:
        with self._lock:
            self.latest = version = publish.latest(self.storage, self.model_version)
            if version is None or (self.active is not None and self.active.version == version):
                return False
            refusal = self.refused.get(version)
            if refusal and time.monotonic() - refusal[0] < self.cfg.serve.retry_refused_s:
                return False
            self.preparing = version
            try:
                routing = self._prepare(version)
            except Exception as exc:  # noqa: BLE001 - any failure refuses the version, never the service
                reason = str(exc) if isinstance(exc, RuntimeError) else f"{type(exc).__name__}: {exc}"
                self.refused[version] = (time.monotonic(), reason)
                log.error("index %s refused: %s; still serving %s", version, reason,
                          self.active and self.active.version)
                return False
            finally:
                self.preparing = None
            previous, self.active = self.active, routing
            if not self.storage.is_local:  # the cache keeps the version served and the one before
                prune_cache(self.cfg.serve.cache_dir, self.model_version,
                            [routing.manifest] + ([previous.manifest] if previous else []))
            self.swapped_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            self.refused.pop(version, None)
            log.info("serving index %s (was %s)", version, previous and previous.version)
            metrics.safely(metrics.service().index_swapped, self.model_version, version,
                           previous and previous.version)
            return True

    def _prepare(self, version: str) -> Routing:
        manifest = read_manifest(self.storage, self.model_version, version)
        if manifest["dim"] != self.cfg.embed.dim:
            raise RuntimeError(f"index dim {manifest['dim']} differs from embed.dim {self.cfg.embed.dim}")
        wrong = model_mismatch(manifest, self.cfg.embed)
        if wrong:  # queries would be embedded by another model than the index was built with
            raise RuntimeError("embedding model versions differ (category: index's, config's): " + ", ".join(
                f"{c}: {i}, {m}" for c, (i, m) in sorted(wrong.items())))
        directory = Directory.load(self.storage, manifest, self.cfg.serve.cache_dir, verify=True)
        calls = [h.prepare_now(version) if isinstance(h, ShardGroup) else h.prepare.remote(version)
                 for h in self.searchers]
        answers = [c if isinstance(c, dict) else c.result(timeout_s=PREPARE_TIMEOUT_S) for c in calls]
        bad = [a for a in answers if not a["ok"]]
        if bad:
            raise RuntimeError("; ".join(f"searcher group {a['group']}: {a['error']}" for a in bad))
        return Routing.of(manifest, directory, len(self.searchers))

    def state(self) -> dict:
        """What /healthz and /version report about swapping."""
        out = {"latest": self.latest}
        refusal = self.refused.get(self.latest) if self.latest else None
        if refusal:
            out["refused"] = {"version": self.latest, "reason": refusal[1]}
        if self.preparing:
            out["loading"] = self.preparing
        return out


def _categories(routing: Routing, category: str | None) -> list[str] | None:
    if not category:
        return None
    names = list(dict.fromkeys(c.strip() for c in category.split(",") if c.strip()))
    unknown = [c for c in names if c not in routing.groups_of]
    if unknown:
        raise ApiError(404, f"unknown category {unknown}; known: {sorted(routing.groups_of)}")
    return names


@serve.deployment(name="SearchAPI")
@serve.ingress(api)
class SearchAPI:
    def __init__(self, encoder, searchers: list, cfg: dict, auth_sha256: str | None = None):
        self.cfg = Config.model_validate(cfg)
        self.encoder, self.searchers = encoder, searchers or [ShardGroup(self.cfg, 0, 1)]
        self.auth_sha256 = auth_sha256
        self.swapper = Swapper(self.cfg, self.searchers)

    # -- request plumbing

    def _authorize(self, request: Request) -> None:
        if not self.auth_sha256:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        digest = hashlib.sha256(token.strip().encode()).hexdigest()
        if scheme.lower() != "bearer" or not token.strip() or not hmac.compare_digest(digest, self.auth_sha256):
            raise ApiError(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                           headers={"WWW-Authenticate": "Bearer"})

    def _routing(self) -> Routing:
        routing = self.swapper.active
        if routing is None:
            state = self.swapper.state()
            if state.get("refused"):
                raise ApiError(503, f"index {state['refused']['version']} refused: {state['refused']['reason']}",
                               state="refused")
            if not self.swapper.polled or state.get("loading"):
                raise ApiError(503, "loading the index; retry shortly", state="loading")
            raise ApiError(503, f"no index published yet for model {self.cfg.embed.model_version}", state="unpublished")
        return routing

    def _k(self, k: int | None) -> int:
        k = self.cfg.serve.default_k if k is None else k
        if not 1 <= k <= self.cfg.serve.max_k:
            raise ApiError(400, f"k must be between 1 and {self.cfg.serve.max_k}, got {k}")
        return k

    def _search(self, group: int):
        searcher = self.searchers[group]
        return searcher.search if isinstance(searcher, ShardGroup) else searcher.search.remote

    async def _fan_out(self, routing: Routing, categories: list[str], n: int, vector=None,
                       location: Location | None = None) -> list:
        """Per-shard hits for ``categories``, every searcher asked for ``routing.version`` only."""
        groups = sorted({g for c in categories for g in routing.groups_of.get(c, [])})
        answers = []
        if location is not None:
            owner = routing.owner[(location.category, location.shard)]
            first = await self._search(owner)(
                routing.version, categories if owner in groups else [], n,
                location=(location.category, location.shard, location.position))
            answers.append(first)
            vector = first["vector"]
            groups = [g for g in groups if g != owner]
        if groups:
            vector = np.asarray(vector, np.float32).tolist()
            answers += await asyncio.gather(*[self._search(g)(routing.version, categories, n, vector=vector)
                                              for g in groups])
        mixed = {a["version"] for a in answers} - {routing.version}
        if mixed:  # searchers answer from the version asked for; this would be a bug, never a silent mix
            raise ApiError(500, f"searchers answered from {sorted(mixed)} for a {routing.version} request")
        return [h for a in answers for h in a["hits"]]

    # -- endpoints

    @api.get("/healthz")
    def healthz(self):
        """Up and serving an index (200), or why not (503). ``degraded``: LATEST was refused, the old index serves."""
        routing = self._routing()
        body = {"status": "ok", "index_version": routing.version}
        state = self.swapper.state()
        if state.get("refused"):
            body.update(status="degraded", latest=state["latest"], refused=state["refused"])
        elif state.get("loading"):
            body["loading"] = state["loading"]
        return body

    @api.get("/version")
    def version(self, request: Request):
        self._authorize(request)
        routing = self._routing()
        state = self.swapper.state()
        return {**summary(routing.manifest), "swapped_at": self.swapper.swapped_at,
                "searcher_groups": self.cfg.serve.searcher_groups, **state,
                "last_error": state["refused"]["reason"] if state.get("refused") else None}

    @api.get("/similar/{product_id}")
    async def similar(self, request: Request, product_id: str,
                      k: int | None = Query(None, description="number of results"),
                      category: str | None = Query(None, description="comma-separated; default: the product's own")):
        self._authorize(request)
        routing = self._routing()
        k = self._k(k)
        found = routing.directory.lookup(product_id)
        if not found:
            raise ApiError(404, f"unknown product_id {product_id!r} in index {routing.version}")
        cats = _categories(routing, category)
        loc = next((f for f in found if cats and f.category in cats), found[0])
        model = category_version(routing.manifest, loc.category)
        other = [c for c in cats or [] if category_version(routing.manifest, c) != model]
        if other:
            raise ApiError(400, f"categories {other} are embedded by another model than {product_id!r}'s "
                                f"{loc.category} vector ({model}); ask for them separately")
        parts = await self._fan_out(routing, cats or [loc.category], k + 1, location=loc)
        return {"product_id": product_id, "category": loc.category, "index_version": routing.version,
                "results": merge(parts, k, exclude=product_id)}

    @api.post("/search")
    async def search(self, request: Request, k: int | None = Query(None),
                     category: str | None = Query(None, description="comma-separated; default: all")):
        self._authorize(request)
        routing = self._routing()
        k = self._k(k)
        cats = _categories(routing, category)
        data = await self._upload(request)
        try:
            img = imaging.decode(data, self.cfg.serve.max_image_pixels)
        except imaging.ImageRejected as exc:
            status = 413 if exc.reason == "too_many_pixels" else 415
            raise ApiError(status, f"not a usable image ({exc.reason}): {exc.detail}") from None
        detected, scale = [], 1.0
        if self.cfg.detect.enabled and not cats:
            view = imaging.fit(img, self.cfg.detect.image_size)  # what the pipeline's detect stage looks at
            scale = img.width / view.shape[1]
            detected = await self.encoder.objects.remote(view.tobytes(), (view.shape[1], view.shape[0]))
        objects = []
        for o in detected:  # each object in its own category's index
            if o["category"] in routing.groups_of:
                parts = await self._fan_out(routing, [o["category"]], k, vector=o["vector"])
                objects.append({"category": o["category"], "box": [round(v * scale, 1) for v in o["box"]],
                                "score": o["score"], "results": merge(parts, k)})
        if not objects:  # no detector, a category filter, or nothing found: the whole image
            pixels = imaging.preprocess(img, self.cfg.embed.image_size)
            by_model: dict[str, list[str]] = {}
            for c in cats or sorted(routing.groups_of):
                by_model.setdefault(category_version(routing.manifest, c), []).append(c)
            vectors = await asyncio.gather(*[self.encoder.embed.remote(pixels, mv) for mv in by_model])
            parts = [h for (mv, names), vector in zip(by_model.items(), vectors)
                     for h in await self._fan_out(routing, names, k, vector=vector)]
            objects.append({"category": ",".join(cats) if cats else None, "box": [0, 0, img.width, img.height],
                            "score": None, "results": merge(parts, k)})
        return {"index_version": routing.version, "detector": self.cfg.detect.detector,
                "detected": len(detected), "objects": objects}

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


def auth_digest(serve_cfg: ServeConfig) -> str | None:
    """sha256 of the bearer token named by ``serve.auth_token_env``; replicas get the digest, never the token."""
    name = serve_cfg.auth_token_env
    if not name:
        return None
    token = os.environ.get(name, "").strip()
    if not token:
        raise ConfigError(f"serve.auth_token_env: environment variable {name} is not set or empty")
    return hashlib.sha256(token.encode()).hexdigest()


def build_app(cfg: Config):
    """The Serve application for ``serve.run``; replicas get plain dicts (picklable, re-validated)."""
    s = cfg.serve
    uri = cfg.detect.detector
    if uri not in ("none", "shipped") and "://" not in uri and not os.path.exists(uri):
        raise ConfigError(f"detect.detector: no such file {uri!r} (none, shipped, a path or a gs:// URI)")
    opts = {"num_cpus": s.replica_cpus}
    encoder = Encoder.options(ray_actor_options=opts).bind(cfg.embed.model_dump(), s.encoder_batch_size,
                                                           s.encoder_batch_wait_s, gcs_options(cfg.storage),
                                                           cfg.detect.model_dump())
    searchers = [Searcher.options(name=f"Searcher{g}", num_replicas=s.searcher_replicas,
                                  max_ongoing_requests=s.max_ongoing_requests, ray_actor_options=opts)
                 .bind(cfg.to_dict(), g, s.searcher_groups) for g in range(s.searcher_groups)]
    return SearchAPI.options(ray_actor_options=opts, max_ongoing_requests=s.max_ongoing_requests).bind(
        encoder, searchers, cfg.to_dict(), auth_digest(s))


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


def start(cfg: Config, wait_s: float = 300.0, name: str = "lookalike", route_prefix: str = "/") -> str:
    """Start Serve on the connected Ray cluster (HTTP on cfg.serve.host:port) and deploy the app."""
    from engine import raycluster

    raycluster.connect(cfg.ray)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(build_app(cfg), name=name, route_prefix=route_prefix, blocking=False)
    url = f"http://{cfg.serve.host}:{cfg.serve.port}{route_prefix.rstrip('/')}"
    _wait_ready(url, wait_s)
    return url


def _wait_ready(url: str, wait_s: float) -> None:
    """Until /healthz answers 200, or 503 for a reason waiting will not fix (nothing published, refused)."""
    import json
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + wait_s
    while True:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=5):
                return
        except urllib.error.HTTPError as exc:
            if exc.code == 503:
                try:
                    state = json.loads(exc.read()).get("state")
                except ValueError:
                    state = None
                if state in ("unpublished", "refused"):
                    return  # our own answer: up, nothing servable yet
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"service at {url} not ready after {wait_s:.0f}s; see `serve status`")
        time.sleep(0.3)
