"""Filter columns follow the catalog: a version that reuses every shard by reference still has
today's prices, and garbage collection keeps the files a kept version reads them from."""
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine import index, pipeline, publish, sample
from engine.storage import Storage
from tests.conftest import make_config


def attrs_of(cfg, version):
    storage = Storage.from_config(cfg.storage)
    loaded = index.LoadedIndex.load(storage, cfg.embed.model_version, version, cfg.serve.cache_dir)
    try:
        return {pid: (price, brand) for s in loaded.shards.values()
                for pid, price, brand in zip(s.ids.to_pylist(), s.attrs.column("price").to_pylist(),
                                             s.attrs.column("brand").to_pylist())}
    finally:
        loaded.close()


def test_a_reused_index_serves_todays_attributes(ray_cluster, tmp_path):
    path = sample.make_catalog(tmp_path / "catalog", 80)
    cfg = make_config(path, tmp_path / "store", "storage.keep_versions=1", "index.validate.sample=20")
    first = pipeline.run(cfg)
    day1 = pq.read_table(path)
    assert attrs_of(cfg, first["index_version"]) == {
        r["product_id"]: (r["price"], r["brand"]) for r in day1.to_pylist()}
    day2 = day1.set_column(day1.schema.get_field_index("price"), "price", pc.multiply(day1.column("price"), 2.0))
    day2 = day2.set_column(day2.schema.get_field_index("brand"), "brand",
                           pa.array(["x" * 500] + day2.column("brand").to_pylist()[1:]))
    pq.write_table(day2, path)
    second = pipeline.run(cfg)
    assert second["counts"]["processed"] == 0 and second["index_build"]["shards"] == 0  # every shard reused
    got = attrs_of(cfg, second["index_version"])
    want = {r["product_id"]: (r["price"], r["brand"][:200]) for r in day2.to_pylist()}
    assert got == want
    storage = Storage.from_config(cfg.storage)
    assert publish.latest(storage, cfg.embed.model_version) == second["index_version"]
    # keep_versions=1: the first version is retired, its shards stay (the second reads them)
    assert attrs_of(cfg, second["index_version"]) == want
