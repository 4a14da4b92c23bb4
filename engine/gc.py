"""Garbage collection after publish: delete what no kept version references.

Kept versions of an index line are its newest ``storage.keep_versions`` complete index versions
and the one LATEST names; of any other line (another ``embed.model_version`` sharing feature
files), every complete version. What to delete is derived from the kept versions' manifests,
never from what a run just wrote or compacted, so an interrupted collection is finished by the
next one and a file some kept version names is never touched:

- index versions: a version that is not kept is marked ``RETIRED`` and loses its manifest.json
  first (it stops being a version), then every category folder no kept version refers to (index
  reuse: a newer version may serve an older version's shards); the folder goes when empty.
- manifests: folders outside every kept version's chain (base + deltas), up to LATEST.
- features: files in no kept version's file catalog, written by runs up to LATEST (a newer run
  may still be writing its own).
- thumbnails: packs no kept version's display files name, written by runs up to LATEST, and the
  entry files of those runs (engine/thumbs.py).
"""
from __future__ import annotations

import posixpath

from engine import manifest, thumbs
from engine.index import MANIFEST, owner
from engine.pointer import POINTER, latest
from engine.storage import Storage

RETIRED = "RETIRED"


def index_folders(storage: Storage, line: str) -> list[str]:
    return [n for n in storage.listdir("indexes", line) if not n.startswith(POINTER)]


def complete(storage: Storage, line: str) -> list[str]:
    return [v for v in index_folders(storage, line) if storage.exists("indexes", line, v, MANIFEST)]


def kept(storage: Storage, line: str, keep: int | None) -> list[str]:
    versions = complete(storage, line)
    newest = versions[-keep:] if keep else versions
    current = latest(storage, line)
    return sorted(set(newest) | ({current} if current in versions else set()))


def _references(storage: Storage, line: str, versions: list[str]) -> set[tuple[str, str]]:
    """(version folder, category) pairs the given versions' manifests read shards from."""
    out = set()
    for v in versions:
        m = storage.read_json("indexes", line, v, MANIFEST)
        out |= {(owner(m, c), c) for c in m.get("categories", {})}
        out |= {(s["attrs_version"], c) for c, e in m.get("categories", {}).items()  # filter columns
                for s in e.get("shards", []) if s.get("attrs_version")}
        out |= {(e["version"], c) for c, entry in m.get("categories", {}).items() for e in entry["shards"]
                if e.get("version")}  # delta shards (engine/delta.py) live in their own version's folder
        out |= {(e["display"]["version"], c) for c, e in m.get("categories", {}).items() if e.get("display")}
    return out


def prune_indexes(storage: Storage, line: str, keep: int, protect: tuple = ()) -> list[str]:
    """Retire index versions beyond ``keep`` (never LATEST or ``protect``); returns those retired now."""
    keep_set = set(kept(storage, line, keep)) | {p for p in protect if p}
    refs = _references(storage, line, sorted(keep_set))
    retired = []
    for v in index_folders(storage, line):
        if v in keep_set:
            continue
        has_manifest = storage.exists("indexes", line, v, MANIFEST)
        if not has_manifest and not storage.exists("indexes", line, v, RETIRED):
            continue  # being built, or a crashed build: not ours to judge
        if has_manifest:
            storage.write_text(v + "\n", "indexes", line, v, RETIRED)
            storage.rm("indexes", line, v, MANIFEST)
            retired.append(v)
        left = [c for c in storage.listdir("indexes", line, v) if c != RETIRED]
        for category in left:
            if (v, category) not in refs:
                storage.rm("indexes", line, v, category)
        if all((v, c) not in refs for c in left):
            storage.rm("indexes", line, v)
    return retired


def collect(storage: Storage, line: str, keep: int) -> dict:
    """Delete unreferenced manifests and feature files (after publish; see the module docstring)."""
    current = latest(storage, line)
    if current is None:
        return {"manifests": 0, "files": 0}
    chains, files = set(), set()
    packs = {p for v in kept(storage, line, keep) for e in storage.read_json("indexes", line, v, MANIFEST)
             .get("categories", {}).values() for p in (e.get("display") or {}).get("packs", [])}
    for other in storage.listdir("indexes"):
        for v in kept(storage, other, keep if other == line else None):
            meta = manifest.read_meta(storage, other, v)
            if meta is None:
                continue
            chains |= {(other, c) for c in meta["chain"]}
            files |= set(meta["files"])
    gone_manifests = 0
    for v in storage.listdir("manifests", line):
        if v <= current and (line, v) not in chains:
            storage.rm("manifests", line, v)
            gone_manifests += 1
    gone_files = 0
    for mv in storage.listdir("features"):
        for name in storage.listdir("features", mv):
            if name.startswith("run="):
                if name.split("=", 1)[1] > current:
                    continue
                gone_files += _sweep(storage, ("features", mv, name), files, lambda f: True)
            elif name == "compacted":
                gone_files += _sweep(storage, ("features", mv, name), files, lambda f: _writer(f) <= current)
    return {"manifests": gone_manifests, "files": gone_files, "thumb_files": thumbs.sweep(storage, line, packs, current)}


def _writer(file: str) -> str:
    """The run that wrote a compacted file: its name is ``<run_id>-<random>.parquet``."""
    return posixpath.basename(file).lstrip(".").rsplit("-", 1)[0]


def _sweep(storage: Storage, prefix: tuple, referenced: set, old_enough) -> int:
    """Delete unreferenced parquet files under ``prefix`` (category folders), then empty folders."""
    gone = 0
    for category in storage.listdir(*prefix):
        names = storage.listdir(*prefix, category)
        for n in names:
            rel = "/".join(prefix + (category, n))
            if n.endswith((".parquet", ".tmp")) and rel not in referenced and old_enough(rel):
                storage.rm(*prefix, category, n)
                gone += 1
        if storage.is_local and not storage.listdir(*prefix, category):
            storage.rm(*prefix, category)
    if storage.is_local and not storage.listdir(*prefix) and prefix[-1] != "compacted":
        storage.rm(*prefix)
    return gone
