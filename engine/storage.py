"""The storage root: a local directory or ``gs://bucket/prefix``, always through fsspec.

Layout (the contract other tools rely on)::

    features/<model_version>/...           feature shards (parquet)
    indexes/<model_version>/<index_version>/...
    indexes/<model_version>/LATEST         text: the published index version
    runs/<run_id>/report.json, rejects.parquet
    manifests/
"""
from __future__ import annotations

import json
import os
import posixpath
import uuid

import fsspec


class Storage:
    def __init__(self, root: str):
        self.root = root.rstrip("/") or "/"
        self.fs, self.base = fsspec.core.url_to_fs(self.root)
        self.is_local = self.fs.protocol in ("file", ("file", "local")) or "file" in self.fs.protocol
        if self.is_local:
            os.makedirs(self.base, exist_ok=True)

    def __reduce__(self):
        return (Storage, (self.root,))

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
