"""Plan a run against what is already known, so a daily run costs in proportion to the change.

Every catalog row gets a content key: ``sha1(image_url, updated_at)``. It is decided from the
catalog alone (no extra request per image); a picture replaced behind the same URL without a
new ``updated_at`` is not seen, which ``--full`` (``plan.full``) covers.

A row is ``new`` (product never indexed), ``changed`` (its key, category, detection settings or
the embedding model of one of its objects differ) or ``reuse``. Stored features are those named
by the product manifest of the published index version, plus committed shards of later runs
that never published (a crashed or refused run): that is what makes a re-run resume instead of
recompute. A product's features are its objects (one row per object, engine/detect.py); a
reused product leaves the plan as one row per stored object, so later stages never look it up.

The plan actor also numbers catalog rows (``row``) and rejects a product_id seen earlier in
the catalog (``duplicate_product_id``): it is the one place that sees every row.
"""
from __future__ import annotations

import hashlib

import pyarrow as pa

from engine import manifest, pointer
from engine.manifest import STATE_SCHEMA, empty_state
from engine.storage import Storage

NEW, CHANGED, REUSE, DUPLICATE = "new", "changed", "reuse", "duplicate"
PLAN_FIELDS = [pa.field("content_key", pa.string()), pa.field("action", pa.string()),
               pa.field("file", pa.string()), pa.field("row", pa.int64()), pa.field("catalog_category", pa.string()),
               pa.field("catalog_row", pa.int64()), pa.field("object", pa.int32()), pa.field("objects", pa.int32()),
               pa.field("note", pa.string())]  # note: why a duplicate row is rejected (the download stage says it)
def content_key(image_url, updated_at) -> str:
    raw = f"{image_url or ''}\x00{'' if updated_at is None else updated_at}"
    return hashlib.sha1(raw.encode()).hexdigest()[:20]


def known_features(storage: Storage, line: str, model_versions: list[str], current_run: str) -> pa.Table:
    """STATE rows of every reusable stored feature (one row per object), plus ``source``: 0 for the
    published manifest, then 1, 2, ... for committed parts of later runs that never published.

    ``line``: the index line (embed.model_version) whose published manifest is read;
    ``model_versions``: the feature namespaces the config uses, whose orphan runs count too.
    """
    published = pointer.latest(storage, line)
    tables = []
    if published and manifest.exists(storage, line, published):
        tables.append(manifest.read_state(storage, line, published))
    pending = manifest.pending_state(storage, model_versions, published, current_run)
    if pending.num_rows:
        tables.append(pending)
    if not tables:
        return empty_state().append_column("source", pa.array([], pa.int32()))
    out = []
    for number, t in enumerate(tables):
        out.append(t.cast(STATE_SCHEMA).append_column("source", pa.array([number] * t.num_rows, pa.int32())))
    return pa.concat_tables(out)


def stored_objects(table: pa.Table) -> dict[str, list[dict]]:
    """product_id -> its stored objects, from the latest source that has them (table order; a
    pending run's parts: the run of the file)."""
    out: dict[str, list[dict]] = {}
    for entry in table.to_pylist():
        entry["origin"] = (entry.get("source"), entry["file"].split("/")[2] if entry["source"] else "")
        have = out.get(entry["product_id"])
        if have is None or have[0]["origin"] != entry["origin"]:
            out[entry["product_id"]] = [entry]
        elif all(e["category"] != entry["category"] for e in have):
            have.append(entry)
    return out


class PlanStage:
    """Ray Data actor (exactly one: it sees every row): adds PLAN_FIELDS to each catalog row and
    expands reused products into their stored objects."""

    def __init__(self, state: list, embed: dict, detect_version: str, full: bool = False):
        import ray

        from engine.config import EmbedConfig

        table = ray.get(state[0]) if isinstance(state[0], ray.ObjectRef) else state[0]
        self.full, self.detect_version = full, detect_version
        self.embed = EmbedConfig.model_validate(embed)
        self.known = stored_objects(table)
        self.seen: dict[str, str] = {}
        self.rows = 0

    def reusable(self, objects: list[dict] | None, key: str, category: str) -> bool:
        return bool(objects) and not self.full and len(objects) == objects[0]["objects"] and all(
            o["content_key"] == key and o["catalog_category"] == category and o["detect_version"] == self.detect_version
            and o["model_version"] == self.embed.version_of(o["category"]) for o in objects) \
            and any(o["category"] == category for o in objects)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from engine.catalog import normalise

        batch = normalise(batch)
        n = batch.num_rows
        stamps = batch.column("updated_at").to_pylist() if "updated_at" in batch.column_names else [None] * n
        take, extra = [], {f.name: [] for f in PLAN_FIELDS}
        extra["category"] = []
        for i, (pid, cat, url, stamp) in enumerate(zip(batch.column("product_id").to_pylist(),
                                                       batch.column("category").to_pylist(),
                                                       batch.column("image_url").to_pylist(), stamps)):
            key, row = content_key(url, stamp), self.rows
            self.rows += 1
            objects = self.known.get(pid)
            if pid is not None and pid in self.seen:
                plans = [(DUPLICATE, None, cat, f"product_id seen earlier in this catalog (kept {self.seen[pid]})")]
            elif self.reusable(objects, key, cat):
                plans = [(REUSE, (o["file"], o["row"]), o["category"], None) for o in objects]
            else:
                plans = [(NEW if objects is None else CHANGED, None, cat, None)]
            if pid is not None:
                self.seen.setdefault(pid, url)
            for number, (action, source, category, detail) in enumerate(plans):
                take.append(i)
                file, position = source or (None, None)
                for name, value in (("content_key", key), ("action", action), ("file", file), ("row", position),
                                    ("catalog_category", cat), ("catalog_row", row), ("object", number),
                                    ("objects", len(plans)), ("note", detail), ("category", category)):
                    extra[name].append(value)
        out = batch.take(pa.array(take, pa.int64())).drop_columns(["category"])
        for field in [pa.field("category", pa.string())] + PLAN_FIELDS:
            out = out.append_column(field, pa.array(extra[field.name], field.type))
        return out
