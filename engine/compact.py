"""Compaction: merge per-batch parts and rewrite mostly-dead files into files of about
``features.target_file_mb``, so bytes under features/ stay within a small multiple of the live
vectors and the number of files stays flat however many runs there have been.

A file is rewritten when it is sparse (under ``LIVE_FLOOR`` of its rows still live), or small
(under half the target) once its category has ``MAX_SMALL`` small files or half a target of them. Its live rows are copied, in (file, row) order, into new files with new
names; nothing that exists is changed. The caller then commits a manifest that points the moved
rows at their new place, and only after publish does garbage collection (engine/gc.py) delete
files that no kept version references. So a crash at any step loses nothing and never shows a row
twice: before the manifest commits, the new files are unreferenced (gc removes them) and the state
still names the old ones; after it, the old files stay until no kept version names them.
"""
from __future__ import annotations

import math
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine.features import compacted_prefix, write_part
from engine.storage import Storage

LIVE_FLOOR = 0.5
MAX_SMALL = 8
MIB = 1 << 20


def _group(file: str) -> tuple[str, str]:
    """(model version, category) of a feature file from its path (features/<mv>/.../category=<c>/name)."""
    parts = file.split("/")
    return parts[1], parts[-2].split("=", 1)[1]


def choose(catalog: dict, target_bytes: int, min_small: int | None = None,
           run_id: str | None = None) -> dict[tuple[str, str], list[str]]:
    """Files worth rewriting, per (model version, category): every sparse file, and the small ones
    once there are ``MAX_SMALL`` of them or they add up to half the target (so a day's few new
    parts wait for the next days' instead of rewriting the same tail file every day). ``min_small``:
    another count (``lookalike compact`` merges as soon as there are two). ``run_id``: the run's
    own per-batch parts are merged among themselves when it wrote two or more in a category, so a
    run leaves one file per category of what it computed, at a cost in proportion to it."""
    min_small = MAX_SMALL if min_small is None else min_small
    own = f"/run={run_id}/" if run_id else None
    small: dict[tuple[str, str], list[str]] = {}
    mine: dict[tuple[str, str], list[str]] = {}
    sparse: dict[tuple[str, str], list[str]] = {}
    for name, entry in sorted(catalog.items()):
        if entry["live"] < LIVE_FLOOR * entry["rows"]:
            sparse.setdefault(_group(name), []).append(name)
        elif entry["bytes"] < target_bytes / 2:
            small.setdefault(_group(name), []).append(name)
            if own and own in name:
                mine.setdefault(_group(name), []).append(name)
    out = {key: list(names) for key, names in sparse.items()}
    for key, names in small.items():
        if len(names) >= min_small or sum(catalog[n]["bytes"] for n in names) >= target_bytes / 2:
            out[key] = sorted(out.get(key, []) + names)
        elif len(mine.get(key, [])) >= 2:
            out[key] = sorted(out.get(key, []) + mine[key])
    return out


def copy_rows(root, slices: list[tuple[str, np.ndarray]], prefix: tuple, name: str) -> str:
    """Ray task: the given rows of the given files, in order, into one new file."""
    storage = Storage.of(root)
    parts = []
    for file, rows in slices:
        table = pq.ParquetFile(storage.path(file), filesystem=storage.fs).read()
        parts.append(table.take(pa.array(np.asarray(rows, np.int64))))
    return write_part(storage, prefix, pa.concat_tables(parts, promote_options="default"), name)


def compact(storage: Storage, state: pa.Table, catalog: dict, target_mb: float, run_id: str,
            min_small: int | None = None) -> tuple[pa.Table, dict]:
    """Rewrite the chosen files' live rows into new files; returns the state with those rows moved
    (only its ``file`` and ``row`` columns are rebuilt: no second copy of the state) and what was
    done. The new files exist before anything refers to them."""
    import ray

    target = int(target_mb * MIB)
    chosen = choose(catalog, target, min_small, run_id)
    stats = {"files_in": 0, "files_out": 0, "rows_moved": 0, "written": []}
    if not chosen:
        return state, stats
    moved_files = [f for names in chosen.values() for f in names]
    at = np.flatnonzero(pc.is_in(state.column("file"), value_set=pa.array(moved_files, pa.string()))
                        .to_numpy(zero_copy_only=False))
    moving = pa.table({"file": state.column("file").take(pa.array(at)).cast(pa.string()),
                       "row": state.column("row").take(pa.array(at)), "at": pa.array(at, pa.int64())}) \
        .sort_by([("file", "ascending"), ("row", "ascending")])
    refs, pieces = [], []
    task = ray.remote(num_cpus=0.25)(copy_rows)
    for (mv, category), names in sorted(chosen.items()):
        rows = moving.filter(pc.is_in(moving.column("file"), value_set=pa.array(names, pa.string())))
        bytes_per_row = sum(catalog[n]["bytes"] for n in names) / max(1, sum(catalog[n]["rows"] for n in names))
        per_file = max(1, int(target / max(bytes_per_row, 1)))
        files = rows.column("file").to_numpy(zero_copy_only=False)
        positions = rows.column("row").to_numpy()
        where = rows.column("at").to_numpy()
        prefix = compacted_prefix(mv, category)
        for k in range(math.ceil(rows.num_rows / per_file)):
            lo, hi = k * per_file, min(rows.num_rows, (k + 1) * per_file)
            chunk_files, chunk_rows = files[lo:hi], positions[lo:hi]
            cuts = np.flatnonzero(chunk_files[1:] != chunk_files[:-1]) + 1
            slices = [(str(chunk_files[a]), chunk_rows[a:b])
                      for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(chunk_files)])]
            name = f"{run_id}-{uuid.uuid4().hex[:12]}.parquet"
            refs.append(task.remote(storage, slices, prefix, name))
            pieces.append((where[lo:hi], "/".join(prefix + (name,))))
        stats["files_in"] += len(names)
    written = ray.get(refs)
    for (_, expected), got in zip(pieces, written):
        assert got == expected, (got, expected)
    stats.update(files_out=len(written), rows_moved=moving.num_rows, written=sorted(written))
    return _relocate(state, pieces), stats


def _relocate(state: pa.Table, pieces: list[tuple[np.ndarray, str]]) -> pa.Table:
    """``state`` with the rows at each piece's positions pointed at its new file, rows 0..n-1."""
    files = state.column("file")
    files = (files if pa.types.is_dictionary(files.type) else pc.dictionary_encode(files)).combine_chunks()
    names = files.dictionary
    codes = pc.fill_null(files.indices, -1).to_numpy(zero_copy_only=False).astype(np.int32)
    rows = np.array(state.column("row").to_numpy(), dtype=np.int64, copy=True)
    new_names = [name for _, name in pieces]
    for k, (where, _) in enumerate(pieces):
        codes[where] = len(names) + k
        rows[where] = np.arange(len(where), dtype=np.int64)
    dictionary = pa.concat_arrays([names.cast(pa.string()), pa.array(new_names, pa.string())])
    file = pa.DictionaryArray.from_arrays(pa.array(codes, pa.int32(), mask=codes < 0), dictionary)
    state = state.set_column(state.schema.get_field_index("file"), "file", file)
    return state.set_column(state.schema.get_field_index("row"), "row", pa.array(rows, pa.int64()))
