"""Display columns and thumbnails follow the catalog: kept per index version from the run's catalog
(also where every shard is reused by reference), thumbnails packed a batch to a file, an
unchanged row keeping its thumbnail, a changed image getting a new one, and garbage collection
deleting the packs no kept version names."""
import io

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from engine import display, index, pipeline, sample, thumbs
from engine.storage import Storage
from tests.conftest import make_config


def test_pack_entries_match_on_id_and_content_key_and_read_back(tmp_path):
    storage = Storage(str(tmp_path))
    jpeg = [b"\xff\xd8one", b"", b"\xff\xd8three!"]
    name = thumbs.write_pack(storage, "m1", "20260101T000000Z-aaaaaa", ["a", "b", "c"], ["k1", "k2", "k3"], jpeg)
    assert name.startswith("m1/run=20260101T000000Z-aaaaaa/")
    entries = thumbs.new_entries(storage, "m1", since=None)
    assert entries.column("product_id").to_pylist() == ["a", "c"]  # an empty thumbnail is not stored
    assert thumbs.new_entries(storage, "m1", since="20260101T000000Z-aaaaaa").num_rows == 0
    found = thumbs.match(pa.array(["c", "a", "a", "zz"]), pa.array(["k3", "k1", "old", "k9"]), entries).to_pydict()
    assert found["pack"] == [name, name, None, None]  # same product, other content key: no thumbnail
    offsets, lengths = found["offset"], found["length"]
    assert thumbs.read(storage, name, offsets[0], lengths[0]) == jpeg[2]
    assert thumbs.read(storage, name, offsets[1], lengths[1]) == jpeg[0]
    assert thumbs.sweep(storage, "m1", set(), "20251231T000000Z-zzzzzz") == 0  # a newer run: not judged
    assert thumbs.sweep(storage, "m1", {name}, "20260101T000000Z-aaaaaa") == 1  # only the entry file goes
    assert storage.listdir("thumbs", "m1", "run=20260101T000000Z-aaaaaa") == [name.rsplit("/", 1)[1] + ".bin"]


def display_of(cfg, version):
    storage = Storage.from_config(cfg.storage)
    manifest = index.read_manifest(storage, cfg.embed.model_version, version)
    loaded = display.Display.load(storage, manifest, cfg.serve.cache_dir)
    directory = index.Directory.load(storage, manifest, cfg.serve.cache_dir)
    out = {}
    for pid in directory.keys.to_pylist():
        loc = directory.lookup(pid.decode())[0]
        out[pid.decode()] = (loaded.columns_of(loc), loaded.thumb(loc))
    return manifest, out


def test_titles_follow_the_catalog_and_thumbnails_are_reused(ray_cluster, tmp_path):
    path = sample.make_catalog(tmp_path / "catalog", 60)
    cfg = make_config(path, tmp_path / "store", "storage.keep_versions=1", "index.validate.sample=20")
    storage = Storage.from_config(cfg.storage)
    first = pipeline.run(cfg)
    day1 = pq.read_table(path)
    manifest1, shown1 = display_of(cfg, first["index_version"])
    assert set(shown1) == set(day1.column("product_id").to_pylist())
    for r in day1.to_pylist():
        columns, thumb = shown1[r["product_id"]]
        assert columns == {"title": r["title"], "image_url": r["image_url"]}
        img = Image.open(io.BytesIO(thumbs.read(storage, *thumb[:3])))
        assert img.format == "JPEG" and max(img.size) == 112  # the sample's 112-px shots are never enlarged
    packs1 = {p for e in manifest1["categories"].values() for p in e["display"]["packs"]}
    assert len(packs1) <= 2 * len(manifest1["categories"])  # one pack per written batch, never one per product

    # day 2: every title changes, one product gets a new image (a new updated_at), nothing else
    changed = day1.column("product_id")[0].as_py()
    titles = pc.binary_join_element_wise(day1.column("title"), pa.scalar(" (new)"), "")
    titles = pa.array(["x" * 500] + titles.to_pylist()[1:])
    day2 = day1.set_column(day1.schema.get_field_index("title"), "title", titles)
    stamps = day2.column("updated_at").to_pylist()
    stamps[0] = "2026-12-01T00:00:00Z"
    day2 = day2.set_column(day2.schema.get_field_index("updated_at"), "updated_at", pa.array(stamps))
    pq.write_table(day2, path)
    second = pipeline.run(cfg)
    assert second["counts"]["processed"] == 1
    manifest2, shown2 = display_of(cfg, second["index_version"])
    reused = set(manifest2["build"]["reused"])
    assert reused and index.owner(manifest2, sorted(reused)[0]) == first["index_version"]  # shards by reference
    for r in day2.to_pylist():
        columns, thumb = shown2[r["product_id"]]
        assert columns["title"] == r["title"][:display.MAX_CHARS]  # today's titles, also in reused categories
        if r["product_id"] == changed:
            assert thumb[0] not in packs1 and thumb[0].split("/")[1] == f"run={second['index_version']}"
        else:
            assert thumb == shown1[r["product_id"]][1]  # unchanged rows keep their thumbnail entry
    # keep_versions=1: the first version is retired; the packs the second names survive, the rest go
    left = {f"{cfg.embed.model_version}/{run}/{n.removesuffix('.bin')}"
            for run in storage.listdir("thumbs", cfg.embed.model_version)
            for n in storage.listdir("thumbs", cfg.embed.model_version, run)}
    assert left == {p for e in manifest2["categories"].values() for p in e["display"]["packs"]}
    assert second["gc"]["thumb_files"] >= 1
