"""Catalog sources -> Arrow blocks with at least product_id, image_url, category (Ray tasks, or a Ray Dataset).

Row-level problems (a null id, an empty URL) are not errors here: they travel on and become
reject rows with a reason. A CSV line with the wrong number of fields becomes a reject row
here (``malformed_row``, with its line number and text). A source that cannot be read at all
is an error, raised on the driver before any task runs; a file that breaks off mid-way (a
quote never closed, a JSON line cut short) fails the run with its name and the rows read, as
publishing a catalog without its tail would remove the products in it.
"""
from __future__ import annotations

import functools
import itertools
import logging
import os
from typing import NamedTuple

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.json as pjson
import pyarrow.parquet as pq

from engine.config import SourceConfig
from engine.errors import CatalogError  # noqa: F401 - the catalog's error, raised here and by sources
from engine.storage import Storage

log = logging.getLogger(__name__)
CATALOG_FIELDS = ("product_id", "image_url", "category")
# Reading is I/O; a whole CPU per read task would starve the actor pools on a 2-core node.
READ_CPUS = 0.25
BLOCK_BYTES = 16 << 20  # a catalog block's size: a plan task's memory follows its block, not the catalog
READ_ROWS = 65536  # rows a file is read at a time
REJECT_SCHEMA = pa.schema([(c, pa.string()) for c in ("product_id", "image_url", "category", "reason", "detail")])
LINE_CHARS = 120  # of a malformed line, kept in its reject's detail


def _format(cfg: SourceConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    ext = os.path.splitext(cfg.path.rstrip("/"))[1].lower()
    return {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}.get(ext, "parquet")


def parts(cfg: SourceConfig, storage_options: dict | None = None, extra: tuple = (), optional: tuple = ()) -> list:
    """The catalog as pieces one task each reads: zero-argument callables that yield Arrow tables
    with the catalog's field names (a file of ``source.path``, or a BigQuery read stream).

    The source is checked here, on the driver: a missing path or column raises CatalogError
    before any task runs. ``storage_options``: GCS settings for a gs:// ``source.path``
    (engine.storage.gcs_options); ``extra``: more columns the run needs (``index.filter_columns``),
    required like the rest; ``optional``: columns read when the catalog has them
    (``serve.display_columns``).
    """
    if cfg.kind == "bigquery":
        from engine.bigquery import stream_parts

        return stream_parts(cfg, list(dict.fromkeys([*cfg.required_columns, *extra])), optional)
    return _file_parts(cfg, storage_options, extra, optional)


def read(cfg: SourceConfig, storage_options: dict | None = None, extra: tuple = (), optional: tuple = ()):
    """The catalog as a Ray Dataset (streamed; nothing is collected on the driver), for notebooks
    and tools; a run reads the same ``parts`` as plain tasks (``blocks``)."""
    import ray.data

    if cfg.kind == "bigquery":
        from engine.bigquery import BigQueryStorageDatasource

        ds = ray.data.read_datasource(BigQueryStorageDatasource(
            cfg, list(dict.fromkeys([*cfg.required_columns, *extra])), optional), num_cpus=READ_CPUS)
    else:
        ds = ray.data.read_datasource(_datasource(_file_parts(cfg, storage_options, extra, optional)),
                                      num_cpus=READ_CPUS)
    return ds.limit(cfg.limit) if cfg.limit else ds


def blocks(pieces: list, limit: int | None = None, block_bytes: int = BLOCK_BYTES) -> tuple[list, list]:
    """(refs of the catalog's blocks, at most BLOCK_BYTES each, in catalog order; refs of
    REJECT_SCHEMA tables of the rows the read refused): one Ray task per piece of ``parts``, all
    running at once. ``limit``: only the first rows (``source.limit``), and the refusals of the
    pieces those came from.

    Plain tasks, not a Ray Data read: the streaming executor's start-up (operators, workers of
    their own) cost seconds a run, more than reading a whole day's change."""
    import ray

    task = ray.remote(_read_part).options(num_cpus=READ_CPUS, num_returns="streaming")
    started = [task.remote(piece, limit, block_bytes) for piece in pieces]  # all at once, then waited on
    streams = [list(stream) for stream in started]
    refused = [stream[-1] for stream in streams]  # each stream ends with its rejects
    refs = [ref for stream in streams for ref in stream[:-1]]
    if not limit:
        return refs, refused
    head = _head(refs, limit)  # a prefix of refs, its last one maybe cut
    firsts = itertools.accumulate((len(stream) - 1 for stream in streams), initial=0)  # each piece's first block
    return head, [rej for rej, first in zip(refused, firsts) if first < len(head)]


def _read_part(piece, limit: int | None = None, block_bytes: int = BLOCK_BYTES):
    """Ray task (a generator): one piece's tables gathered (or cut) into blocks of about
    ``block_bytes``, then one REJECT_SCHEMA table of the rows it refused (maybe empty)."""
    pending, size, rows, refused = [], 0, 0, []
    for table in piece():
        if isinstance(table, Refused):
            refused.append(table.rows)
            continue
        if limit is not None and rows + table.num_rows > limit:
            table = table.slice(0, limit - rows)
        step = max(1, int(table.num_rows * block_bytes / max(1, table.nbytes)))
        for at in range(0, table.num_rows, step):
            part = table.slice(at, step)
            pending.append(part)
            size += part.nbytes
            rows += part.num_rows
            if size >= block_bytes:
                yield pa.concat_tables(pending, promote_options="default")
                pending, size = [], 0
        if limit is not None and rows >= limit:
            break
    if pending:
        yield pa.concat_tables(pending, promote_options="default")
    yield pa.concat_tables(refused) if refused else REJECT_SCHEMA.empty_table()


class Refused(NamedTuple):
    """What a piece yields for rows it refused: a wrapper, as a catalog's own columns may be
    anything, REJECT_SCHEMA's included."""
    rows: pa.Table


def _head(refs: list, limit: int) -> list:
    """The blocks holding the first ``limit`` rows, the last one cut."""
    import ray

    count = ray.remote(num_cpus=READ_CPUS)(_num_rows)
    counts = ray.get([count.remote(r) for r in refs])
    out, total = [], 0
    for ref, n in zip(refs, counts):
        if total + n > limit:
            out.append(ray.put(ray.get(ref).slice(0, limit - total)))
            break
        out.append(ref)
        total += n
        if total == limit:
            break
    return out


def _num_rows(table: pa.Table) -> int:
    return table.num_rows


def _file_parts(cfg: SourceConfig, storage_options: dict | None, extra: tuple = (), optional: tuple = ()) -> list:
    storage = Storage(os.path.dirname(cfg.path.rstrip("/")) or ".", storage_options)
    name = os.path.basename(cfg.path.rstrip("/"))
    fs, path = storage.fs, storage.path(name)
    if not fs.exists(path):
        raise CatalogError(f"source.path {cfg.path!r}: no such file or directory")
    fmt = _format(cfg)
    files = _files(fs, path, name)
    if not files:
        raise CatalogError(f"source.path {cfg.path!r}: a folder with no catalog file in it")
    id_col = cfg.columns.get("product_id", "product_id")
    try:
        names = _schema(storage, files[0], fmt, id_col).names
    except (OSError, pa.ArrowException) as exc:
        raise CatalogError(f"source.path {cfg.path!r}: cannot read {files[0]} as {fmt}: {exc}") from None
    absent = [c for c in extra if cfg.columns.get(c, c) not in names and c not in cfg.required_columns]
    if absent:
        log.warning("source.path %r has no column(s) %s named by index.filter_columns: indexed as null",
                    cfg.path, absent)
    wanted = {cfg.columns.get(f, f): f for f in dict.fromkeys([*cfg.required_columns, *extra]) if f not in absent}
    for f in optional:
        if cfg.columns.get(f, f) in names:
            wanted.setdefault(cfg.columns.get(f, f), f)
    missing = [c for c in wanted if c not in names]
    if missing:
        raise CatalogError(f"source.path {cfg.path!r}: catalog lacks required column(s) {missing}; "
                           f"it has {names}" + ("; map fields to columns with source.columns" if cfg.columns else ""))
    rename = {c: f for c, f in wanted.items() if c != f}
    return [functools.partial(read_file, storage, f, fmt, id_col, rename) for f in files]


def _files(fs, path: str, name: str) -> list[str]:
    """The catalog's files relative to the storage root: the file itself, or a folder's files in
    name order (hidden ones and markers like _SUCCESS left out)."""
    if not fs.isdir(path):
        return [name]
    found = sorted(fs.find(path))
    rel = [name + "/" + p[len(path.rstrip("/")) + 1:] for p in found]
    return [r for r in rel if not any(s.startswith((".", "_")) for s in r.split("/")[1:])]


def _schema(storage: Storage, file: str, fmt: str, id_col: str) -> pa.Schema:
    if fmt == "parquet":
        return pq.read_schema(storage.path(file), filesystem=storage.fs)
    with storage.fs.open(storage.path(file), "rb") as f:
        return _reader(f, fmt, id_col, lambda row: "skip").schema  # the read task reports those lines


def _reader(f, fmt: str, id_col: str, on_invalid=None):
    if fmt == "csv":
        parse = pcsv.ParseOptions(invalid_row_handler=on_invalid) if on_invalid else None
        return pcsv.open_csv(f, parse_options=parse,
                             convert_options=pcsv.ConvertOptions(column_types={id_col: pa.string()}))
    return pjson.open_json(f)


def read_file(storage: Storage, file: str, fmt: str, id_col: str, rename: dict):
    """One catalog file's rows, a batch at a time, columns renamed to catalog fields; before a
    batch, a Refused of the CSV lines skipped in reading it. A file that breaks off raises
    CatalogError naming it and the rows read before."""
    rows = 0
    try:
        if fmt == "parquet":
            pf = pq.ParquetFile(storage.path(file), filesystem=storage.fs)
            for batch in pf.iter_batches(batch_size=READ_ROWS):
                rows += batch.num_rows
                yield _renamed(pa.Table.from_batches([batch]), rename)
            return
        skipped = []
        with storage.fs.open(storage.path(file), "rb") as f:
            for batch in _reader(f, fmt, id_col, functools.partial(_skip, skipped, file)):
                if skipped:  # before its batch: a limit that stops at the batch still counts them
                    yield Refused(_malformed(skipped))
                    skipped.clear()
                rows += batch.num_rows
                yield _renamed(pa.Table.from_batches([batch]), rename)
        if skipped:
            yield Refused(_malformed(skipped))
    except (OSError, pa.ArrowException) as exc:
        text = " ".join(str(exc).split())[:300]
        raise CatalogError(f"source.path: {storage.path(file)}: cannot read as {fmt} after {rows} rows: {text}; "
                           "nothing is published from a catalog that cannot be read to its end") from None


def _skip(skipped: list, file: str, row) -> str:
    """pyarrow's invalid_row_handler: note the line, then skip it; a "row" that spans lines is a
    quote never closed, which swallowed the lines after it: an error, not one reject."""
    if "\n" in row.text or "\r" in row.text:
        return "error"
    where = f"line {row.number}" if row.number is not None else "a line"
    skipped.append(f"{file} {where}: expected {row.expected_columns} fields, got {row.actual_columns}: "
                   f"{row.text[:LINE_CHARS]!r}")
    return "skip"


def _malformed(skipped: list) -> pa.Table:
    """Reject rows of skipped lines: which field is the id is unknown in a broken line, so the
    detail carries the line itself."""
    n = len(skipped)
    none = pa.nulls(n, pa.string())
    return pa.table({"product_id": none, "image_url": none, "category": none,
                     "reason": pa.array(["malformed_row"] * n, pa.string()), "detail": pa.array(skipped, pa.string())},
                    schema=REJECT_SCHEMA)


def _renamed(table: pa.Table, rename: dict) -> pa.Table:
    return table.rename_columns([rename.get(n, n) for n in table.column_names]) if rename else table


def _datasource(pieces: list):
    """A Ray Data datasource over ``parts``: one read task each (ray.data imported only when asked)."""
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    class CatalogParts(Datasource):
        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
            return [ReadTask(functools.partial(_rows_only, p), meta, per_task_row_limit=per_task_row_limit)
                    for p in pieces]

    return CatalogParts()


def _rows_only(piece):
    """A piece's catalog tables; its refusals logged (a Dataset has one schema; a run keeps them)."""
    for table in piece():
        if not isinstance(table, Refused):
            yield table
        elif table.rows.num_rows:
            log.warning("catalog read skipped %d malformed row(s), first: %s", table.rows.num_rows,
                        table.rows.column("detail")[0].as_py())


def normalise(batch: pa.Table) -> pa.Table:
    """Required fields as strings (ids may arrive as ints from CSV or BigQuery)."""
    for name in CATALOG_FIELDS:
        col = batch.column(name)
        if col.type != pa.string():
            col = col.cast(pa.string())
            batch = batch.set_column(batch.schema.get_field_index(name), name, col)
    return batch
