"""Catalog files read as plain Ray tasks (what a run's plan reads) and as a Ray Dataset: the same rows."""
import json

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from engine import catalog, config
from engine.catalog import CatalogError

pytestmark = pytest.mark.usefixtures("ray_cluster")


def rows(n: int, start: int = 0) -> pa.Table:
    return pa.table({"sku": [f"{i:05d}" for i in range(start, start + n)],
                     "image_url": [f"http://127.0.0.1:9/{i}.png" for i in range(start, start + n)],
                     "category": ["tops"] * n, "title": [f"item {i}" for i in range(start, start + n)]})


def source(path, *more):
    return config.load(None, [f"source.path={path}", "source.columns.product_id=sku", *more]).source


def read_blocks(cfg, **kw) -> tuple[list[pa.Table], pa.Table]:
    import ray

    got = ray.get(catalog.blocks(catalog.parts(cfg, optional=("title",)), cfg.limit, **kw))
    return got, pa.concat_tables(got)


def test_a_folder_is_read_file_by_file_in_name_order_with_columns_renamed(tmp_path):
    folder = tmp_path / "catalog"
    folder.mkdir()
    pq.write_table(rows(300, 300), folder / "part-1.parquet")
    pq.write_table(rows(300), folder / "part-0.parquet")
    (folder / "_SUCCESS").write_text("")
    (folder / ".part-2.parquet.crc").write_text("junk")
    blocks, table = read_blocks(source(folder))
    assert table.column("product_id").to_pylist() == [f"{i:05d}" for i in range(600)]
    assert {"product_id", "image_url", "category", "title"} <= set(table.column_names)
    ds = catalog.read(source(folder), optional=("title",)).take_all()
    assert sorted(r["product_id"] for r in ds) == table.column("product_id").to_pylist()


def test_blocks_are_bounded_and_the_limit_takes_the_first_rows_in_order(tmp_path):
    folder = tmp_path / "catalog"
    folder.mkdir()
    for k in range(3):
        pq.write_table(rows(1000, 1000 * k), folder / f"part-{k}.parquet", row_group_size=100)
    blocks, table = read_blocks(source(folder), block_bytes=20_000)
    assert table.num_rows == 3000 and len(blocks) > 3 and max(b.nbytes for b in blocks) < 2 * 20_000
    _, head = read_blocks(source(folder, "source.limit=1500"))
    assert head.column("product_id").to_pylist() == [f"{i:05d}" for i in range(1500)]


def test_csv_ids_stay_strings_and_jsonl_is_read(tmp_path):
    pcsv.write_csv(rows(5), tmp_path / "c.csv")
    _, table = read_blocks(source(tmp_path / "c.csv"))
    assert table.column("product_id").to_pylist()[:2] == ["00000", "00001"]  # not 0, 1
    with open(tmp_path / "c.jsonl", "w") as f:
        for r in rows(4).to_pylist():
            f.write(json.dumps(r) + "\n")
    _, table = read_blocks(source(tmp_path / "c.jsonl"))
    assert table.num_rows == 4 and table.column("title").to_pylist()[3] == "item 3"


def test_an_unreadable_source_is_refused_on_the_driver_naming_the_key(tmp_path):
    with pytest.raises(CatalogError, match="no such file"):
        catalog.parts(source(tmp_path / "absent.parquet"))
    pq.write_table(rows(3).drop_columns(["category"]), tmp_path / "c.parquet")
    with pytest.raises(CatalogError, match=r"lacks required column\(s\) \['category'\]"):
        catalog.parts(source(tmp_path / "c.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CatalogError, match="no catalog file"):
        catalog.parts(source(tmp_path / "empty"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(CatalogError, match="cannot read"):
        catalog.parts(source(tmp_path / "bad.parquet"))
