"""Hot swap under continuous requests: every answer from exactly one index version, none dropped.

Two searcher groups hold the shards; queries that span categories need both, so a swap that
switched the groups at different moments would show up as answers matching neither version.
Each answer is compared with what its claimed version gives for that query, computed here from
the same index files.
"""
import http.client
import io
import json
import os
import threading
import time

import numpy as np
import pytest
from PIL import Image

from conftest import free_port
from engine import index, publish, synthetic
from engine.config import IndexConfig
from engine.storage import Storage

MV = "effnet-lite0-512-v1"
DIM = 32
SIZES = {"tops": 1500, "bags": 600, "shoes": 900}
TOKEN_ENV, TOKEN = "LOOKALIKE_TEST_TOKEN", "test-token-0d6f1c"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
K = 5


@pytest.fixture(scope="module")
def versions(ray_cluster, tmp_path_factory):
    """v1; v2 = the same products with moved vectors (different answers); v3 = v2 with a corrupt shard."""
    root = tmp_path_factory.mktemp("swap-store")
    storage = Storage(str(root))
    clusters = synthetic.Clusters(DIM, clusters=40, local_dim=5, spread=0.5, noise=0.1, decay=0.0, seed=1)
    vectors = {}
    synthetic.make_run(storage, MV, "r1", SIZES, DIM, clusters, vectors_out=vectors)
    rng = np.random.default_rng(2)
    for cat, vecs in vectors.items():
        synthetic.write_features(storage, MV, "r2", cat, [f"{cat}-{i:07d}" for i in range(len(vecs))],
                                 synthetic.perturb(vecs, 0.8, rng))
    cfg = IndexConfig(max_shard_size=500, n_trees=10, search_k=3000)
    for run, version in (("r1", "v1"), ("r2", "v2")):
        index.build(storage.root, MV, run, version, cfg)
    import shutil

    shutil.copytree(storage.path("indexes", MV, "v2"), storage.path("indexes", MV, "v3"))
    m = storage.read_json("indexes", MV, "v3", index.MANIFEST)
    storage.write_json({**m, "index_version": "v3"}, "indexes", MV, "v3", index.MANIFEST)
    victim = storage.path("indexes", MV, "v3", "shoes", "shard-001.ann")
    data = bytearray(open(victim, "rb").read())
    data[100:164] = bytes(64)
    open(victim, "wb").write(bytes(data))
    publish.publish(storage, MV, "v1", keep=10)
    return storage


@pytest.fixture(scope="module")
def expected(versions):
    """query -> version -> the set of product_ids that version answers."""
    storage = versions
    rng = np.random.default_rng(5)
    queries = [(f"{cat}-{i:07d}", cats) for cat, n in SIZES.items() for i in rng.choice(n, 20, replace=False)
               for cats in (None, "tops,bags,shoes")]
    out = {}
    for v in ("v1", "v2"):
        loaded = index.LoadedIndex.load(storage, MV, v, cache_dir=storage.path("cache"))
        for pid, cats in queries:
            loc = loaded.locate(pid)
            hits = loaded.search(loaded.vector(loc), K, cats.split(",") if cats else [loc.category], exclude=pid)
            out.setdefault((pid, cats), {})[v] = {h["product_id"] for h in hits}
        loaded.close()
    differ = sum(a["v1"] != a["v2"] for a in out.values())
    assert differ > 0.7 * len(out)  # the check below can tell the versions apart
    return out


@pytest.fixture(scope="module")
def service(versions):
    from ray import serve

    from conftest import make_config
    from serve import app

    storage = versions
    os.environ[TOKEN_ENV] = TOKEN
    cfg = make_config("unused.parquet", storage.root, f"serve.port={free_port()}", "serve.searcher_groups=2",
                      "serve.searcher_replicas=2",
                      "serve.reload_interval_s=0.2", "serve.swap_grace_s=1", "serve.retry_refused_s=600",
                      f"serve.auth_token_env={TOKEN_ENV}", f"embed.dim={DIM}", "serve.max_image_pixels=250000")
    serve.shutdown()  # another module's Serve instance may hold a different port
    base = app.start(cfg)
    yield base, cfg
    serve.shutdown()


def wait_for(condition, what: str, limit_s: float = 240.0) -> None:
    """Poll until ``condition()``; the limit only stops a broken build from hanging CI."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.2)


class Load:
    """Threads sending /similar queries back to back over keep-alive connections, checking each answer."""

    def __init__(self, base: str, expected: dict, threads: int = 4):
        self.host, self.port = base.split("//")[1].split(":")
        self.expected, self.queries = expected, list(expected)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.seen = {}  # version -> answers
        self.errors, self.mixed, self.backwards = [], [], 0
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def count(self, version: str) -> int:
        return self.seen.get(version, 0)

    def _run(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        conn = http.client.HTTPConnection(self.host, int(self.port), timeout=60)
        last = None
        while not self.stop.is_set():
            pid, cats = self.queries[rng.integers(len(self.queries))]
            url = f"/similar/{pid}?k={K}" + (f"&category={cats}" if cats else "")
            try:
                conn.request("GET", url, headers=AUTH)
                resp = conn.getresponse()
                status, body = resp.status, json.loads(resp.read())
            except Exception as exc:  # noqa: BLE001 - a dropped request is what this test counts
                with self.lock:
                    self.errors.append(f"{url}: {type(exc).__name__}: {exc}")
                conn.close()
                conn = http.client.HTTPConnection(self.host, int(self.port), timeout=60)
                continue
            with self.lock:
                if status != 200:
                    self.errors.append(f"{url}: HTTP {status}: {body}")
                    continue
                v = body["index_version"]
                self.seen[v] = self.seen.get(v, 0) + 1
                got = {r["product_id"] for r in body["results"]}
                if got != self.expected[(pid, cats)].get(v):
                    self.mixed.append((url, v, sorted(got)))
                self.backwards += last is not None and v != last and last == "v2" and v == "v1"
                last = v


def get(base, path, headers=AUTH):
    host, port = base.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("GET", path, headers=headers)
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read()), dict(resp.getheaders())


def searchers_loaded():
    from ray import serve

    return [serve.get_deployment_handle(f"Searcher{g}", app_name="lookalike").loaded.remote().result()
            for g in range(2)]


def test_swap_under_continuous_requests_has_no_errors_and_no_mixed_versions(service, versions, expected):
    base, cfg = service
    assert get(base, "/healthz", {})[1] == {"status": "ok", "index_version": "v1"}
    with Load(base, expected) as load:
        wait_for(lambda: load.count("v1") >= 100, "100 answers from v1")
        publish.publish(versions, MV, "v2", keep=10)
        wait_for(lambda: load.count("v2") >= 200, "200 answers from v2 after publishing it")
    assert load.errors == [] and load.mixed == []
    assert load.count("v1") >= 100 and load.count("v2") >= 200 and set(load.seen) == {"v1", "v2"}
    assert load.backwards == 0  # once a client got v2, it never got v1 again
    status, body, _ = get(base, "/version")
    assert status == 200 and body["index_version"] == "v2" and body["latest"] == "v2" and body["last_error"] is None
    assert body["counts"] == SIZES and body["shards"] == {"bags": 2, "shoes": 2, "tops": 3}
    assert body["replicas_prepared"] == {"0": 2, "1": 2}  # every replica of every group, before the switch
    # the old version is unloaded only after the switch, once idle past the grace period
    wait_for(lambda: all(s["loaded"] == ["v2"] for s in searchers_loaded()), "searchers to unload v1")


def test_a_bad_new_version_is_refused_and_the_old_keeps_serving(service, versions, expected):
    base, cfg = service
    with Load(base, expected) as load:
        wait_for(lambda: load.count("v2") >= 50, "answers from v2")
        publish.publish(versions, MV, "v3", keep=10)
        wait_for(lambda: get(base, "/healthz", {})[1]["status"] == "degraded", "/healthz to report the refusal")
        before = load.count("v2")
        wait_for(lambda: load.count("v2") >= before + 100, "100 more answers from v2")
    assert load.errors == [] and load.mixed == [] and set(load.seen) == {"v2"}
    # /healthz is open, so it says only status and version; why, on /version behind the token
    assert get(base, "/healthz", {})[:2] == (200, {"status": "degraded", "index_version": "v2"})
    status, body, _ = get(base, "/version")
    assert body["refused"]["version"] == "v3"
    assert "shoes/shard-001.ann: checksum mismatch" in body["refused"]["reason"]
    assert body["index_version"] == "v2" and body["latest"] == "v3" and "checksum mismatch" in body["last_error"]
    # rolling LATEST back to a good version is followed again, under load
    with Load(base, expected) as load:
        publish.publish(versions, MV, "v1", keep=10)
        wait_for(lambda: load.count("v1") >= 100, "answers from v1 after rolling back")
    assert load.errors == [] and load.mixed == []
    assert get(base, "/healthz", {})[1] == {"status": "ok", "index_version": "v1"}


def test_bearer_token_is_required_except_for_healthz(service):
    base, _ = service
    status, body, headers = get(base, "/similar/tops-0000001", {})
    assert status == 401 and "bearer token" in body["error"] and headers.get("www-authenticate") == "Bearer"
    assert get(base, "/similar/tops-0000001", {"Authorization": "Bearer wrong"})[0] == 401
    assert get(base, "/similar/tops-0000001", {"Authorization": TOKEN})[0] == 401  # no scheme
    assert get(base, "/version", {})[0] == 401
    assert get(base, "/healthz", {})[0] == 200
    status, body, _ = get(base, f"/similar/tops-0000001?k={K}")
    assert status == 200 and len(body["results"]) == K


def test_inputs_are_bounded(service):
    base, cfg = service
    assert get(base, "/similar/tops-0000001?k=0")[0] == 400
    assert get(base, f"/similar/tops-0000001?k={cfg.serve.max_k + 1}")[0] == 400
    assert get(base, "/similar/no-such-product")[0] == 404
    assert get(base, "/similar/tops-0000001?category=hats")[0] == 404
    big = io.BytesIO()
    Image.new("RGB", (600, 600), "white").save(big, "PNG")  # 360k pixels > serve.max_image_pixels
    host, port = base.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/search", big.getvalue(), {**AUTH, "Content-Type": "image/png"})
    resp = conn.getresponse()
    body = json.loads(resp.read())
    assert resp.status == 413 and "too_many_pixels" in body["error"] and "Traceback" not in json.dumps(body)
