"""The search service on Ray Serve: the FastAPI ingress and how the application is put together.

``SearchAPI`` (ingress) checks requests, knows where every product is (a compact directory of the
index's id maps, no vectors) and fans each query out to the ``Searcher`` groups that hold the
shards of the categories asked for (serve/searcher.py), then merges their top-k by score.
``/search`` reads the upload in a stream (serve/upload.py), decodes it off the event loop with the
pipeline's limits, and has ``Encoder`` replicas (serve/encoder.py) embed it, batched.

Each request reads the active ``Routing`` (serve/routing.py) once and names its version in every
searcher call, so a response never mixes versions and says which one it came from; the
``Swapper`` (serve/swap.py) replaces it whole when a new version is ready everywhere.
"""

import asyncio
import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import Response
from fastapi.security import HTTPBearer
from ray import serve

from engine import detect, imaging, metrics, thumbs
from engine.config import Config, ConfigError, ServeConfig
from engine.index import Location, category_version, merge, summary
from engine.storage import gcs_options
from serve import auth, errors, filters, page, upload
from serve.encoder import Encoder
from serve.errors import ApiError
from serve.fresh import Fresh, live
from serve.models import UPLOAD_BODY, Health, SearchAnswer, SimilarAnswer, VersionInfo, errors as codes
from serve.routing import Routing, call_within, categories, fan_out
from serve.searcher import Searcher, ShardGroup
from serve.swap import Swapper

FILTER_HELP = ('only items matching, over index.filter_columns: =, !=, <, <=, >, >=, IN (...), joined by AND; '
               'e.g. in_stock = true AND price < 100 AND brand IN ("a", "b")')
api = FastAPI(
    title="Lookalike",
    description="Visual similarity search over a product catalog. Results are best first; "
                "score is cosine similarity (1 = identical). Every answer names the index version it came from.",
    version="1",
)
api.add_middleware(metrics.LatencyMiddleware)  # latency per route on the Ray dashboard
errors.install(api)
# Declares the scheme in /openapi.json; SearchAPI._authorize checks it (serve/auth.py: token or IAP header).
bearer = [Depends(HTTPBearer(auto_error=False, description="required when serve.auth_token_env is set"))]
THUMB_MAX_AGE_S = 3600


@serve.deployment(name="SearchAPI")
@serve.ingress(api)
class SearchAPI:
    def __init__(self, encoder, searchers: list, cfg: dict, auth_sha256: str | None = None):
        self.cfg = Config.model_validate(cfg)
        self.encoder, self.searchers = encoder, searchers or [ShardGroup(self.cfg, 0, 1)]
        self.auth = auth.Authorizer(self.cfg.serve, auth_sha256)  # serve.auth: token or iap (serve/auth.py)
        self.swapper = Swapper(self.cfg, self.searchers, self.cfg.serve.searcher_replicas)
        self.fresh = Fresh(self.swapper.storage, self.cfg.embed.model_version, self.cfg.serve.poll_interval_s)
        self.fresh.start(lambda: [self.swapper.active and self.swapper.active.version])  # deleted ids: 404
        self.decoders = ThreadPoolExecutor(self.cfg.serve.decode_threads, thread_name_prefix="decode")
        self.pending = 0  # uploads decoding or waiting to; bounded by serve.max_pending_uploads

    # -- request plumbing

    def _authorize(self, request: Request) -> None:
        self.auth.check(request.headers)

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

    async def _fan_out(self, routing: Routing, categories: list[str], n: int, vector=None,
                       location: Location | None = None, filter: str | None = None) -> list:
        return await fan_out(self.searchers, routing, categories, n, vector, location, self.cfg.serve.call_timeout_s,
                             filter=filter)

    def _filter(self, text: str | None) -> str | None:
        """The filter, checked here (a 400 that says where) before any searcher sees it."""
        if text is None or not text.strip():
            return None
        try:
            filters.parse(text, self.cfg.index.filter_columns)
        except filters.FilterError as exc:
            raise ApiError(400, str(exc)) from None
        return text

    # -- endpoints

    @api.get("/healthz", response_model=Health, responses=codes(503))
    def healthz(self):
        """Status and index version only: ok (200), degraded (200: LATEST was refused, the old index
        serves), or loading / refused / unpublished (503). Why, on /version (behind the token)."""
        routing = self.swapper.active
        state = self.swapper.state()
        if routing is None:
            status = ("refused" if state.get("refused") else "loading"
                      if not self.swapper.polled or state.get("loading") else "unpublished")
            raise ApiError(503, status, state=status)
        return {"status": "degraded" if state.get("refused") else "ok", "index_version": routing.version}

    @api.get("/version", response_model=VersionInfo, response_model_exclude_unset=True, dependencies=bearer,
             responses=codes(401, 503))
    def version(self, request: Request):
        self._authorize(request)
        routing = self._routing()
        state = self.swapper.state()
        return {**summary(routing.manifest), "swapped_at": self.swapper.swapped_at,
                "searcher_groups": self.cfg.serve.searcher_groups, "replicas_prepared": self.swapper.replicas_prepared,
                **state,
                "last_error": state["refused"]["reason"] if state.get("refused") else None}

    @api.get("/similar/{product_id:path}", response_model=SimilarAnswer, response_model_exclude_unset=True,
             dependencies=bearer, responses=codes(400, 401, 404, 422, 503, 504))  # ids may hold "/": as %2F
    async def similar(self, request: Request, product_id: str,
                      k: int | None = Query(None, description="number of results"),
                      category: str | None = Query(None, description="comma-separated; default: the product's own"),
                      filter: str | None = Query(None, description=FILTER_HELP)):
        self._authorize(request)
        routing = self._routing()
        k = self._k(k)
        filter = self._filter(filter)
        found = live(routing.directory.lookup(product_id), self.fresh.get(routing.version), routing.manifest,
                     product_id)
        if not found:
            raise ApiError(404, f"unknown product_id {product_id!r} in index {routing.version}")
        cats = categories(routing, category)
        loc = next((f for f in found if cats and f.category in cats), found[0])
        model = category_version(routing.manifest, loc.category)
        other = [c for c in cats or [] if category_version(routing.manifest, c) != model]
        if other:
            raise ApiError(400, f"categories {other} are embedded by another model than {product_id!r}'s "
                                f"{loc.category} vector ({model}); ask for them separately")
        parts = await self._fan_out(routing, cats or [loc.category], k + 1, location=loc, filter=filter)
        shown = routing.display.columns_of(loc)  # the product's own title etc., for pages
        return {"product_id": product_id, "category": loc.category, **shown, "index_version": routing.version,
                "results": routing.display.decorate(merge(parts, k, exclude=product_id), routing.directory)}

    @api.get("/thumb/{product_id:path}", response_class=Response, dependencies=bearer,
             responses={200: {"content": {"image/jpeg": {}}, "description": "the product's thumbnail (JPEG)"},
                        304: {"description": "If-None-Match matched its ETag"}, **codes(401, 404, 503)})
    async def thumb(self, request: Request, product_id: str):
        """A small JPEG of an indexed product, made by the pipeline (download.thumbnail_size), so
        pages work when catalog images are file://, private or refuse hotlinks. ETag: its content
        hash; If-None-Match answers 304."""
        self._authorize(request)
        routing = self._routing()
        found = routing.directory.lookup(product_id)
        if not found:
            raise ApiError(404, f"unknown product_id {product_id!r} in index {routing.version}")
        entry = next((t for t in map(routing.display.thumb, found) if t), None)
        if entry is None:
            raise ApiError(404, f"no thumbnail for {product_id!r} in index {routing.version}")
        pack, offset, length, etag = entry
        tag = f'"{etag}"'
        headers = {"ETag": tag, "Cache-Control": f"{'private' if self.auth.required else 'public'}, "
                                                 f"max-age={THUMB_MAX_AGE_S}"}
        asked = [t.strip().removeprefix("W/") for t in request.headers.get("if-none-match", "").split(",")]
        if tag in asked or "*" in asked:
            return Response(status_code=304, headers=headers)
        data = await asyncio.get_running_loop().run_in_executor(self.decoders, thumbs.read, self.swapper.storage,
                                                                pack, offset, length)
        return Response(data, media_type="image/jpeg", headers=headers)

    @api.get("/", include_in_schema=False)
    def index_page(self):
        """The search page (serve/page/): static files, no build step, nothing from the network."""
        return page.response("index.html")

    @api.get("/page/{name}", include_in_schema=False)
    def page_file(self, name: str):
        return page.response(name)

    @api.post("/search", response_model=SearchAnswer, response_model_exclude_unset=True, dependencies=bearer,
              openapi_extra={"requestBody": UPLOAD_BODY}, responses=codes(400, 401, 404, 413, 415, 422, 503, 504))
    async def search(self, request: Request, k: int | None = Query(None),
                     category: str | None = Query(None, description="comma-separated; default: all"),
                     filter: str | None = Query(None, description=FILTER_HELP)):
        self._authorize(request)
        routing = self._routing()
        k = self._k(k)
        filter = self._filter(filter)
        cats = categories(routing, category)
        img = await self._image(request)
        detected, scale = [], 1.0
        whole = detect.whole_photo(img, self.cfg.detect, self.cfg.embed.image_size)
        if self.cfg.detect.enabled and not cats:
            view = imaging.fit(img, self.cfg.detect.image_size)  # what the pipeline's detect stage looks at
            scale = img.width / view.shape[1]
            detected = await self._call(
                self.encoder.objects.remote(view.tobytes(), (view.shape[1], view.shape[0]), whole))
        objects = []
        for o in detected:  # each object in its own category's index, or its top categories when unsure
            searched = [c for c in o["routes"] if c in routing.groups_of]
            per_model: dict[str, list[str]] = {}
            for c in searched:
                per_model.setdefault(self.cfg.embed.version_of(c), []).append(c)
            parts = [h for mv, names in per_model.items()
                     for h in await self._fan_out(routing, names, k, vector=o["vectors"][mv], filter=filter)]
            if searched:
                objects.append({"category": o["category"], "box": [round(v * scale, 1) for v in o["box"]],
                                "score": o["score"], "alternatives": o["alternatives"], "searched": searched,
                                "results": routing.display.decorate(detect.merge_routes(parts, k), routing.directory)})
        if not objects:  # no detector, a category filter, or nothing found: the whole image
            pixels = whole
            by_model: dict[str, list[str]] = {}
            for c in cats or sorted(routing.groups_of):
                by_model.setdefault(category_version(routing.manifest, c), []).append(c)
            vectors = await asyncio.gather(*[self._call(self.encoder.embed.remote(pixels, mv)) for mv in by_model])
            parts = [h for (mv, names), vector in zip(by_model.items(), vectors)
                     for h in await self._fan_out(routing, names, k, vector=vector, filter=filter)]
            objects.append({"category": ",".join(cats) if cats else None, "box": [0, 0, img.width, img.height],
                            "score": None, "results": routing.display.decorate(merge(parts, k), routing.directory)})
        return {"index_version": routing.version, "detector": self.cfg.detect.detector,
                "detected": len(detected), "objects": objects}

    async def _upload(self, request: Request) -> bytes:
        return await upload.read_image(request, self.cfg.serve.max_upload_bytes)

    async def _image(self, request: Request):
        """The upload, read in a stream and decoded in the decode pool (never on the event loop);
        past serve.max_pending_uploads a 503 with Retry-After instead of an ever longer queue."""
        if self.pending >= self.cfg.serve.max_pending_uploads:
            raise ApiError(503, f"busy: {self.pending} uploads in progress; retry shortly", headers={"Retry-After": "1"},
                           state="busy")
        self.pending += 1
        try:
            data = await self._upload(request)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.decoders, imaging.decode, data, self.cfg.serve.max_image_pixels)
        except imaging.ImageRejected as exc:
            status = 413 if exc.reason == "too_many_pixels" else 415
            raise ApiError(status, f"not a usable image ({exc.reason}): {exc.detail}") from None
        finally:
            self.pending -= 1

    async def _call(self, response):
        """A deployment call's answer within serve.call_timeout_s, or a 504 (the call is cancelled)."""
        return await call_within(response, self.cfg.serve.call_timeout_s)


def auth_digest(serve_cfg: ServeConfig) -> str | None:
    """sha256 of the bearer token named by ``serve.auth_token_env``; replicas get the digest, never the token."""
    name = serve_cfg.auth_token_env
    if not name or serve_cfg.auth != "token":
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
    return SearchAPI.options(ray_actor_options=opts, max_ongoing_requests=s.max_ongoing_requests,
                             max_queued_requests=s.max_queued_requests).bind(
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
