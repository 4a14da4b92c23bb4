"""Publish: the LATEST pointer moves last, and only to a validated, complete version.

``indexes/<model_version>/LATEST`` holds one line, the index version. Old versions beyond
``storage.keep_versions`` are deleted, never the one LATEST names.
"""
from __future__ import annotations

from engine.index import MANIFEST
from engine.storage import Storage

POINTER = "LATEST"


def latest(storage: Storage, model_version: str) -> str | None:
    try:
        return storage.read_text("indexes", model_version, POINTER).strip() or None
    except FileNotFoundError:
        return None


def versions(storage: Storage, model_version: str) -> list[str]:
    """Complete versions (with a manifest), oldest first; version names sort by time."""
    names = [n for n in storage.listdir("indexes", model_version) if n != POINTER]
    return [n for n in names if storage.exists("indexes", model_version, n, MANIFEST)]


def publish(storage: Storage, model_version: str, index_version: str, keep: int) -> dict:
    if not storage.exists("indexes", model_version, index_version, MANIFEST):
        raise RuntimeError(f"refusing to publish {index_version}: it has no manifest")
    previous = latest(storage, model_version)
    storage.write_text(index_version + "\n", "indexes", model_version, POINTER)
    removed = []
    for old in versions(storage, model_version)[:-keep] if keep else []:
        if old != index_version:
            storage.rm("indexes", model_version, old)
            removed.append(old)
    return {"published": index_version, "previous": previous, "removed": removed,
            "latest_uri": storage.uri("indexes", model_version, POINTER)}
