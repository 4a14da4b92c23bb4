"""The LATEST pointer of an index line: ``indexes/<model_version>/LATEST``, one line naming the
published index version. Read here by everything that needs to know what is published (the
plan, the service, garbage collection); moved only by engine/publish.py. On GCS it is read and
written through google-cloud-storage, whose generations make the compare-and-swap."""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from google.api_core import exceptions as gcs_exceptions

from engine.config import NAME
from engine.storage import Storage

POINTER = "LATEST"


class PublishConflict(RuntimeError):
    """LATEST moved between this run's start and its publish."""


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
    for _ in range(5):
        blob = _blob(storage, model_version)  # fresh: a blob that knows a generation reads only that one
        try:
            blob.reload()  # the generation
        except gcs_exceptions.NotFound:
            return Pointer(None, "0")
        try:  # the content of exactly that generation; it moved in between: read again
            body = blob.download_as_bytes(if_generation_match=blob.generation)
        except gcs_exceptions.PreconditionFailed:
            continue
        return Pointer(body.decode().strip() or None, str(blob.generation))
    raise PublishConflict(f"{path}: rewritten on every read; another publisher is looping")


def latest(storage: Storage, model_version: str) -> str | None:
    """The version LATEST names; a name that is not a plain path segment is refused, never followed."""
    version = read_pointer(storage, model_version).version
    if version is not None and not re.match(NAME, version):
        raise ValueError(f"LATEST of {model_version} names {version[:80]!r}, not a usable index version")
    return version


def _blob(storage: Storage, model_version: str):
    """The LATEST object through google-cloud-storage, with the endpoint and credentials of ``storage``."""
    bucket, key, _ = storage.fs.split_path(storage.path("indexes", model_version, POINTER))
    return gcs_client(storage.options).bucket(bucket).blob(key)


@functools.lru_cache(maxsize=8)
def _client(endpoint: str | None, token: str | None, project: str | None):
    from google.cloud import storage as gcs

    if token == "anon":  # an emulator; a project is required but never used
        from google.auth.credentials import AnonymousCredentials

        credentials, project = AnonymousCredentials(), project or "anonymous"
    elif token and token != "google_default":
        from google.oauth2 import service_account

        credentials = service_account.Credentials.from_service_account_file(token)
    else:
        credentials = None  # Application Default Credentials
    options = {"api_endpoint": endpoint} if endpoint else None
    return gcs.Client(project=project, credentials=credentials, client_options=options)


def gcs_client(options: dict):
    """A google-cloud-storage Client for gcsfs-style storage options (engine.storage.gcs_options)."""
    return _client(options.get("endpoint_url"), options.get("token"), options.get("project"))
