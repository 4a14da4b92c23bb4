"""The LATEST pointer of an index line: ``indexes/<model_version>/LATEST``, one line naming the
published index version. Read here by everything that needs to know what is published (the
plan, the service, garbage collection); moved only by engine/publish.py."""
from __future__ import annotations

from dataclasses import dataclass

from engine.storage import Storage

POINTER = "LATEST"


@dataclass(frozen=True)
class Pointer:
    version: str | None
    token: str  # GCS: the object generation ("0": absent); local: the pointer's text ("": absent)


def read_pointer(storage: Storage, model_version: str) -> Pointer:
    path = storage.path("indexes", model_version, POINTER)
    if storage.is_local:
        try:
            with open(path) as f:
                text = f.read()
        except FileNotFoundError:
            return Pointer(None, "")
        return Pointer(text.strip() or None, text)
    bucket, key, _ = storage.fs.split_path(path)
    try:  # one request: the content and the generation it belongs to
        headers, body = storage.fs.call("GET", "b/{}/o/{}", bucket, key, alt="media")
    except FileNotFoundError:
        return Pointer(None, "0")
    return Pointer(body.decode().strip() or None, headers["x-goog-generation"])


def latest(storage: Storage, model_version: str) -> str | None:
    return read_pointer(storage, model_version).version
