"""Deletes and upserts between daily runs, end to end: the pipeline on the local Ray cluster, the
service running, `lookalike delete` and `lookalike update` against it, then the next daily run."""
import io
import json
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import free_port, make_config
from engine import demo, index, tombstones
from engine.cli import main as cli
from engine.storage import Storage

K = 10


@pytest.fixture(scope="module")
def store(ray_cluster, sample_catalog, tmp_path_factory):
    """Its own store (this module changes it): one daily run over the sample catalog."""
    from engine import pipeline

    root = tmp_path_factory.mktemp("fresh-store")
    cfg = make_config(sample_catalog, root)
    rep = pipeline.run(cfg)
    return root, rep


@pytest.fixture(scope="module")
def service(store, sample_catalog):
    from ray import serve

    from serve import app

    root, rep = store
    cfg = make_config(sample_catalog, root, f"serve.port={free_port()}", "serve.poll_interval_s=0.5",
                      "serve.reload_interval_s=0.5", "serve.swap_grace_s=1")
    serve.shutdown()
    base = app.start(cfg)
    yield base, cfg
    serve.shutdown()


@pytest.fixture(scope="module")
def catalog(sample_catalog):
    return {r["product_id"]: r for r in pq.read_table(sample_catalog).to_pylist() if r["product_id"]}


def get(url):
    return demo.http_json("GET", url)


def similar(base, pid, k=K):
    return get(f"{base}/similar/{urllib.parse.quote(pid, safe='')}?k={k}")


def post_image(base, path, k=K):
    body = open(urllib.request.url2pathname(urllib.parse.urlparse(path).path), "rb").read()
    req = urllib.request.Request(f"{base}/search?k={k}", data=body, method="POST",
                                 headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def wait_for(condition, what, limit_s=180.0, show=None):
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {show() if show else ''}"
        time.sleep(0.25)


def ids_of(answer):
    return [r["product_id"] for r in answer["results"]]


def run_cli(*argv):
    import contextlib

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli(list(argv))
    assert code == 0 and out.getvalue().strip(), f"lookalike {argv[0]}: exit {code}: {err.getvalue()[-2000:]}"
    return code, out.getvalue()


def _config_file(tmp_path, cfg):
    path = tmp_path / "fresh.yaml"
    base = Path(__file__).resolve().parent.parent / "configs" / "local.yaml"
    path.write_text(json.dumps({"extends": str(base), "source": {"path": cfg.source.path},
                                "storage": {"root": cfg.storage.root},  # images stay beside the first catalog:
                                "download": {"file_roots": [str(Path(cfg.source.path).parent)]},
                                "index": {"validate": {"sample": 200},
                                          "filter_columns": cfg.index.model_dump(mode="json")["filter_columns"]}}))
    return str(path)


def test_delete_update_and_the_next_daily_run(service, store, catalog, sample_catalog, tmp_path):
    from engine import pipeline

    base, cfg = service
    root, first = store
    storage = Storage(str(root))
    mv = cfg.embed.model_version
    v1 = first["index_version"]
    assert get(base + "/healthz")[1]["index_version"] == v1
    ok = sorted(pid for pid, r in catalog.items() if r["label"] not in ("broken", "x")
                and similar(base, pid)[0] == 200)
    query = next(p for p in ok if catalog[p]["category"] == "tops")
    status, before = similar(base, query)
    assert status == 200 and len(before["results"]) == K
    # -- delete: three of the query's neighbours and one other product; an unknown id is reported
    victims = ids_of(before)[:3] + [next(p for p in ok if catalog[p]["category"] == "shoes")]
    conf = _config_file(tmp_path, cfg)
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("\n".join(victims[1:]) + "\nno-such-product\n")
    code, out = run_cli("delete", "--config", conf, victims[0], "--from", str(ids_file))
    report = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and report["deleted"] == 4 and report["unknown"] == ["no-such-product"]
    assert report["index_version"] == v1
    wait_for(lambda: similar(base, victims[3])[0] == 404, "a deleted product to 404")
    wait_for(lambda: not set(ids_of(similar(base, query)[1])) & set(victims), "deletes to leave /similar")
    after = similar(base, query)[1]
    assert len(after["results"]) == K and after["index_version"] == v1  # k answered, from the same index
    assert ids_of(after)[:K - 3] == [p for p in ids_of(before) if p not in victims][:K - 3]
    found = post_image(base, catalog[query]["image_url"], k=20)
    answered = {r["product_id"] for o in found["objects"] for r in o["results"]}
    assert answered and not answered & set(victims)
    assert all(len(o["results"]) == 20 for o in found["objects"])
    # -- update: one changed product (now showing another's photo), one new product, one unchanged
    changed, twin = next(p for p in ok if p not in victims and catalog[p]["category"] == "bags"), None
    twin = next(p for p in ok if p not in victims and p != changed and catalog[p]["category"] == "bags"
                and similar(base, p)[1]["results"][0]["product_id"] != changed)
    rows = [{**catalog[changed], "image_url": catalog[twin]["image_url"], "updated_at": "2026-12-01T00:00:00Z"},
            {**catalog[twin], "product_id": "new-0001", "updated_at": "2026-12-01T00:00:00Z"},
            catalog[query]]
    schema = pq.read_schema(sample_catalog)
    update_file = tmp_path / "update.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), update_file)
    code, out = run_cli("update", "--config", conf, "--set", f"source.path={update_file}")
    up = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and up["status"] == "published", out
    assert up["counts"]["processed"] == 2 and up["delta"]["superseded"] == 1 and up["delta"]["rows"] == 2
    v2 = up["index_version"]
    m2 = index.read_manifest(storage, mv, v2)
    deltas = [e for e in m2["categories"]["bags"]["shards"] if e.get("delta")]
    assert [e["count"] for e in deltas] == [2] and all(e["version"] == v2 for e in deltas)
    base_shards = [e for e in m2["categories"]["tops"]["shards"]]
    assert index.shard_prefix(m2, "tops", base_shards[0])[-1] == v1  # served by reference, not copied
    wait_for(lambda: get(base + "/healthz")[1]["index_version"] == v2, "the update to be served",
             show=lambda: get(base + "/version"))
    status, new = similar(base, "new-0001")
    assert status == 200 and new["results"][0]["product_id"] == twin and new["results"][0]["score"] > 0.999
    status, moved = similar(base, changed)
    assert status == 200 and moved["results"][0]["score"] > 0.999
    assert moved["results"][0]["product_id"] in (twin, "new-0001")  # its new vector: the twin's photo
    twins = similar(base, twin, k=K)[1]
    assert ids_of(twins).count(changed) == 1  # the old vector is masked, the new one answers
    assert {changed, "new-0001"} <= set(ids_of(twins)[:2])
    assert similar(base, victims[3])[0] == 404  # deletes carried into the update's version
    assert not set(ids_of(similar(base, query)[1])) & set(victims)
    # -- the next daily run: the catalog (with the update's rows) still lists the deleted products as they were
    full = [r for pid, r in catalog.items() if pid != changed] + rows[:2]
    malformed = [r for r in pq.read_table(sample_catalog).to_pylist() if not r["product_id"]]
    daily = tmp_path / "daily.parquet"
    pq.write_table(pa.Table.from_pylist(full + malformed, schema=schema), daily)
    rep = pipeline.run(cfg.model_copy(update={"source": cfg.source.model_copy(update={"path": str(daily)})}))
    v3 = rep["index_version"]
    assert rep["plan"]["deletes_folded"] == 4, rep["plan"]
    # nothing embedded again: the only rows processed are the broken images every run retries
    assert rep["counts"]["ok"] == 0 and rep["counts"]["processed"] == rep["counts"]["rejected"], rep["counts"]
    assert rep["counts"]["indexed"] == first["counts"]["indexed"] - 4 + 1
    m3 = index.read_manifest(storage, mv, v3)
    assert not [e for c in m3["categories"].values() for e in c["shards"] if e.get("delta")]  # merged
    assert tombstones.names(storage, mv, v3) == []  # starts clean
    wait_for(lambda: get(base + "/healthz")[1]["index_version"] == v3, "the daily run to be served",
             show=lambda: get(base + "/version"))
    assert all(similar(base, v)[0] == 404 for v in victims)
    assert similar(base, "new-0001")[1]["results"][0]["product_id"] == twin
    assert ids_of(similar(base, twin)[1]).count(changed) == 1
    assert len(similar(base, query)[1]["results"]) == K
