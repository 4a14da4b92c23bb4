"""The BigQuery source (our Storage Read API datasource) against bqemulator on 127.0.0.1."""
import os
import subprocess
import sys

import pytest

from engine import bigquery, catalog, config
from engine.catalog import CatalogError

pytestmark = pytest.mark.bigquery
DATASET = "lookalike_test"
BIG_ROWS = 150_000  # > 1 MB (the emulator, like BigQuery, gives small tables one stream); 3 messages a stream
MAPPING = ["source.columns.product_id=sku", "source.columns.image_url=url", "source.columns.category=cat"]


@pytest.fixture(scope="module")
def bq(bq_emulator):
    client = bq_emulator.client()
    client.create_dataset(DATASET, exists_ok=True)
    client.query(f"""
        CREATE OR REPLACE TABLE {DATASET}.big AS
        SELECT CONCAT('p', CAST(x AS STRING)) AS sku,
               CONCAT('http://127.0.0.1:9/img/', CAST(x AS STRING), '.png') AS url,
               IF(MOD(x, 3) = 0, 'shoes', 'tops') AS cat, x AS n, 'carried' AS note
        FROM UNNEST(GENERATE_ARRAY(0, {BIG_ROWS - 1})) AS x""").result()
    return bq_emulator


def source(bq, *more):
    return config.load(None, ["source.kind=bigquery", *bq.overrides(), *more]).source


def jobs(bq) -> int:
    return sum(1 for _ in bq.client().list_jobs())


def test_many_streams_read_every_row_exactly_once(ray_cluster, bq):
    import pyarrow as pa
    import pyarrow.compute as pc

    cfg = source(bq, f"source.table={DATASET}.big", "source.max_streams=4", *MAPPING)
    ds_source = bigquery.BigQueryStorageDatasource(cfg, list(cfg.required_columns))
    assert len(ds_source.get_read_tasks(1)) == 4  # one read task per stream
    ids, rows = [], 0
    for batch in catalog.read(cfg).iter_batches(batch_format="pyarrow", batch_size=None):
        assert batch.column_names == ["product_id", "image_url", "category"]  # selected_fields, renamed
        ids.append(batch.column("product_id"))
        rows += batch.num_rows
    ids = pa.chunked_array(ids)
    assert rows == BIG_ROWS and pc.count_distinct(ids).as_py() == BIG_ROWS
    assert pc.min_max(pc.cast(pc.utf8_slice_codeunits(ids, 1), pa.int64())).as_py() == {"min": 0, "max": BIG_ROWS - 1}


def test_a_stream_is_yielded_batch_by_batch_not_as_one_block(bq):
    cfg = source(bq, f"source.table={DATASET}.big", "source.max_streams=1", *MAPPING)
    plan = bigquery.resolve(cfg, list(cfg.required_columns))
    session = bigquery.open_session(cfg, plan)
    assert len(session.streams) == 1
    sizes = [t.num_rows for t in bigquery.read_stream(bigquery.Endpoints.from_config(cfg), session.streams[0],
                                                      session.schema, plan.rename)]
    assert sum(sizes) == BIG_ROWS and len(sizes) >= 3 and max(sizes) < BIG_ROWS


def test_row_restriction_and_extra_columns_are_pushed_down(ray_cluster, bq):
    cfg = source(bq, f"source.table={DATASET}.big", "source.row_restriction=n < 1000 AND cat = 'shoes'",
                 "source.extra_columns=[note, n]", *MAPPING)
    rows = catalog.read(cfg).take_all()
    assert len(rows) == 334 and {r["category"] for r in rows} == {"shoes"}
    assert set(rows[0]) == {"product_id", "image_url", "category", "note", "n"} and rows[0]["note"] == "carried"
    assert sorted(r["n"] for r in rows) == list(range(0, 1000, 3))


def test_query_runs_once_into_its_destination_table(ray_cluster, bq):
    cfg = source(bq, f"source.query=SELECT sku, url, cat FROM {DATASET}.big "
                     "WHERE cat = @cat AND n < @below AND @day = DATE '2026-11-01'",
                 "source.query_parameters={cat: shoes, below: 3000, day: 2026-11-01}",
                 f"source.query_destination={DATASET}.q_out",
                 *MAPPING)
    before = jobs(bq)
    ds = catalog.read(cfg)
    ds.schema()
    rows = ds.take_all()
    assert jobs(bq) == before + 1  # Ray Data asks for read tasks several times; the query ran once
    assert len(rows) == 1000 and {r["category"] for r in rows} == {"shoes"}
    assert bq.client().get_table(f"{DATASET}.q_out").num_rows == 1000


@pytest.mark.parametrize("overrides, key, words", [
    (["source.query=SELEC sku FROM lookalike_test.big"], "source.query: BigQuery rejected the query",
     "syntax error"),
    (["source.table=lookalike_test.nope"], "source.table: cannot read table test-project.lookalike_test.nope",
     "NOT_FOUND"),
    (["source.table=lookalike_test.big", *MAPPING, "source.columns.image_url=picture"],
     "source.table: table test-project.lookalike_test.big lacks column(s) image_url (column 'picture')", "it has"),
    (["source.table=lookalike_test.big", "source.columns.product_id=sku", "source.columns.category=cat"],
     "lacks column(s) 'image_url'", "source.columns"),
])
def test_source_errors_are_one_readable_line(bq, overrides, key, words):
    cfg = source(bq, *overrides)
    with pytest.raises(CatalogError) as err:
        bigquery.BigQueryStorageDatasource(cfg, list(cfg.required_columns))
    message = str(err.value)
    assert message.startswith(key) or key in message, message
    assert words.lower() in message.lower() and "\n" not in message and len(message) < 1000


def test_unreachable_endpoint_gives_up_after_timeout(bq):
    from conftest import free_port

    cfg = source(bq, f"source.table={DATASET}.big", f"source.api_endpoint=http://127.0.0.1:{free_port()}",
                 "source.timeout_s=2")
    with pytest.raises(CatalogError, match="gave up after retrying.*is the endpoint reachable"):
        bigquery.BigQueryStorageDatasource(cfg, list(cfg.required_columns))


def test_cli_run_with_bad_sql_fails_once_with_a_clear_message(ray_cluster, bq, tmp_path):
    before = jobs(bq)
    args = ["--set", "source.kind=bigquery", "--set", "source.query=SELECT sku FROM lookalike_test.big WHERE",
            "--set", f"storage.root={tmp_path}/store"]
    for item in bq.overrides():
        args += ["--set", item]
    result = subprocess.run([sys.executable, "-m", "engine", "run", *args], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "RAY_ADDRESS": ray_cluster})
    assert result.returncode == 1, result.stderr[-2000:]
    failed = [line for line in result.stderr.splitlines() if "FAILED" in line]
    assert len(failed) == 1 and "source.query: BigQuery rejected the query" in failed[0], result.stderr[-2000:]
    assert jobs(bq) == before + 1  # one job: no retry storm


def test_prod_config_reads_bigquery_and_names_table_and_bucket():
    cfg = config.load(config.DEFAULT_CONFIG.parent / "prod.yaml")
    assert cfg.source.kind == "bigquery" and cfg.source.table == "lookalike-prod.catalog.products"
    assert cfg.storage.root == "gs://lookalike-prod/lookalike" and cfg.source.columns["image_url"] == "main_image_url"


@pytest.mark.parametrize("overrides, words", [
    (["source.table=a.b", "source.query=SELECT 1"], "exactly one of source.table and source.query"),
    (["source.project=null", "source.table=a.b"], "source.project is required"),
    (["source.query=SELECT 1", "source.row_restriction=x > 1"], "put the filter in source.query"),
])
def test_bigquery_config_mistakes_are_named(overrides, words):
    with pytest.raises(config.ConfigError, match=words):
        config.load(None, ["source.kind=bigquery", "source.project=p", *overrides])
