"""Catalog files read as plain Ray tasks (what a run's plan reads) and as a Ray Dataset: the same rows."""
import json
import os

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from engine import catalog, config
from engine.catalog import CatalogError
from engine.storage import Storage

pytestmark = pytest.mark.usefixtures("ray_cluster")


def rows(n: int, start: int = 0) -> pa.Table:
    return pa.table({"sku": [f"{i:05d}" for i in range(start, start + n)],
                     "image_url": [f"http://127.0.0.1:9/{i}.png" for i in range(start, start + n)],
                     "category": ["tops"] * n, "title": [f"item {i}" for i in range(start, start + n)]})


def source(path, *more):
    return config.load(None, [f"source.path={path}", "source.columns.product_id=sku", *more]).source


def read_blocks(cfg, **kw) -> tuple[list[pa.Table], pa.Table]:
    got, refused = read_with_refusals(cfg, **kw)
    assert refused.num_rows == 0
    return got, pa.concat_tables(got)


def read_with_refusals(cfg, **kw) -> tuple[list[pa.Table], pa.Table]:
    import ray

    refs, refused = catalog.blocks(catalog.parts(cfg, optional=("title",)), cfg.limit, **kw)
    return ray.get(refs), pa.concat_tables(ray.get(refused))


def csv_with_bad_lines(path, n: int, bad: dict[int, str]) -> None:
    """``n`` good rows as CSV, with ``bad`` lines (physical line number -> text) put in."""
    pcsv.write_csv(rows(n), path, pcsv.WriteOptions(quoting_style="none"))
    lines = path.read_text().splitlines()
    for number, text in sorted(bad.items()):
        lines.insert(number - 1, text)
    path.write_text("\n".join(lines) + "\n")


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


def test_a_csv_line_with_the_wrong_field_count_becomes_a_reject_row_and_the_rest_is_read(tmp_path):
    path = tmp_path / "c.csv"
    csv_with_bad_lines(path, 3000, {3: '"00900",only-two', 2500: "x,y,z,w,v,u"})
    blocks, refused = read_with_refusals(source(path), block_bytes=20_000)
    table = pa.concat_tables(blocks)
    assert table.column("product_id").to_pylist() == [f"{i:05d}" for i in range(3000)]
    got = refused.to_pylist()
    assert [r["reason"] for r in got] == ["malformed_row"] * 2 and all(r["product_id"] is None for r in got)
    assert "c.csv line 3: expected 4 fields, got 2: " in got[0]["detail"] and "only-two" in got[0]["detail"]
    assert "line 2500: expected 4 fields, got 6" in got[1]["detail"]
    ds = catalog.read(source(path)).take_all()  # a Dataset has one schema: the lines are logged, not rows
    assert len(ds) == 3000


def test_a_file_that_breaks_off_mid_way_names_itself_and_the_rows_read(tmp_path):
    import ray

    path = tmp_path / "c.csv"
    csv_with_bad_lines(path, 200_000, {150_000: '"00001,http://127.0.0.1:9/x.png,tops,t'})  # a quote never closed
    refs, refused = catalog.blocks(catalog.parts(source(path)))
    with pytest.raises(CatalogError) as failed:
        ray.get(refs + refused)
    said = str(failed.value.cause)
    assert said.startswith(f"source.path: {path}: cannot read as csv after ") and "Traceback" not in said
    assert "nothing is published" in said
    with open(tmp_path / "c.jsonl", "w") as f:
        for r in rows(30_000).to_pylist():  # past the first block, which the driver reads for the schema
            f.write(json.dumps(r) + "\n")
        f.write('{"sku": "30000", "image_url": \n')
    with pytest.raises(CatalogError, match="cannot read as jsonl after"):
        ray.get(sum(catalog.blocks(catalog.parts(source(tmp_path / "c.jsonl"))), []))


def test_a_run_over_a_csv_with_bad_lines_rejects_them_and_a_broken_file_publishes_nothing(
        sample_catalog, tmp_path):
    """Every row indexed or rejected with a reason, the malformed lines too; a file cut mid-way
    fails the run in one line, before anything is published."""
    from conftest import make_config
    from engine import pipeline, pointer

    table = pq.read_table(sample_catalog).slice(0, 12)
    table = table.select([n for n in table.column_names  # unquoted CSV: no column with commas in it
                          if not any("," in str(v) for v in table.column(n).to_pylist())])
    path = tmp_path / "catalog.csv"
    pcsv.write_csv(table, path, pcsv.WriteOptions(quoting_style="none"))
    lines = path.read_text().splitlines()
    lines[4:4] = ["lonely-field", "a,b"]
    path.write_text("\n".join(lines) + "\n")
    images = f"download.file_roots=[{os.path.dirname(sample_catalog)}]"
    rep = pipeline.run(make_config(str(path), tmp_path / "store", images))
    c = rep["counts"]
    assert rep["status"] == "published" and (c["rows_in"], c["ok"], c["rejected"]) == (14, 12, 2)
    assert c["rows_in"] == c["ok"] + c["unchanged_reused"] + c["rejected"]
    assert rep["rejects_by_reason"] == {"malformed_row": 2}
    details = pq.read_table(rep["rejects_uri"]).column("detail").to_pylist()
    assert any("line 5: expected" in d and "lonely-field" in d for d in details)
    lines.insert(8, '"cut-' + lines[8])  # a quote never closed: it swallows the lines after it
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(pipeline.RunFailed) as failed:
        pipeline.run(make_config(str(path), tmp_path / "store2", images))
    assert "cannot read as csv after" in str(failed.value) and "\n" not in str(failed.value)
    assert pointer.latest(Storage(str(tmp_path / "store2")), "effnet-lite0-512-v1") is None


def test_a_catalog_with_the_reject_columns_is_read_as_catalog_rows(tmp_path):
    """Refusals travel wrapped: a catalog's own columns (here exactly a reject table's) never pass for them."""
    names = ("product_id", "image_url", "category", "reason", "detail")
    table = pa.table({n: [f"{n}-{i}" for i in range(50)] for n in names})
    pcsv.write_csv(table, tmp_path / "c.csv")
    blocks, refused = read_with_refusals(source(tmp_path / "c.csv", "source.columns.product_id=product_id"))
    assert refused.num_rows == 0 and pa.concat_tables(blocks).column("reason").to_pylist()[:2] == ["reason-0", "reason-1"]


def test_a_limit_keeps_the_refusals_of_the_rows_it_reads(tmp_path):
    csv_with_bad_lines(tmp_path / "a.csv", 100, {3: "x,y"})
    csv_with_bad_lines(tmp_path / "b.csv", 100, {5: "p,q"})
    for limit, lines in ((50, ["a.csv line 3"]), (150, ["a.csv line 3", "b.csv line 5"])):
        blocks, refused = read_with_refusals(source(tmp_path, "source.format=csv", f"source.limit={limit}"))
        assert pa.concat_tables(blocks).num_rows == limit
        assert [d.split(":")[0].rsplit("/", 1)[-1] for d in refused.column("detail").to_pylist()] == lines
