"""Annoy indexes per category, in shards built in parallel as Ray tasks; loaded (mmap) for search.

An index version is a folder ``indexes/<model_version>/<index_version>/`` holding, per category,
``<category>/shard-NNN.ann`` (Annoy, at most ``index.max_shard_size`` items) with its id map
``shard-NNN.ids.parquet`` (Annoy item id -> product_id) beside it, and ``manifest.json``: counts,
dims, model version, build parameters per category, sizes and sha256 of every file. A version is
immutable once its manifest exists (the manifest is written last); the LATEST pointer is the only
thing that moves (engine.publish).

Each shard build is one Ray task whose ``memory`` request comes from the shard's size, so a cluster
runs as many builds at once as it has memory for, never more.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine import features
from engine.config import IndexConfig
from engine.storage import Storage, sha256

MANIFEST = "manifest.json"
FORMAT = 2
MIB = 1 << 20
# Bytes before the vector in an Annoy node (annoylib.h: n_descendants, children[2], and for
# euclidean/dot one more float). Item i is node i, so item vectors can be read straight off the file.
NODE_HEADER = {"angular": 12, "euclidean": 16, "dot": 16}
BUILD_HEADROOM = 256 * MIB
PARTIAL = ".part"
PARTIAL_GRACE_S = 3600.0
# A restricted search scans its rows exactly below this many rows or this share of the shard.
EXACT_SCAN_ROWS = 5_000
EXACT_SCAN_FRACTION = 0.02
SEARCH_K_PER_ITEM = 20  # Annoy nodes looked at per candidate asked for, when over-fetching for a mask
log = logging.getLogger(__name__)


def version_prefix(model_version: str, index_version: str) -> tuple[str, str, str]:
    return ("indexes", model_version, index_version)


def score_from_distance(distance, metric: str):
    """Annoy distances -> a similarity where higher is better (cosine for angular)."""
    d = np.asarray(distance, dtype=np.float64)
    if metric == "angular":
        return 1.0 - d * d / 2.0
    if metric == "dot":
        return d
    return -d


def shard_name(number: int) -> str:
    return f"shard-{number:03d}"


# ---------------------------------------------------------------- planning


def node_bytes(dim: int, metric: str) -> int:
    return NODE_HEADER[metric] + 4 * dim


def index_bytes(count: int, dim: int, n_trees: int, metric: str) -> int:
    """Expected size of an Annoy file: one node per item, and per tree about 2.9/K nodes per item
    (leaves hold up to K = dim + 2 ids), i.e. roughly 12 bytes per item per tree whatever the dim."""
    node = node_bytes(dim, metric)
    per_tree = math.ceil(count * 2.9 / max(1, (node - 4) // 4)) + 1
    return node * (count + n_trees * per_tree)


def shard_memory_bytes(count: int, dim: int, n_trees: int, metric: str) -> int:
    """Ray memory request of one shard build: its vectors as read (arrow, shared with numpy), the
    id strings, Annoy's in-memory nodes (grown by realloc: up to 1.5x the final size) and headroom."""
    vectors = count * dim * 4
    ids = count * 64
    return int(vectors + ids + 1.5 * index_bytes(count, dim, n_trees, metric) + BUILD_HEADROOM)


def _vector_dim(schema: pa.Schema, path: str) -> int:
    field = schema.field("vector") if "vector" in schema.names else None
    if field is None or not pa.types.is_fixed_size_list(field.type):
        raise ValueError(f"{path}: column 'vector' must be a fixed-size list of float32, got "
                         f"{field.type if field is not None else 'no such column'}")
    return field.type.list_size


def plan(storage: Storage, files_by_category: dict[str, list[str]], cfg: IndexConfig) -> list[dict]:
    """Split each category into shards of at most ``cfg.max_shard_size`` items, as even as possible.

    A shard is a list of (file, first, end, positions) slices of the feature files, so each build
    task reads only its own rows: rows ``first:end`` of the file, or of ``positions`` (the file's
    rows in this feature set) when given. Row counts come from parquet footers.
    """
    shards = []
    for category in sorted(files_by_category):
        rows, dims, picks = [], set(), {}
        for path, positions in files_by_category[category]:
            meta = pq.ParquetFile(path, filesystem=storage.fs).metadata
            dims.add(_vector_dim(meta.schema.to_arrow_schema(), path))
            rows.append((path, meta.num_rows if positions is None else len(positions)))
            picks[path] = positions
        total = sum(n for _, n in rows)
        if total == 0:
            continue
        if len(dims) != 1:
            raise ValueError(f"category {category}: feature files disagree on the vector dim: {sorted(dims)}")
        dim = dims.pop()
        params = cfg.params(category)
        n_shards = math.ceil(total / cfg.max_shard_size)
        bounds = [round(i * total / n_shards) for i in range(n_shards + 1)]
        for number in range(n_shards):
            lo, hi = bounds[number], bounds[number + 1]
            slices, offset = [], 0
            for path, n in rows:
                start, stop = max(lo - offset, 0), min(hi - offset, n)
                if start < stop:
                    pick = picks[path]
                    slices.append((path, start, stop, None if pick is None else pick[start:stop]))
                offset += n
            count = hi - lo
            shards.append({"category": category, "shard": number, "slices": slices, "count": count,
                           "dim": dim, "params": params,
                           "memory": shard_memory_bytes(count, dim, params["n_trees"], params["metric"])})
    return shards


def _largest_node_memory() -> float:
    import ray

    return max((n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0)


# ---------------------------------------------------------------- building


def read_rows(storage: Storage, slices: list[tuple]) -> pa.Table:
    """The rows of the given (file, start, stop, positions) slices, reading only the row groups they touch."""
    parts = []
    for path, start, stop, positions in slices:
        lo, hi = (start, stop) if positions is None else (positions[0], positions[-1] + 1)
        pf = pq.ParquetFile(path, filesystem=storage.fs)
        groups, first, offset = [], None, 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if offset < hi and offset + n > lo:
                groups.append(g)
                first = offset if first is None else first
            offset += n
        extra = [c for c in ("category", "catalog_category") if c in pf.schema_arrow.names]
        table = pf.read_row_groups(groups, columns=["product_id", "vector"] + extra)
        if positions is None:
            parts.append(table.slice(lo - first, hi - lo))
        else:
            parts.append(table.take(pa.array(np.asarray(positions, np.int64) - first)))
    return pa.concat_tables(parts).combine_chunks()


def build_shard(root: str, prefix: tuple, spec: dict, seed: int, n_jobs: int) -> dict:
    """Ray task: build one shard from its feature slices, write it and its id map; returns its manifest entry."""
    from annoy import AnnoyIndex

    t0 = time.time()
    storage = Storage.of(root)
    table = read_rows(storage, spec["slices"])
    vecs = features.vectors(table)
    ids = table.column("product_id").cast(pa.string())
    own = pc.equal(table.column("category"), table.column("catalog_category")) \
        if "catalog_category" in table.column_names else pa.array([True] * len(ids))
    if ids.null_count:
        raise ValueError(f"{spec['category']}: {ids.null_count} feature rows have no product_id")
    params, dim = spec["params"], spec["dim"]
    index = AnnoyIndex(dim, params["metric"])
    index.set_seed(seed + spec["shard"])
    for i in range(len(vecs)):
        index.add_item(i, vecs[i])
    del table, vecs
    index.build(params["n_trees"], n_jobs=n_jobs)
    name = shard_name(spec["shard"])
    parts = prefix + (spec["category"],)
    entry = {"shard": spec["shard"], "index": f"{name}.ann", "ids": f"{name}.ids.parquet",
             "count": len(ids), "memory_request": spec["memory"]}
    with tempfile.TemporaryDirectory() as tmp:
        local = storage.is_local
        folder = storage.path(*parts) if local else tmp
        os.makedirs(folder, exist_ok=True)
        ann, idmap = os.path.join(folder, entry["index"]), os.path.join(folder, entry["ids"])
        index.save(ann + ".tmp")
        index.unload()
        os.replace(ann + ".tmp", ann)
        # own: the product's object of its catalog category (what /similar/{product_id} starts from)
        pq.write_table(pa.table({"annoy_id": pa.array(np.arange(len(ids)), pa.int64()), "product_id": ids,
                                 "own": own}), idmap + ".tmp")
        os.replace(idmap + ".tmp", idmap)
        entry.update(bytes=os.path.getsize(ann), sha256=sha256(ann), ids_bytes=os.path.getsize(idmap),
                     ids_sha256=sha256(idmap))
        if not local:
            storage.put_file(ann, *parts, entry["index"])
            storage.put_file(idmap, *parts, entry["ids"])
    entry["build_s"] = round(time.time() - t0, 3)
    return entry


def build_from_files(root: str, model_version: str, index_version: str, files_by_category: dict[str, list],
                     cfg: IndexConfig, run_id: str | None = None, versions: dict[str, str] | None = None,
                     reused: dict[str, dict] | None = None, attributes: list | None = None,
                     display=None) -> dict:
    """Build every shard of every category as parallel Ray tasks, then write the manifest (last).
    ``versions``: category -> the model version its features come from (default: ``model_version``);
    ``reused``: category -> an earlier version's entry whose shards this version serves as they are;
    ``attributes``: refs of the catalog's filter columns (engine.attributes), written for every shard;
    ``display``: engine.display.Sources, a display file written for every category."""
    import ray

    t0 = time.time()
    storage = Storage.of(root)
    prefix = version_prefix(model_version, index_version)
    if storage.exists(*prefix, MANIFEST):
        raise RuntimeError(f"{storage.uri(*prefix)} already exists: index versions are immutable")
    specs = plan(storage, files_by_category, cfg)
    reused = reused or {}
    if not specs and not reused:
        raise ValueError(f"no feature rows to index for model {model_version}")
    dims = {s["dim"] for s in specs} | {e["dim"] for e in reused.values()}
    if len(dims) != 1:
        raise ValueError(f"categories have different vector dims {sorted(dims)}; one index version needs one dim")
    biggest, room = max([s["memory"] for s in specs], default=0), _largest_node_memory() if specs else 0
    if specs and biggest > room:
        raise RuntimeError(f"a shard build needs {biggest / 2**30:.1f} GiB of memory and the largest Ray node "
                           f"offers {room / 2**30:.1f} GiB; lower index.max_shard_size")
    n_jobs = max(1, int(cfg.cpus_per_shard))
    task = ray.remote(build_shard)
    refs = [task.options(num_cpus=cfg.cpus_per_shard, memory=s["memory"],
                         name=f"index:{s['category']}/{shard_name(s['shard'])}")
            .remote(root, prefix, s, cfg.seed, n_jobs) for s in specs]
    entries = ray.get(refs) if refs else []
    categories: dict[str, dict] = {}
    for spec, entry in zip(specs, entries):
        cat = categories.setdefault(spec["category"], {
            "category": spec["category"], "count": 0, "dim": spec["dim"], "params": spec["params"],
            "model_version": (versions or {}).get(spec["category"], model_version), "shards": []})
        cat["count"] += entry["count"]
        cat["shards"].append(entry)
    categories.update({c: dict(e) for c, e in reused.items()})
    categories = dict(sorted(categories.items()))
    if cfg.filter_columns and attributes is not None:  # None (compaction): reused entries keep theirs
        from engine import attributes as attrs

        attrs.write(root, prefix, categories, attributes or [], cfg.filter_columns)
    if display is not None:  # None (compaction, synthetic stores): reused entries keep theirs
        display.write(root, prefix, categories)
    manifest = {
        "format": FORMAT, "model_version": model_version, "index_version": index_version, "run_id": run_id,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "dim": dims.pop(),
        "params": {"metric": cfg.metric, "n_trees": cfg.n_trees, "search_k": cfg.search_k, "seed": cfg.seed,
                   "max_shard_size": cfg.max_shard_size},
        "count": sum(c["count"] for c in categories.values()),
        "categories": categories,
        "build": {"seconds": round(time.time() - t0, 3), "shards": len(specs),
                  "shards_reused": sum(len(e["shards"]) for e in reused.values()), "reused": sorted(reused),
                  "shard_seconds": round(sum(e["build_s"] for e in entries), 3)},
    }
    storage.write_json(manifest, *prefix, MANIFEST)
    return manifest


def build(root: str, model_version: str, run_id: str, index_version: str, cfg: IndexConfig) -> dict:
    """Build an index version from every feature file of one run (synthetic stores, benchmarks)."""
    storage = Storage.of(root)
    files = {cat: [(storage.path(f), None) for f in features.run_files(storage, model_version, run_id, cat)]
             for cat in features.run_categories(storage, model_version, run_id)}
    return build_from_files(root, model_version, index_version, files, cfg, run_id=run_id)


def _reusable(entry: dict | None, count: int, params: dict, model_version: str) -> bool:
    return entry is not None and entry["count"] == count and entry.get("params") == params \
        and entry.get("model_version") == model_version


def build_version(root, model_version: str, index_version: str, state: pa.Table, cfg: IndexConfig,
                  base: dict | None = None, changed: set | None = None, attributes: list | None = None,
                  display=None) -> dict:
    """Build ``index_version`` from a manifest state (engine/manifest.py): each category's rows
    are read straight from their file and row position. A category not in ``changed`` whose
    entry in ``base`` (the previous version's manifest) still matches keeps that version's shards
    by reference: no copy, no rebuild. ``display``: engine.display.Sources (catalog side), completed
    here with the state's content keys and ``base``'s display files."""
    storage = Storage.of(root)
    if display is not None:
        display = display.complete(state, base, model_version, index_version)
    category_names, categories = _codes(state.column("category"))
    file_names, files = _codes(state.column("file"))
    rows = state.column("row").to_numpy()
    order = np.lexsort((rows, files, categories))  # by category, then file and row: each file read in order
    cats, files, rows = categories[order], files[order], rows[order]
    cuts = np.flatnonzero(cats[1:] != cats[:-1]) + 1 if len(cats) else np.array([], np.int64)
    model_versions = state.column("model_version")
    files_by_category, reused, versions = {}, {}, {}
    for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(cats)]) if len(cats) else ():
        category = category_names[cats[lo]]
        mvs = pc.unique(model_versions.take(pa.array(order[lo:hi])).cast(pa.string())).to_pylist()
        if len(mvs) != 1:
            raise ValueError(f"category {category} mixes features of model versions {sorted(mvs)}")
        versions[category] = mvs[0]
        old = (base or {}).get("categories", {}).get(category)
        if base is not None and category not in (changed or set()) and \
                _reusable(old, int(hi - lo), cfg.params(category), mvs[0]):
            reused[category] = {**old, "version": owner(base, category)}
            continue
        f, r = files[lo:hi], rows[lo:hi]
        fcuts = np.flatnonzero(f[1:] != f[:-1]) + 1
        files_by_category[category] = [(storage.path(file_names[f[a]]), r[a:b])
                                       for a, b in zip(np.r_[0, fcuts], np.r_[fcuts, len(f)])]
    return build_from_files(root, model_version, index_version, files_by_category, cfg, run_id=index_version,
                            versions=versions, reused=reused, attributes=attributes, display=display)


def _codes(column) -> tuple[list[str], np.ndarray]:
    """(sorted distinct values, each row's position among them) of a string or dictionary column:
    grouping millions of rows by a few hundred file names costs ints, not a string per row."""
    column = (column if pa.types.is_dictionary(column.type) else pc.dictionary_encode(column)).combine_chunks()
    names = column.dictionary.cast(pa.string()).to_pylist()
    order = sorted(range(len(names)), key=names.__getitem__)
    rank = np.empty(len(names), np.int64)
    rank[order] = np.arange(len(names))
    return [names[i] for i in order], rank[column.indices.to_numpy(zero_copy_only=False)]


# ---------------------------------------------------------------- loading and searching


class IndexLoadError(RuntimeError):
    pass


def owner(manifest: dict, category: str) -> str:
    """The version whose folder holds a category's shards: itself, or the earlier one it reuses."""
    return manifest["categories"][category].get("version") or manifest["index_version"]


def shard_prefix(manifest: dict, category: str, entry: dict | None = None) -> tuple[str, str, str]:
    """The folder of a category's shards; a shard entry naming its own ``version`` (a delta shard
    added by ``lookalike update``, engine/delta.py) lives in that version's folder."""
    own = (entry or {}).get("version")
    return version_prefix(manifest["model_version"], own or owner(manifest, category))


def generation(entry: dict) -> int:
    """A shard's delta generation: 0 for a base shard, g for the shards of the g-th update since."""
    return int(entry.get("delta", 0))


def category_params(manifest: dict, category: str) -> dict:
    return manifest["categories"][category].get("params") or manifest["params"]


def local_copy(storage: Storage, cache_dir: str, parts: tuple, sha: str | None = None) -> str:
    """A local path for a stored file: itself on local storage, else a copy in the cache (Annoy mmaps
    files). A copy is fetched under a unique temporary name (replicas on one node share the cache),
    checked against ``sha`` and fetched once more on a mismatch; a second mismatch refuses the file."""
    if storage.is_local:
        return storage.path(*parts)
    target = os.path.join(cache_dir, *parts)
    if os.path.exists(target) and (sha is None or sha256(target) == sha):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    for attempt in (1, 2):
        tmp = f"{target}.{uuid.uuid4().hex[:12]}{PARTIAL}"
        try:
            storage.get_file(tmp, *parts)
            if sha is None or sha256(tmp) == sha:
                os.replace(tmp, target)
                return target
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        log.warning("%s: checksum mismatch after copy %d of 2", "/".join(parts), attempt)
    raise IndexLoadError(f"{'/'.join(parts[-2:])}: checksum mismatch (corrupt file; fetched twice)")


def cached_files(manifest: dict) -> set[str]:
    """The cache paths (relative to the cache dir) of every file a version reads."""
    return {"/".join(shard_prefix(manifest, cat, e) + (cat, e[k])) for cat, entry in manifest["categories"].items()
            for e in entry["shards"] for k in ("index", "ids")} | {
        "/".join(attrs_parts(manifest["model_version"], cat, e)) for cat, entry in manifest["categories"].items()
        for e in entry["shards"] if e.get("attrs")} | {
        "/".join(version_prefix(manifest["model_version"], e["display"]["version"]) + (cat, e["display"]["file"]))
        for cat, e in manifest["categories"].items() if e.get("display")}  # engine.display


def attrs_parts(model_version: str, category: str, entry: dict) -> tuple:
    """Where a shard's filter columns are: the version that wrote them (engine.attributes)."""
    return version_prefix(model_version, entry["attrs_version"]) + (category, entry["attrs"])


def read_attrs(storage: Storage, model_version: str, category: str, entry: dict, cache_dir: str,
               verify: bool = True) -> pa.Table | None:
    """A shard's filter columns in Annoy order (None when the version has none)."""
    if not entry.get("attrs"):
        return None
    table = _side_table(storage, cache_dir, attrs_parts(model_version, category, entry), entry["attrs_sha256"],
                        verify, "filter columns")
    if table.num_rows != entry["count"]:
        raise IndexLoadError(f"{category}/{entry['attrs']}: {table.num_rows} rows, manifest says {entry['count']}")
    return table


def prune_cache(cache_dir: str, model_version: str, keep: list[dict]) -> int:
    """Delete cached files of ``model_version`` that none of ``keep`` (the served version and the one
    before) reads; a temporary copy is left alone while young (another replica may be writing it)."""
    wanted = set().union(*(cached_files(m) for m in keep)) if keep else set()
    top = os.path.join(cache_dir, "indexes", model_version)
    gone = 0
    for folder, dirs, names in os.walk(top, topdown=False):
        for name in names:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, cache_dir).replace(os.sep, "/")
            if rel in wanted:
                continue
            if name.endswith(PARTIAL) and time.time() - os.path.getmtime(path) < PARTIAL_GRACE_S:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                gone += 1
        if folder != top and not os.listdir(folder):
            with contextlib.suppress(OSError):
                os.rmdir(folder)
    return gone


def category_version(manifest: dict, category: str) -> str:
    """The embedding model version of a category's vectors (one index version may hold several)."""
    return manifest["categories"][category].get("model_version") or manifest["model_version"]


def model_mismatch(manifest: dict, embed_cfg) -> dict[str, tuple[str, str]]:
    """Categories whose vectors came from another model version than ``embed_cfg`` embeds queries
    with: category -> (index's, config's). Such an index must not be served with that config."""
    return {c: (category_version(manifest, c), embed_cfg.version_of(c)) for c in manifest["categories"]
            if category_version(manifest, c) != embed_cfg.version_of(c)}


def _side_table(storage: Storage, cache_dir: str, parts: tuple, sha: str, verify: bool, what: str) -> pa.Table:
    """A shard's side file (id map, filter columns): fetched, checksummed and read, or IndexLoadError."""
    name = "/".join(parts[-2:])
    path = local_copy(storage, cache_dir, parts, sha if verify else None)
    if verify and storage.is_local and sha256(path) != sha:
        raise IndexLoadError(f"{name}: checksum mismatch (corrupt or truncated file)")
    try:
        return pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable side file is a load failure
        raise IndexLoadError(f"{name}: unreadable {what}: {exc}") from None


def read_ids(storage: Storage, prefix: tuple, category: str, entry: dict, cache_dir: str,
             verify: bool = True) -> tuple[pa.Array, pa.Array]:
    """A shard's (product ids, own flags); id maps written before objects have no flags: all own."""
    table = _side_table(storage, cache_dir, prefix + (category, entry["ids"]), entry["ids_sha256"], verify, "id map")
    if "product_id" not in table.column_names:
        raise IndexLoadError(f"{category}/{entry['ids']}: unreadable id map: no product_id column")
    ids = table.column("product_id").combine_chunks()
    if len(ids) != entry["count"]:
        raise IndexLoadError(f"{category}/{entry['ids']}: {len(ids)} ids, manifest says {entry['count']}")
    flags = table.column("own").combine_chunks() if "own" in table.column_names else pa.array([True] * len(ids))
    return ids.cast(pa.string()), flags


class Shard:
    """One Annoy file, mmap'd, and its id map."""

    def __init__(self, category: str, entry: dict, dim: int, params: dict, path: str, ids: pa.Array,
                 own: pa.Array):
        """``own``: per item, whether this category is the product's catalog category."""
        from annoy import AnnoyIndex

        self.category, self.number, self.entry, self.dim, self.path = category, entry["shard"], entry, dim, path
        self.metric, self.search_k = params["metric"], params.get("search_k", -1)
        self.ids, self.own = ids, own
        self.attrs: pa.Table | None = None  # filter columns in Annoy order (engine.attributes)
        self.annoy = AnnoyIndex(dim, self.metric)
        try:
            self.annoy.load(path)
        except OSError as exc:
            raise IndexLoadError(f"{category}/{entry['index']}: cannot load: {exc}") from None
        if self.annoy.get_n_items() != len(ids):
            raise IndexLoadError(f"{category}/{entry['index']}: {self.annoy.get_n_items()} items in the index, "
                                 f"{len(ids)} in its id map")

    @classmethod
    def load(cls, storage: Storage, prefix: tuple, category: str, entry: dict, dim: int, params: dict,
             cache_dir: str, verify: bool = True) -> "Shard":
        path = local_copy(storage, cache_dir, prefix + (category, entry["index"]), entry["sha256"] if verify else None)
        if verify and storage.is_local:
            size = os.path.getsize(path)
            if "bytes" in entry and size != entry["bytes"]:
                raise IndexLoadError(f"{category}/{entry['index']}: {size} bytes, manifest says {entry['bytes']} "
                                     f"(truncated or replaced file)")
            if sha256(path) != entry["sha256"]:
                raise IndexLoadError(f"{category}/{entry['index']}: checksum mismatch (corrupt file)")
        shard = cls(category, entry, dim, params, path, *read_ids(storage, prefix, category, entry, cache_dir, verify))
        shard.attrs = read_attrs(storage, prefix[1], category, entry, cache_dir, verify)
        return shard

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, vector: list[float], n: int, search_k: int | None = None,
               keep: np.ndarray | None = None) -> tuple[list[str], np.ndarray]:
        """Top-n (product_ids, scores), best first. Annoy releases the GIL: call from many threads.

        ``keep`` (a bool per item, e.g. a filter's matches minus tombstones) restricts the answer:
        Annoy is asked for more candidates until n pass or the shard is exhausted, and a selective
        mask is answered by an exact scan of its rows, so it still gets the true neighbours.
        """
        sk = self.search_k if search_k is None else search_k
        if keep is None:
            return self._nns(vector, n, sk)
        eligible = int(np.count_nonzero(keep))
        if eligible == 0 or n <= 0:
            return [], np.zeros(0)
        if eligible <= EXACT_SCAN_ROWS or eligible < EXACT_SCAN_FRACTION * len(self):
            return self.exact(vector, n, np.flatnonzero(keep))
        fetch = min(len(self), math.ceil(n * len(self) / eligible * 1.5) + n)
        while True:
            k_nodes = -1 if sk == -1 else max(sk, fetch * SEARCH_K_PER_ITEM)
            items, dists = self.annoy.get_nns_by_vector(vector, fetch, search_k=k_nodes, include_distances=True)
            items, dists = np.asarray(items, np.int64), np.asarray(dists)
            ok = keep[items] if len(items) else np.zeros(0, bool)
            if int(ok.sum()) >= n or fetch >= len(self) or len(items) < fetch:
                break
            fetch = min(len(self), fetch * 4)
        items, dists = items[ok][:n], dists[ok][:n]
        if len(items) < min(n, eligible):
            return self.exact(vector, n, np.flatnonzero(keep))
        return self.ids.take(pa.array(items)).to_pylist(), score_from_distance(dists, self.metric)

    def _nns(self, vector, n: int, search_k: int) -> tuple[list[str], np.ndarray]:
        items, dists = self.annoy.get_nns_by_vector(vector, n, search_k=search_k, include_distances=True)
        ids = self.ids.take(pa.array(items, pa.int64())).to_pylist() if items else []
        return ids, score_from_distance(dists, self.metric)

    def exact(self, vector, n: int, positions: np.ndarray) -> tuple[list[str], np.ndarray]:
        """Exact top-n among ``positions`` (brute force over the mmap'd vectors), in Annoy's scores."""
        q = np.asarray(vector, np.float32)
        rows = np.asarray(self.item_vectors()[positions], np.float32)
        if self.metric == "angular":
            norms = np.linalg.norm(rows, axis=1) * max(float(np.linalg.norm(q)), 1e-12)
            scores = rows @ q / np.maximum(norms, 1e-12)
        elif self.metric == "dot":
            scores = rows @ q
        else:
            scores = -np.linalg.norm(rows - q, axis=1)
        top = np.argsort(-scores, kind="stable")[:n]
        return self.ids.take(pa.array(positions[top])).to_pylist(), scores[top].astype(np.float64)

    def vector(self, position: int) -> np.ndarray:
        return np.asarray(self.annoy.get_item_vector(position), np.float32)

    def item_vectors(self) -> np.ndarray:
        """All item vectors as a read-only (count, dim) view of the mmap'd file, no copy.

        Annoy stores item i as node i; checked against Annoy's own accessor on a few items.
        """
        node = node_bytes(self.dim, self.metric) // 4
        n = len(self)
        raw = np.memmap(self.path, dtype=np.float32, mode="r", shape=(n * node,))
        view = raw.reshape(n, node)[:, NODE_HEADER[self.metric] // 4:]
        for i in {0, n // 2, n - 1} if n else ():
            if not np.array_equal(view[i], self.vector(i)):
                return np.stack([self.vector(i) for i in range(n)])
        return view

    def close(self) -> None:
        self.annoy.unload()


def merge(hit_lists, k: int, exclude: str | None = None) -> list[dict]:
    """Per-shard (category, ids, scores) -> one top-k list, best first."""
    hits = [(-float(s), pid, cat) for cat, ids, scores in hit_lists for pid, s in zip(ids, scores) if pid != exclude]
    hits.sort(key=lambda h: h[0])  # by the exact score: rounding first would turn near-ties into ties
    return [{"product_id": pid, "category": cat, "score": round(-s, 6)} for s, pid, cat in hits[:k]]


@dataclass(frozen=True)
class Location:
    category: str
    shard: int
    position: int


class Directory:
    """product_id -> where it is (category, shard, position) in one index version.

    Sorted variable-width Arrow binary keys and parallel integer arrays: a few tens of MB for
    millions of products, where a dict of Python strings would take hundreds, and one long id costs
    only its own bytes. A product may sit in several categories (one per detected object), never
    twice in one; its own category's entry comes first.
    """

    def __init__(self, parts: list[tuple[str, int, pa.Array, pa.Array]]):
        """``parts``: (category, shard, ids, own flags) per shard."""
        import pyarrow.compute as pc

        self.category_names = sorted({p[0] for p in parts})
        code = {c: i for i, c in enumerate(self.category_names)}
        keys = pa.concat_arrays([ids.cast(pa.large_binary()) for _, _, ids, _ in parts]) if parts \
            else pa.array([], pa.large_binary())
        cats = np.concatenate([np.full(len(ids), code[c], np.int32) for c, _, ids, _ in parts]) if parts else np.zeros(0, np.int32)
        shards = np.concatenate([np.full(len(ids), s, np.int32) for _, s, ids, _ in parts]) if parts else np.zeros(0, np.int32)
        pos = np.concatenate([np.arange(len(ids), dtype=np.int64) for _, _, ids, _ in parts]) if parts else np.zeros(0, np.int64)
        own = np.concatenate([np.asarray(o.to_numpy(zero_copy_only=False), bool) for *_, o in parts]) \
            if parts else np.zeros(0, bool)
        order = pc.sort_indices(pa.table({"k": keys, "c": cats}), sort_keys=[("k", "ascending"), ("c", "ascending")])
        order_np = order.to_numpy()
        self.keys = keys.take(order)
        self.cats, self.shards, self.positions = cats[order_np], shards[order_np], pos[order_np]
        self.own = own[order_np]

    @classmethod
    def load(cls, storage: Storage, manifest: dict, cache_dir: str, verify: bool = True) -> "Directory":
        return cls([(cat, e["shard"], *read_ids(storage, shard_prefix(manifest, cat, e), cat, e, cache_dir, verify))
                    for cat, entry in manifest["categories"].items() for e in entry["shards"]])

    def __len__(self) -> int:
        return len(self.keys)

    def _bound(self, key: bytes, right: bool) -> int:
        lo, hi = 0, len(self.keys)
        while lo < hi:
            mid = (lo + hi) // 2
            k = self.keys[mid].as_py()
            if k < key or (right and k == key):
                lo = mid + 1
            else:
                hi = mid
        return lo

    def lookup(self, product_id: str) -> list[Location]:
        key = product_id.encode("utf-8", "surrogatepass")
        if not key:
            return []
        lo, hi = self._bound(key, False), self._bound(key, True)
        found = sorted(range(lo, hi), key=lambda i: not self.own[i])
        return [Location(self.category_names[self.cats[i]], int(self.shards[i]), int(self.positions[i]))
                for i in found]

    def duplicates(self) -> dict[str, int]:
        """Per category, how many product_ids appear more than once in it."""
        import pyarrow.compute as pc

        n = len(self.keys)
        if n < 2:
            return {}
        same = pc.equal(self.keys.slice(1), self.keys.slice(0, n - 1)).to_numpy(zero_copy_only=False)
        same = same & (self.cats[1:] == self.cats[:-1])
        out: dict[str, int] = {}
        for c in self.cats[1:][same]:
            out[self.category_names[c]] = out.get(self.category_names[c], 0) + 1
        return out


class LoadedIndex:
    """One index version (or the shards of it that ``select`` keeps), loaded and mmap'd."""

    def __init__(self, manifest: dict, shards: list[Shard]):
        self.manifest = manifest
        self.dim = manifest["dim"]
        self.shards = {(s.category, s.number): s for s in shards}
        self.categories: dict[str, list[Shard]] = {}
        for s in sorted(shards, key=lambda s: (s.category, s.number)):
            self.categories.setdefault(s.category, []).append(s)
        self._directory: Directory | None = None

    @property
    def version(self) -> str:
        return self.manifest["index_version"]

    @classmethod
    def load(cls, storage: Storage, model_version: str, index_version: str, cache_dir: str,
             verify: bool = True, select=None) -> "LoadedIndex":
        """Load every shard (or those where ``select(category, shard_number)``), checking sizes and checksums."""
        manifest = read_manifest(storage, model_version, index_version)
        return cls.from_manifest(storage, manifest, cache_dir, verify, select)

    @classmethod
    def from_manifest(cls, storage: Storage, manifest: dict, cache_dir: str, verify: bool = True,
                      select=None) -> "LoadedIndex":
        shards = []
        try:
            for name, entry in manifest["categories"].items():
                params = category_params(manifest, name)
                for e in entry["shards"]:
                    if select is None or select(name, e["shard"]):
                        shards.append(Shard.load(storage, shard_prefix(manifest, name, e), name, e, manifest["dim"], params, cache_dir, verify))
        except BaseException:
            for s in shards:
                s.close()
            raise
        return cls(manifest, shards)

    def close(self) -> None:
        for s in self.shards.values():
            s.close()

    def counts(self) -> dict[str, int]:
        return {name: sum(len(s) for s in shards) for name, shards in self.categories.items()}

    @property
    def directory(self) -> Directory:
        if self._directory is None:
            self._directory = Directory([(s.category, s.number, s.ids, s.own) for s in self.shards.values()])
        return self._directory

    def locate(self, product_id: str, categories: list[str] | None = None) -> Location | None:
        """Where a product is: in one of ``categories`` when given (the first found), else its first category."""
        found = self.directory.lookup(product_id)
        if categories:
            found = [loc for loc in found if loc.category in categories] or found
        return found[0] if found else None

    def vector(self, loc: Location) -> np.ndarray:
        return self.shards[(loc.category, loc.shard)].vector(loc.position)

    def search(self, vector, k: int, categories: list[str] | None = None, exclude: str | None = None) -> list[dict]:
        """Top-k over the given categories (all when None), every shard queried, merged by score."""
        vec = np.asarray(vector, np.float32).tolist()
        n = k + (1 if exclude is not None else 0)
        parts = [(s.category, *s.search(vec, n)) for name in (categories or list(self.categories))
                 for s in self.categories.get(name, [])]
        return merge(parts, k, exclude)

    def summary(self) -> dict:
        return summary(self.manifest)


def read_manifest(storage: Storage, model_version: str, index_version: str) -> dict:
    prefix = version_prefix(model_version, index_version)
    try:
        manifest = storage.read_json(*prefix, MANIFEST)
    except FileNotFoundError:
        raise IndexLoadError(f"{storage.uri(*prefix)}: no {MANIFEST}") from None
    except ValueError as exc:
        raise IndexLoadError(f"{storage.uri(*prefix, MANIFEST)}: not valid JSON: {exc}") from None
    missing = {"model_version", "index_version", "dim", "params", "categories"} - set(manifest)
    if missing:
        raise IndexLoadError(f"{storage.uri(*prefix, MANIFEST)}: missing {sorted(missing)}")
    if (manifest["model_version"], manifest["index_version"]) != (model_version, index_version):
        raise IndexLoadError(f"{storage.uri(*prefix, MANIFEST)}: describes {manifest['model_version']}/"
                             f"{manifest['index_version']}, not this folder")
    return manifest


def summary(manifest: dict) -> dict:
    return {"model_version": manifest["model_version"], "index_version": manifest["index_version"],
            "built_at": manifest["built_at"], "dim": manifest["dim"],
            "counts": {name: entry["count"] for name, entry in sorted(manifest["categories"].items())},
            "shards": {name: len(entry["shards"]) for name, entry in sorted(manifest["categories"].items())}}
