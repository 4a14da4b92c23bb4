"""Plan a run against what is already known, so a daily run costs in proportion to the change.

Every catalog row gets a content key: ``sha1(image_url, updated_at)``. It is decided from the
catalog alone (no extra request per image); a picture replaced behind the same URL without a
new ``updated_at`` is not seen, which ``--full`` (``plan.full``) covers.

A row is ``new`` (product never indexed), ``changed`` (its key differs) or ``reuse`` (same key
and category as stored features). Stored features are those named by the product manifest of
the published index version, plus committed shards of later runs that never published (a
crashed or refused run): that is what makes a re-run resume instead of recompute.
"""
from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.compute as pc

from engine import features, publish
from engine.storage import Storage

NEW, CHANGED, REUSE = "new", "changed", "reuse"
PLAN_FIELDS = [pa.field("content_key", pa.string()), pa.field("action", pa.string()),
               pa.field("source_run", pa.string())]
STATE_COLUMNS = ["product_id", "content_key", "category", "source_run"]


def content_key(image_url, updated_at) -> str:
    raw = f"{image_url or ''}\x00{'' if updated_at is None else updated_at}"
    return hashlib.sha1(raw.encode()).hexdigest()[:20]


def known_features(storage: Storage, model_version: str, current_run: str) -> pa.Table:
    """(product_id, content_key, category, source_run) of every reusable stored feature.

    Later sources win: orphan runs newer than the published manifest are read after it.
    """
    tables = []
    published = publish.latest(storage, model_version)
    manifest = features.read_manifest(storage, model_version, published) if published else None
    if manifest is not None:
        tables.append(manifest.select(STATE_COLUMNS))
    since = manifest_run(manifest) if manifest is not None else ""
    for run_id in features.runs(storage, model_version):
        if run_id > since and run_id != current_run:
            shard_rows = features.read_run_keys(storage, model_version, run_id)
            if shard_rows.num_rows:
                tables.append(shard_rows.select(STATE_COLUMNS))
    if not tables:
        return pa.table({c: pa.array([], pa.string()) for c in STATE_COLUMNS})
    return pa.concat_tables([t.cast(pa.schema([(c, pa.string()) for c in STATE_COLUMNS])) for t in tables])


def manifest_run(manifest: pa.Table) -> str:
    """The newest run whose features a manifest uses: runs up to it are accounted for."""
    runs = manifest.column("source_run")
    return pc.max(runs).as_py() or "" if len(runs) else ""


class PlanStage:
    """Ray Data actor: adds content_key, action and source_run to each catalog row."""

    def __init__(self, state: list, full: bool = False):
        import ray

        table = ray.get(state[0]) if isinstance(state[0], ray.ObjectRef) else state[0]
        self.full = full
        self.known = {pid: (key, cat, run) for pid, key, cat, run in zip(
            *(table.column(c).to_pylist() for c in STATE_COLUMNS))}

    def __call__(self, batch: pa.Table) -> pa.Table:
        from engine.catalog import normalise

        batch = normalise(batch)
        urls = batch.column("image_url").to_pylist()
        stamps = batch.column("updated_at").to_pylist() if "updated_at" in batch.column_names else [None] * len(urls)
        keys, actions, sources = [], [], []
        for pid, cat, url, stamp in zip(batch.column("product_id").to_pylist(),
                                        batch.column("category").to_pylist(), urls, stamps):
            key = content_key(url, stamp)
            old = self.known.get(pid)
            if old is None:
                action, source = NEW, None
            elif old[0] == key and old[1] == cat and not self.full:
                action, source = REUSE, old[2]
            else:
                action, source = CHANGED, None
            keys.append(key)
            actions.append(action)
            sources.append(source)
        for field, values in zip(PLAN_FIELDS, (keys, actions, sources)):
            batch = batch.append_column(field, pa.array(values, field.type))
        return batch
