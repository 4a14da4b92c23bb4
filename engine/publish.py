"""Publish: the LATEST pointer moves last, only to a validated, complete version, and only
if nobody else moved it since this run looked at it.

``indexes/<model_version>/LATEST`` holds one line, the index version. A run reads the pointer
when it starts (``read_pointer``) and publishes with that reading as the expected state: a
compare-and-swap. On GCS the swap is a write with an ``ifGenerationMatch`` precondition
(google-cloud-storage's ``if_generation_match``); on a local disk it is a compare-and-replace under an ``O_EXCL`` lock file. Of two runs that start
from the same LATEST, the first to publish wins and the second fails with PublishConflict
instead of replacing a newer index with an older catalog's.

Old versions beyond ``storage.keep_versions`` are retired (engine/gc.py), never the one LATEST
names, and never shards a kept version still serves by reference.
"""
from __future__ import annotations

import os
import time
import uuid

from google.api_core import exceptions as gcs_exceptions

from engine import gc
from engine.index import MANIFEST
from engine.pointer import (POINTER, Pointer, PublishConflict, _blob, gcs_client, latest,  # noqa: F401 - re-exported
                            read_pointer)
from engine.storage import Storage

STALE_LOCK_S = 60.0  # a local swap holds its lock for milliseconds; older means its owner died


def versions(storage: Storage, model_version: str) -> list[str]:
    """Complete versions (with a manifest), oldest first; version names sort by time."""
    names = [n for n in storage.listdir("indexes", model_version) if n not in (POINTER, POINTER + ".lock")]
    return [n for n in names if storage.exists("indexes", model_version, n, MANIFEST)]


def swap(storage: Storage, model_version: str, version: str, expected: Pointer) -> Pointer:
    """Point LATEST at ``version`` if it is still ``expected``; else raise PublishConflict."""
    ok = (_swap_local if storage.is_local else _swap_gcs)(storage, model_version, version + "\n", expected)
    now = read_pointer(storage, model_version)
    if not ok and now.version != version:  # (a GCS write retried after a lost reply finds itself: fine)
        raise PublishConflict(
            f"not publishing {version}: LATEST of {model_version} moved from {expected.version} to "
            f"{now.version} while this run was working (another run published first). Index {version} "
            f"is complete and validated but stays unpublished; run again to build on the new state.")
    return now


def _swap_gcs(storage: Storage, model_version: str, text: str, expected: Pointer) -> bool:
    """A write with ifGenerationMatch (0: only if absent); 412 Precondition Failed: someone else won."""
    blob = _blob(storage, model_version)
    blob.cache_control = "no-store"  # a reader must never be served yesterday's LATEST from a cache
    try:
        blob.upload_from_string(text, content_type="text/plain", if_generation_match=int(expected.token))
    except gcs_exceptions.PreconditionFailed:
        return False
    storage.fs.invalidate_cache(storage.path("indexes", model_version))
    return True


def _swap_local(storage: Storage, model_version: str, text: str, expected: Pointer) -> bool:
    path = storage.path("indexes", model_version, POINTER)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lock = _lock(path + ".lock")
    try:
        if read_pointer(storage, model_version).token != expected.token:
            return False
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return True
    finally:
        os.close(lock)
        os.unlink(path + ".lock")


def _lock(path: str, wait_s: float = 10.0) -> int:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        except FileExistsError:
            try:
                if time.time() - os.path.getmtime(path) > STALE_LOCK_S:
                    os.unlink(path)  # its owner died mid-swap; the pointer itself is intact (os.replace)
                    continue
            except FileNotFoundError:
                continue
            if time.monotonic() > deadline:
                raise PublishConflict(f"{path}: held by another publisher for over {wait_s:.0f}s") from None
            time.sleep(0.01)


def publish(storage: Storage, model_version: str, index_version: str, keep: int,
            expected: Pointer | None = None) -> dict:
    """Move LATEST to ``index_version`` (if LATEST is still ``expected``), then prune old versions.

    ``expected`` is the pointer as the run saw it when it started; None reads it now, which
    still protects against a publisher racing this very call.
    """
    if not storage.exists("indexes", model_version, index_version, MANIFEST):
        raise RuntimeError(f"refusing to publish {index_version}: it has no manifest")
    expected = expected or read_pointer(storage, model_version)
    current = swap(storage, model_version, index_version, expected)
    removed = gc.prune_indexes(storage, model_version, keep, protect=(index_version, current.version))
    return {"published": index_version, "previous": expected.version, "removed": removed,
            "latest_uri": storage.uri("indexes", model_version, POINTER)}
