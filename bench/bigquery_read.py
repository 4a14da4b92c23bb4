"""Rows/s read from the BigQuery emulator through our Storage Read datasource.

    python bench/bigquery_read.py [--rows 1000000] [--streams 1 4]

Starts bqemulator (tests/emulators.py installs it on first use) and a loopback Ray cluster,
loads a synthetic catalog of ``--rows`` rows (id, URL, category + an unselected column), and
reads it back three ways, each counted row by row:
  - ``raw``: one process draining every stream with ``engine.bigquery.read_stream`` (no Ray);
  - ``ray_data``: ``engine.catalog.read`` (the pipeline's source) iterated on the driver.
Prints one JSON object per measurement and a short table; ratios are against ``raw``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from engine import bigquery, catalog, config, raycluster  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--cpus", type=int, default=2)
    args = ap.parse_args()

    import ray
    from emulators import BqEmulator

    work = Path(tempfile.mkdtemp(prefix="bench-bq-"))
    bq = BqEmulator(work).start()
    try:
        client = bq.client()
        client.create_dataset("bench", exists_ok=True)
        t0 = time.perf_counter()
        client.query(f"""CREATE OR REPLACE TABLE bench.catalog AS
            SELECT CONCAT('p', CAST(x AS STRING)) AS sku,
                   CONCAT('https://images.example.com/p/', CAST(x AS STRING), '.jpg') AS url,
                   IF(MOD(x, 4) = 0, 'shoes', 'tops') AS cat, x AS n
            FROM UNNEST(GENERATE_ARRAY(0, {args.rows - 1})) AS x""").result()
        load_s = time.perf_counter() - t0
        os.environ.update(raycluster.loopback_env())
        ray.init(num_cpus=args.cpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                 _temp_dir=str(work / "ray"))
        results = []
        warm = config.load(None, ["source.kind=bigquery", "source.table=bench.catalog", "source.row_restriction=n < 10",
                                  "source.columns.product_id=sku", "source.columns.image_url=url",
                                  "source.columns.category=cat", *bq.overrides()]).source
        catalog.read(warm).take_all()  # worker processes start once, outside the measurements
        for streams in args.streams:
            cfg = config.load(None, ["source.kind=bigquery", "source.table=bench.catalog", f"source.max_streams={streams}",
                                     "source.columns.product_id=sku", "source.columns.image_url=url",
                                     "source.columns.category=cat", *bq.overrides()]).source
            results.append(measure_raw(cfg, streams, args.rows))
            results.append(measure_ray(cfg, streams, args.rows))
        raw = {r["streams"]: r["rows_per_s"] for r in results if r["how"] == "raw"}
        for r in results:
            r["vs_raw"] = round(r["rows_per_s"] / raw[r["streams"]], 3)
            r["load_s"] = round(load_s, 2)
            print(json.dumps(r), flush=True)
        print(f"\n{'how':<10}{'streams':>8}{'granted':>8}{'rows':>10}{'seconds':>9}{'rows/s':>11}{'vs raw':>8}")
        for r in results:
            print(f"{r['how']:<10}{r['streams']:>8}{r['granted']:>8}{r['rows']:>10}{r['seconds']:>9.2f}"
                  f"{r['rows_per_s']:>11,.0f}{r['vs_raw']:>8.2f}")
    finally:
        ray.shutdown()
        bq.stop()
    return 0


def measure_raw(cfg, streams: int, expected: int) -> dict:
    t0 = time.perf_counter()
    plan = bigquery.resolve(cfg, list(cfg.required_columns))
    session = bigquery.open_session(cfg, plan)
    ep = bigquery.Endpoints.from_config(cfg)
    rows = sum(t.num_rows for s in session.streams for t in bigquery.read_stream(ep, s, session.schema, plan.rename))
    return _result("raw", streams, len(session.streams), rows, expected, time.perf_counter() - t0)


def measure_ray(cfg, streams: int, expected: int) -> dict:
    t0 = time.perf_counter()
    ds = catalog.read(cfg)
    rows = sum(b.num_rows for b in ds.iter_batches(batch_format="pyarrow", batch_size=None))
    granted = len(bigquery.open_session(cfg, bigquery.resolve(cfg, list(cfg.required_columns))).streams)
    return _result("ray_data", streams, granted, rows, expected, time.perf_counter() - t0)


def _result(how, streams, granted, rows, expected, seconds) -> dict:
    if rows != expected:
        raise SystemExit(f"{how}: read {rows} rows, expected {expected}")
    return {"bench": "bigquery_read", "how": how, "streams": streams, "granted": granted, "rows": rows,
            "seconds": round(seconds, 3), "rows_per_s": round(rows / seconds)}


if __name__ == "__main__":
    sys.exit(main())
