"""The search service's metrics on the Ray dashboard's Prometheus endpoint: latency per route and
status class, and the index version each replica serves."""
import pytest

from conftest import free_port
from engine import demo
from test_notify import wait_for


@pytest.fixture(scope="module")
def service(published):
    from ray import serve

    from serve import app

    cfg, rep = published
    serve.shutdown()  # a Serve instance left by an earlier module keeps its own HTTP port
    cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"port": free_port()})})
    base = app.start(cfg)
    yield base, cfg, rep
    serve.shutdown()


def test_latency_histogram_and_index_version(service, sample_catalog):
    import pyarrow.parquet as pq

    base, cfg, rep = service
    product = pq.read_table(sample_catalog, columns=["product_id"]).column(0)[0].as_py()
    assert demo.http_json("GET", base + "/healthz")[0] == 200
    for _ in range(2):
        assert demo.http_json("GET", f"{base}/similar/{product}?k=3")[0] == 200
    for _ in range(3):
        assert demo.http_json("GET", base + "/similar/no-such-product?k=3")[0] == 404

    def count(seen, route, status_class, suffix="count", **more):
        labels = {"route": route, "status": status_class, **more}
        return seen.get((f"ray_lookalike_search_latency_seconds_{suffix}", frozenset(labels.items())), 0)

    version = ("ray_lookalike_index_version_info",
               frozenset({"model_version": cfg.embed.model_version, "index_version": rep["index_version"]}.items()))

    def ready(seen):  # counts add up every replica this session ran, so at least ours
        return (count(seen, "similar", "2xx") >= 2 and count(seen, "similar", "4xx") >= 3
                and count(seen, "healthz", "2xx") >= 1 and seen.get(version, 0) >= 1)

    seen = wait_for(ready)
    assert ready(seen), {k: v for k, v in seen.items() if "latency_seconds_count" in k[0] or "version" in k[0]}
    n = count(seen, "similar", "2xx")
    assert count(seen, "similar", "2xx", "bucket", le="+Inf") == n
    assert 0 < count(seen, "similar", "2xx", "sum") < n * 10  # seconds, not milliseconds
