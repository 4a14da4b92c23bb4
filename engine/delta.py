"""``lookalike update``: a delta run over just the new or changed rows, published in minutes.

The rows (``source.path`` / ``source.query`` of the update, e.g. ``updated_at > @since``) go
through the same plan and stream as a daily run (engine.pipeline): rows whose stored feature is
still current are skipped, the others downloaded and embedded. Then, instead of building the
index again, a new index version is written that

- serves every shard of the published (base) version by reference, as they are;
- adds one small delta shard set per touched category (``"delta": g`` on each shard entry, in
  the new version's folder: engine.index.shard_prefix);
- carries the base's tombstones and masks each changed product's older vectors
  (engine/tombstones.py, ``before = g``);
- has a manifest delta (engine/manifest.py) so the next daily run plans against it.

It is published by moving LATEST with the same compare-and-swap as a run, so the service swaps
to it whole (one consistent version per answer). The daily run merges: a category with masked
vectors or deltas past ``index.rebuild_fraction`` of its base is rebuilt from the state; one
whose delta only adds products and stays under it keeps base + delta shards (``to_rebuild``).
"""
from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine import attributes as attrs_module
from engine import index, manifest, tombstones
from engine.config import Config
from engine.storage import Storage

log = logging.getLogger(__name__)


def next_generation(base: dict) -> int:
    return 1 + max((index.generation(e) for entry in base["categories"].values() for e in entry["shards"]), default=0)


def delta_counts(manifest_: dict) -> dict[str, tuple[int, int]]:
    """category -> (items in base shards, items in delta shards)."""
    out = {}
    for c, entry in manifest_["categories"].items():
        base = sum(e["count"] for e in entry["shards"] if not index.generation(e))
        out[c] = (base, entry["count"] - base)
    return out


def to_rebuild(storage: Storage, manifest_: dict, fraction: float) -> set[str]:
    """Categories of a published version the daily run must rebuild: those holding tombstoned
    vectors (deleted or superseded: only a rebuild drops them) and those whose delta shards pass
    ``fraction`` of their base items. Others keep their shards, deltas included."""
    dead = tombstones.read(storage, manifest_["model_version"], manifest_["index_version"])
    counts = delta_counts(manifest_)
    out = {c for c, (base, extra) in counts.items() if extra > fraction * max(base, 1)}
    if dead.num_rows:
        ids = dead.column("product_id")
        state = manifest.read_state(storage, manifest_["model_version"], manifest_["index_version"], columns=[])
        hit = state.filter(pc.is_in(state.column("product_id"), value_set=ids))
        out |= set(pc.unique(hit.column("category")).to_pylist())
        out |= {c for c, (base, extra) in counts.items() if extra}  # superseded rows sit in base
    return out


def pending(storage: Storage, manifest_: dict | None, fraction: float) -> bool:
    """Whether a daily run has deltas or tombstones to fold even when the catalog is unchanged."""
    return bool(manifest_) and bool(to_rebuild(storage, manifest_, fraction))


def build_delta(cfg: Config, storage: Storage, version: str, base: dict, before: pa.Table, fresh: pa.Table,
                attributes: list | None = None, display=None) -> dict:
    """Write ``version``: delta shards of ``fresh`` (STATE rows), the base's shards by reference,
    tombstones, the manifest delta and last the index manifest. Nothing is published here.
    ``before``: the base's state, product_id, category and content_key are enough.
    ``attributes``: the update catalog's filter columns (engine.attributes), for the delta shards;
    ``display``: engine.display.Sources of the update's catalog: the display files of the categories
    that gain delta shards are rewritten (the base's rows from the base's files), the others kept."""
    import ray

    mv = base["model_version"]
    gen = next_generation(base)
    prefix = index.version_prefix(mv, version)
    files: dict[str, list] = {}
    table = fresh.sort_by([("category", "ascending"), ("file", "ascending"), ("row", "ascending")])
    for category in pc.unique(table.column("category")).to_pylist():
        part = table.filter(pc.equal(table.column("category"), category))
        f = part.column("file").to_numpy(zero_copy_only=False)
        rows = part.column("row").to_numpy()
        cuts = np.flatnonzero(f[1:] != f[:-1]) + 1
        files[category] = [(storage.path(str(f[a])), rows[a:b]) for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(f)])]
    specs = index.plan(storage, files, cfg.index)
    for s in specs:  # numbered after every shard the category already has
        old = base["categories"].get(s["category"], {}).get("shards", [])
        s["shard"] += 1 + max((e["shard"] for e in old), default=-1)
        if s["dim"] != base["dim"]:
            raise ValueError(f"update vectors have dim {s['dim']}, the index {base['dim']}")
    task = ray.remote(index.build_shard)
    n_jobs = max(1, int(cfg.index.cpus_per_shard))
    entries = ray.get([task.options(num_cpus=cfg.index.cpus_per_shard, memory=s["memory"],
                                    name=f"delta:{s['category']}/{index.shard_name(s['shard'])}")
                       .remote(storage, prefix, s, cfg.index.seed, n_jobs) for s in specs])
    _check(storage, prefix, specs, entries, base["dim"])
    if cfg.index.filter_columns and attributes is not None:
        by_category: dict[str, dict] = {}
        for spec, e in zip(specs, entries):
            by_category.setdefault(spec["category"], {"version": version, "shards": []})["shards"].append(e)
        attrs_module.write(storage, prefix, by_category, attributes, cfg.index.filter_columns)
        for spec, e in zip(specs, entries):
            e.update(next(s for s in by_category[spec["category"]]["shards"] if s["shard"] == e["shard"]))
    versions = {"": cfg.embed.model_version, **{c: m.model_version for c, m in cfg.embed.categories.items()}}
    categories = {}
    for name, entry in base["categories"].items():
        categories[name] = {**entry, "version": index.owner(base, name), "shards": list(entry["shards"])}
    for spec, e in zip(specs, entries):
        e.update(version=version, delta=gen)
        cat = categories.setdefault(spec["category"], {
            "category": spec["category"], "count": 0, "dim": spec["dim"], "params": spec["params"],
            "model_version": versions.get(spec["category"], versions[""]), "version": version, "shards": []})
        cat["shards"].append(e)
        cat["count"] += e["count"]
    ids = pc.unique(fresh.column("product_id"))
    updated = pc.is_in(before.column("product_id"), value_set=ids)  # the base rows this update replaces
    grown = {spec["category"] for spec in specs}
    if display is not None and grown:
        fresh_keys = fresh.select(["product_id", "content_key"])
        kept = before.filter(pc.invert(updated)).select(fresh_keys.column_names).cast(fresh_keys.schema)
        keys = pa.concat_tables([fresh_keys, kept])
        touched = {c: categories[c] for c in grown}
        display.complete(keys, base, mv, version).write(storage, prefix, touched)
        categories.update(touched)
    # tombstones: the base's, less any the update brings back, plus the changed products' old vectors
    inherited = tombstones.read(storage, mv, base["index_version"])
    inherited = inherited.filter(pc.invert(pc.is_in(inherited.column("product_id"), value_set=ids)))
    replaced = before.filter(updated)
    old = pc.unique(replaced.column("product_id"))
    superseded = pa.table({"product_id": old, "before": pa.array([gen] * len(old), pa.int32()),
                           "content_key": pa.nulls(len(old), pa.string())})
    dead = pa.concat_tables([inherited.cast(tombstones.SCHEMA), superseded.cast(tombstones.SCHEMA)])
    if dead.num_rows:
        tombstones.write(storage, mv, version, dead)
    removed = replaced.select(manifest.KEY)
    state = manifest.next_state(storage, mv, base["index_version"], fresh, removed)  # one lean copy
    meta = manifest.write(storage, mv, version, base["index_version"], fresh, removed, state=state)
    out = {"format": index.FORMAT, "model_version": mv, "index_version": version, "run_id": version,
           "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "dim": base["dim"],
           "params": base["params"], "count": sum(c["count"] for c in categories.values()),
           "categories": dict(sorted(categories.items())),
           "build": {"shards": len(specs), "shards_reused": sum(len(e["shards"]) for e in base["categories"].values()),
                     "reused": sorted(base["categories"]), "delta": gen},
           "delta": {"base": base["index_version"], "generation": gen, "rows": fresh.num_rows,
                     "superseded": len(old), "tombstones": dead.num_rows}}
    storage.write_json(out, *prefix, index.MANIFEST)
    return {"base": base["index_version"], "generation": gen, "rows": fresh.num_rows, "shards": len(specs),
            "superseded": len(old), "tombstones": dead.num_rows, "manifest_rows": meta["rows"],
            "categories": {s["category"]: s["count"] for s in specs}}


def _check(storage: Storage, prefix: tuple, specs: list, entries: list, dim: int) -> None:
    """Every delta shard, queried with each of its items' vectors, finds that item: never publish a broken one."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for spec, e in zip(specs, entries):
            shard = index.Shard.load(storage, prefix, spec["category"], e, dim, spec["params"], tmp)
            try:
                missed = [i for i in range(len(shard))
                          if shard.ids[i].as_py() not in shard.search(shard.vector(i).tolist(), 10)[0]]
            finally:
                shard.close()
            if missed:
                raise RuntimeError(f"delta shard {spec['category']}/{e['shard']}: {len(missed)} of {len(shard)} "
                                   f"items not found by their own vector; not published")
