"""The storage root: a local directory or ``gs://bucket/prefix``, always through fsspec.

Layout (the contract other tools rely on)::

    features/<model_version>/...           feature shards (parquet)
    indexes/<model_version>/<index_version>/...
    indexes/<model_version>/LATEST         text: the published index version
    thumbs/<model_version>/run=<run_id>/   thumbnail packs (engine/thumbs.py)
    runs/<run_id>/report.json, rejects.parquet
    manifests/

GCS settings (endpoint, credentials) travel *with* a ``Storage`` object, also when it is
pickled into a Ray task: workers of a shared cluster never see the driver's environment, so
an endpoint that lived only in an environment variable would silently send them to Google.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import uuid

# gcsfs reads this when it is imported. Its experimental zonal-bucket probe makes every bucket
# lookup wait 30-60 s on a gRPC call that never answers outside Google (and on emulators).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import fsspec  # noqa: E402

GCS_PROTOCOLS = ("gs://", "gcs://")


def sha256(path: str) -> str:
    """Hex sha256 of a local file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def gcs_options(cfg) -> dict:
    """gcsfs keyword arguments from a StorageConfig (None: Google's endpoint and ADC)."""
    # Listing caches would let a long-lived service miss a newly published version.
    opts = {"token": cfg.gcs_token or "google_default", "use_listings_cache": False}
    if cfg.gcs_endpoint:
        opts["endpoint_url"] = cfg.gcs_endpoint.rstrip("/")
    if cfg.gcs_project:
        opts["project"] = cfg.gcs_project
    return opts


def is_gcs(uri: str) -> bool:
    return uri.startswith(GCS_PROTOCOLS)


def fs_for(uri: str, storage_options: dict | None = None):
    """(filesystem, path) for any URI; GCS options apply only to gs:// URIs."""
    if not is_gcs(uri):
        return fsspec.core.url_to_fs(uri)
    cls = _gcs_class()
    return cls(**cls._get_kwargs_from_urls(uri), **(storage_options or {})), cls._strip_protocol(uri)


def _gcs_class():
    """gcsfs's core filesystem, even in a Ray worker that imported gcsfs before this module: with the
    variable unset at its import, gcsfs swaps in the experimental class that stalls off Google's network."""
    import gcsfs
    from gcsfs.core import GCSFileSystem

    if os.environ.get("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "").lower() in ("true", "1"):
        return gcsfs.GCSFileSystem
    return GCSFileSystem


def open_uri(uri: str, mode: str = "rb", storage_options: dict | None = None):
    fs, path = fs_for(uri, storage_options)
    return fs.open(path, mode)


class Storage:
    def __init__(self, root: str, storage_options: dict | None = None):
        self.root = root.rstrip("/") or "/"
        self.options = dict(storage_options or {})
        self.fs, self.base = fs_for(self.root, self.options)
        self.is_local = self.fs.protocol in ("file", ("file", "local")) or "file" in self.fs.protocol
        if self.is_local:
            os.makedirs(self.base, exist_ok=True)

    @classmethod
    def from_config(cls, cfg) -> "Storage":
        """The root of a StorageConfig, with its GCS endpoint and credentials."""
        return cls(cfg.root, gcs_options(cfg))

    @classmethod
    def of(cls, root: "Storage | str") -> "Storage":
        """Accept a Storage (keeps its settings) or a bare root (local, or GCS with defaults)."""
        return root if isinstance(root, Storage) else cls(root)

    def __reduce__(self):
        return (Storage, (self.root, self.options))

    def path(self, *parts: str) -> str:
        """Filesystem path (no protocol) for pyarrow/fs calls."""
        return posixpath.join(self.base, *parts)

    def uri(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def makedirs(self, *parts: str) -> None:
        if self.is_local:
            os.makedirs(self.path(*parts), exist_ok=True)

    def read_text(self, *parts: str) -> str:
        with self.fs.open(self.path(*parts), "r") as f:
            return f.read()

    def read_json(self, *parts: str):
        return json.loads(self.read_text(*parts))

    def write_text(self, text: str, *parts: str) -> None:
        """Write whole-or-nothing: a reader never sees half a file."""
        target = self.path(*parts)
        if self.is_local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        else:  # object stores write objects atomically
            with self.fs.open(target, "w") as f:
                f.write(text)

    def write_json(self, obj, *parts: str) -> None:
        self.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str), *parts)

    def put_file(self, local_path: str, *parts: str) -> None:
        target = self.path(*parts)
        if self.is_local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
        self.fs.put_file(local_path, target)

    def get_file(self, local_path: str, *parts: str) -> None:
        os.makedirs(os.path.dirname(local_path) or ".", exist_ok=True)
        self.fs.get_file(self.path(*parts), local_path)

    def listdir(self, *parts: str) -> list[str]:
        """Names (not paths) directly under a prefix; empty when it does not exist."""
        try:
            entries = self.fs.ls(self.path(*parts), detail=False)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)

    def rm(self, *parts: str) -> None:
        self.fs.rm(self.path(*parts), recursive=True)
