"""Slack messages and dashboard metrics from real pipeline runs on the session's Ray cluster.

A local HTTP server on 127.0.0.1 stands in for Slack: the Web API (``chat.postMessage``,
reached through ``WebClient(base_url=...)``) and an incoming webhook. It records every request,
and can play an outage (503 to everything).
"""
import json
import logging
import shutil
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.csv as pcsv
import pytest

from conftest import make_config
from engine import notify, pipeline, sample
from engine.storage import Storage

TOKEN_ENV = "LOOKALIKE_TEST_SLACK_TOKEN"
WEBHOOK_ENV = "LOOKALIKE_TEST_SLACK_WEBHOOK"


class FakeSlack:
    """Records what Slack would have received; ``outage=True`` answers 503 to everything; ``script``
    plays answers to the next requests first: "429" (rate limited, Retry-After: 1), "drop" (the
    connection closed with no answer)."""

    def __init__(self):
        self.requests: list[dict] = []
        self.outage = False
        self.script: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                outer.requests.append({"path": self.path, "auth": self.headers.get("authorization"),
                                       "body": json.loads(body or b"{}"), "at": time.monotonic()})
                step = outer.script.pop(0) if outer.script else None
                if step == "429":
                    self.send_response(429)
                    self.send_header("retry-after", "1")
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                if step == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if outer.outage:
                    return self._answer(503, b"upstream connect error", "text/plain")
                if self.path == "/api/chat.postMessage":
                    return self._answer(200, json.dumps({"ok": True, "ts": str(time.time())}).encode())
                if self.path.startswith("/hooks/"):
                    return self._answer(200, b"ok", "text/plain")
                self._answer(404, b'{"ok": false, "error": "unknown_method"}')

            def _answer(self, status, body, ctype="application/json"):
                self.send_response(status)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def texts(self) -> list[str]:
        return [r["body"]["text"] for r in self.requests]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class FakePushgateway:
    """Records each push (method, path, body) as a Prometheus Pushgateway would receive it."""

    def __init__(self):
        self.pushes: list[tuple[str, str, bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _record(self):
                outer.pushes.append((self.command, self.path, self.rfile.read(int(self.headers["content-length"]))))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            do_PUT = do_POST = _record

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def samples(self, i: int = -1) -> dict:
        from prometheus_client.parser import text_string_to_metric_families

        return {(s.name, frozenset(s.labels.items())): s.value
                for f in text_string_to_metric_families(self.pushes[i][2].decode()) for s in f.samples}

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def slack():
    server = FakeSlack()
    yield server
    server.close()


@pytest.fixture(scope="module")
def small_catalog(tmp_path_factory):
    """30 real products plus a truncated image and a missing file: 2 rejects in 32 rows (6.25%)."""
    return sample.make_catalog(tmp_path_factory.mktemp("notify-catalog"), 30, seed=11, broken=2)


@pytest.fixture(scope="module")
def succeeded(ray_cluster, published, small_catalog, tmp_path_factory):
    """A run through the bot-token transport, on a store whose LATEST is the session's published index."""
    server, gateway = FakeSlack(), FakePushgateway()
    root = tmp_path_factory.mktemp("notify-store")
    base_cfg, base_rep = published
    shutil.copytree(Storage(base_cfg.storage.root).path("indexes"), root / "indexes")
    cfg = make_config(small_catalog, root, f"notify.token_env={TOKEN_ENV}", "notify.channel='#lookalike-ops'",
                      f"notify.base_url={server.url}/api/", "notify.environment=test",
                      "notify.stage_budgets_s={download_embed_store: 0.001, index: 3600}",
                      f"notify.pushgateway_url={gateway.url}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(TOKEN_ENV, "xoxb-test-token")
        rep = pipeline.run(cfg)
    server.close()
    gateway.close()
    return cfg, rep, server.requests, base_rep, gateway


def test_succeeding_run_says_started_slow_stage_rejects_and_summary_in_order(succeeded):
    cfg, rep, requests, base_rep, _ = succeeded
    assert rep["status"] == "published"
    assert all(r["path"] == "/api/chat.postMessage" and r["auth"] == "Bearer xoxb-test-token"
               and r["body"]["channel"] == "#lookalike-ops" for r in requests)
    texts = [r["body"]["text"] for r in requests]
    assert len(texts) == 4, texts
    started, slow, rejects, done = texts
    run = rep["run_id"]
    assert started.startswith(":arrow_forward: [test] Lookalike run") and f"`{run}` started" in started
    assert cfg.embed.model_version in started and cfg.source.path in started

    assert f"run `{run}`: stage `download_embed_store`" in slow and "budget of 0.001s" in slow
    assert "notify.stage_budgets_s.download_embed_store" in slow
    assert "stage `index`" not in "".join(texts)  # within its budget: nothing said

    assert "reject ratio 6.2% (2 of 32 rows)" in rejects and "ceiling 5.0%" in rejects
    assert "decode_error 1" in rejects and "not_found 1" in rejects and rep["rejects_uri"] in rejects

    assert done.startswith(f":white_check_mark: [test] Lookalike run `{run}` published index `{rep['index_version']}`")
    assert f"Changes vs `{base_rep['index_version']}`: " in done
    for category, n in rep["categories"].items():
        assert f"{category} {n} ({n - base_rep['categories'][category]:+d})" in done
    assert "rows 32: ok 30, rejected 2" in done and "rejects: decode_error 1, not_found 1" in done
    assert "stages: connect" in done and "download_embed_store" in done and rep["report_uri"] in done
    assert f"published {rep['index_version']}" in done


def test_failing_run_says_stage_error_and_where_the_logs_are(ray_cluster, slack, tmp_path, monkeypatch):
    rows = [{"product_id": f"p{i}", "image_url": f"file://{tmp_path}/missing-{i}.png", "category": "tops"}
            for i in range(5)]
    catalog = tmp_path / "catalog.csv"
    pcsv.write_csv(pa.Table.from_pylist(rows), catalog)
    monkeypatch.setenv(WEBHOOK_ENV, f"{slack.url}/hooks/T000/B000/XXXX")
    cfg = make_config(str(catalog), tmp_path / "store", f"notify.slack_webhook_env={WEBHOOK_ENV}",
                      "notify.environment=prod", "notify.logs_url=https://logs.example.test/q?run={run_id}",
                      "download.user_agent=lookalike-test (+https://lookalike.example.test/contact)")
    with pytest.raises(pipeline.RunFailed) as failed:
        pipeline.run(cfg)
    rep = failed.value.report
    assert [r["path"] for r in slack.requests] == ["/hooks/T000/B000/XXXX"] * 3
    started, rejects, fail = slack.texts()
    assert started.startswith(":arrow_forward: [prod] Lookalike run") and f"`{rep['run_id']}` started" in started
    assert "reject ratio 100.0% (5 of 5 rows)" in rejects and "not_found 5" in rejects
    assert fail.startswith(f":x: [prod] Lookalike run `{rep['run_id']}` FAILED in stage `download_embed_store`: "
                           "no image could be processed; nothing to index")
    logs = fail.split("\n")[1]
    assert logs.startswith("Logs: https://logs.example.test/q?run=" + rep["run_id"])
    assert f"report {rep['report_uri']}" in logs and f"rejected rows {rep['rejects_uri']}" in logs
    assert "rows 5: ok 0, rejected 5" in fail


def test_slack_outage_never_fails_a_run(ray_cluster, slack, tmp_path, monkeypatch, caplog):
    slack.outage = True
    monkeypatch.setenv(TOKEN_ENV, "xoxb-test-token")
    cfg = make_config(str(tmp_path / "no-such-catalog.parquet"), tmp_path / "store",
                      f"notify.token_env={TOKEN_ENV}", "notify.channel='#ops'", f"notify.base_url={slack.url}/api/",
                      "notify.retries=2", "notify.retry_wait_s=0")
    with caplog.at_level(logging.WARNING, logger="engine.notify"), pytest.raises(pipeline.RunFailed) as failed:
        pipeline.run(cfg)
    assert "no such file" in str(failed.value)  # the run's own error, not Slack's
    assert len(slack.requests) == 2 * 3  # started + failed, each 1 + notify.retries attempts
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("not sent after 3 attempts" in w for w in warnings)


@pytest.mark.parametrize("transport", ["token", "webhook"])
def test_rate_limit_waits_retry_after_and_connection_errors_are_retried(slack, tmp_path, monkeypatch, transport):
    """slack_sdk's retry handlers: 429 + Retry-After: 1, then a dropped connection, then 200: one message."""
    monkeypatch.setenv(TOKEN_ENV, "xoxb-test-token")
    monkeypatch.setenv(WEBHOOK_ENV, f"{slack.url}/hooks/T1/B1/X")
    sets = ([f"notify.token_env={TOKEN_ENV}", "notify.channel='#ops'", f"notify.base_url={slack.url}/api/"]
            if transport == "token" else [f"notify.slack_webhook_env={WEBHOOK_ENV}"])
    n = notify.Notifier(make_config("c.parquet", tmp_path, *sets, "notify.retries=2", "notify.retry_wait_s=0").notify)
    slack.script = ["429", "drop"]
    assert n.send("hello after a rate limit") is True
    assert [r["body"]["text"] for r in slack.requests] == ["hello after a rate limit"] * 3
    assert slack.requests[1]["at"] - slack.requests[0]["at"] >= 1.0, "Retry-After: 1 not honoured"
    slack.requests.clear()
    slack.script = ["429", "429", "429"]
    assert n.send("given up") is False and len(slack.requests) == 3  # 1 + notify.retries


def test_token_from_a_mounted_secret_file(slack, tmp_path):
    secret = tmp_path / "slack-token"
    secret.write_text("xoxb-from-secret-file\n")
    cfg = make_config("c.parquet", tmp_path, f"notify.token_file={secret}", "notify.channel='#ops'",
                      f"notify.base_url={slack.url}/api/")
    n = notify.Notifier(cfg.notify)
    assert n.enabled and str(secret) in n.transport
    assert n.send("hello") is True
    assert slack.requests[0]["auth"] == "Bearer xoxb-from-secret-file"


def test_no_credentials_means_off_said_once(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.setattr(notify, "_said_off", False)
    cfg = make_config("c.parquet", tmp_path, f"notify.token_env={TOKEN_ENV}", "notify.channel='#ops'",
                      f"notify.token_file={tmp_path}/absent")
    with caplog.at_level(logging.INFO, logger="engine.notify"):
        first, second = notify.Notifier(cfg.notify), notify.Notifier(cfg.notify)
    assert not first.enabled and not second.enabled and first.send("x") is False
    said = [r.getMessage() for r in caplog.records if "notifications off" in r.getMessage()]
    assert said == [f"Slack notifications off: no bot token (${TOKEN_ENV} or {tmp_path}/absent) "
                    f"and no webhook (nothing configured)"]


def test_token_without_channel_is_a_config_error(tmp_path):
    from engine.config import ConfigError

    with pytest.raises(ConfigError, match="notify.channel is required"):
        make_config("c.parquet", tmp_path, "notify.token_env=SLACK_BOT_TOKEN")


# -- metrics: the same run, read back from the node's Prometheus endpoint --------------------------

def scrape(port: int) -> dict:
    """{(name, frozenset(labels)): value} from a node's metrics export port."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("ray_lookalike_"):
                keep = {k: v for k, v in s.labels.items() if k in ("model_version", "outcome", "reason", "stage",
                                                                   "category", "status", "route", "le", "index_version")}
                key = (s.name, frozenset(keep.items()))
                out[key] = out.get(key, 0) + s.value  # summed over workers
    return out


def wait_for_port(port, check, timeout_s=60):
    """Metrics reach the endpoint on Ray's export interval (a few seconds): poll until they do."""
    deadline = time.monotonic() + timeout_s
    while True:
        seen = scrape(port)
        if check(seen) or time.monotonic() > deadline:
            return seen
        time.sleep(1)


def wait_for(check, timeout_s=60):
    """The same, on the session cluster's (single) node."""
    import ray

    return wait_for_port(ray.nodes()[0]["MetricsExportPort"], check, timeout_s)


def test_run_metrics_reach_the_dashboard_endpoint(succeeded, ray_cluster):
    cfg, rep, _, _, _ = succeeded
    mv = cfg.embed.model_version

    def value(seen, name, **labels):
        return seen.get((name, frozenset({"model_version": mv, **labels}.items())))

    def ready(seen):
        return all(value(seen, "ray_lookalike_index_items", category=c) == n for c, n in rep["categories"].items())

    seen = wait_for(ready)
    assert ready(seen), sorted(k for k in seen if "index_items" in k[0])
    # Counters add up every run this driver made in the session; this run alone is at least this much.
    assert value(seen, "ray_lookalike_rows_total", outcome="ok") >= 30
    assert value(seen, "ray_lookalike_rejects_total", reason="not_found") >= 1
    assert value(seen, "ray_lookalike_runs_total", status="published") >= 1
    assert value(seen, "ray_lookalike_index_bytes", category="shoes") > 0
    assert value(seen, "ray_lookalike_stage_items_per_second", stage="download_embed_store") > 0
    assert value(seen, "ray_lookalike_stage_seconds", stage="index") >= 0


def test_held_gauges_are_set_again_until_released(monkeypatch):
    """Ray drops a gauge series ~25 s after its last set: held ones are set again while the
    process lives; a released one (a category the new index no longer has) stops."""
    from engine import metrics

    class Gauge:
        def __init__(self):
            self.sets = []

        def set(self, value, tags=None):
            self.sets.append((value, tags["category"]))

    monkeypatch.setattr(metrics, "HOLD_EVERY_S", 0.05)
    monkeypatch.setattr(metrics, "_ray_ready", lambda: True)
    monkeypatch.setattr(metrics, "_held", {})
    g = Gauge()
    metrics.hold(g, "items", 7, {"category": "shoes"})
    metrics.hold(g, "items", 3, {"category": "bags"})
    metrics.hold(g, "items", 8, {"category": "shoes"})  # replaces shoes' value
    deadline = time.monotonic() + 15
    while g.sets.count((3, "bags")) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert g.sets.count((3, "bags")) >= 3 and g.sets.count((8, "shoes")) >= 3
    assert g.sets.count((7, "shoes")) == 1  # set once, then replaced
    metrics.release("items", lambda tags: tags["category"] == "shoes")
    time.sleep(0.2)
    bags, shoes = g.sets.count((3, "bags")), g.sets.count((8, "shoes"))
    time.sleep(0.3)
    assert g.sets.count((3, "bags")) == bags and g.sets.count((8, "shoes")) > shoes


# -- the Pushgateway: the run's final numbers outlive its cluster ----------------------------------

def test_finished_run_is_pushed_to_the_pushgateway(succeeded):
    cfg, rep, _, _, gateway = succeeded
    assert len(gateway.pushes) == 1
    method, path, _ = gateway.pushes[0]
    assert method == "PUT" and path == f"/metrics/job/lookalike_pipeline/model_version/{cfg.embed.model_version}"
    got = gateway.samples()

    def value(name, **labels):
        return got[(name, frozenset(labels.items()))]

    for outcome, n in rep["counts"].items():
        assert value("lookalike_run_rows", outcome=outcome) == n
    assert value("lookalike_run_rejects", reason="not_found") == rep["rejects_by_reason"]["not_found"] == 1
    for stage, st in rep["stages"].items():
        assert value("lookalike_run_stage_seconds", stage=stage) == st["seconds"]
    assert value("lookalike_run_stage_items_per_second", stage="download_embed_store") == \
        rep["stages"]["download_embed_store"]["items_per_s"] > 0
    assert value("lookalike_run_success") == 1 and value("lookalike_run_status", status="published") == 1
    assert value("lookalike_run_elapsed_seconds") == rep["elapsed_s"]
    assert value("lookalike_run_info", run_id=rep["run_id"], index_version=rep["index_version"]) == 1


def test_failed_run_is_pushed_as_a_failure_and_a_dead_gateway_fails_nothing(ray_cluster, tmp_path, caplog):
    from conftest import free_port

    gateway = FakePushgateway()
    try:
        cfg = make_config(str(tmp_path / "absent.parquet"), tmp_path / "store", f"notify.pushgateway_url={gateway.url}")
        with pytest.raises(pipeline.RunFailed):
            pipeline.run(cfg)
        got = gateway.samples()
        assert got[("lookalike_run_success", frozenset())] == 0
        assert got[("lookalike_run_status", frozenset({"status": "failed"}.items()))] == 1
    finally:
        gateway.close()
    dead = make_config(str(tmp_path / "absent.parquet"), tmp_path / "store",
                       f"notify.pushgateway_url=http://127.0.0.1:{free_port()}")
    with caplog.at_level(logging.WARNING, logger="engine.report"), pytest.raises(pipeline.RunFailed) as failed:
        pipeline.run(dead)
    assert "no such file" in str(failed.value)  # the run's own error, not the gateway's
    assert any("RunPush.on_finish failed" in r.getMessage() for r in caplog.records)


def test_report_slack_and_pushgateway_say_where_the_time_goes(succeeded):
    """Item: per stage the measured rate and the whole catalog's projected time; the bounding stage named."""
    cfg, rep, requests, _, gateway = succeeded
    on_disk = Storage(cfg.storage.root).read_json("runs", rep["run_id"], "report.json")
    proj = on_disk["projection"]
    assert proj == rep["projection"] and proj["catalog_rows"] == rep["counts"]["rows_in"] == 32
    stages = proj["stages"]
    assert {"read", "plan", "download", "embed", "store", "index"} <= set(stages)
    assert stages["embed"]["workers"] == cfg.embed.actors and stages["download"]["workers"] == cfg.download.actors * 4
    for name, st in stages.items():
        if name != "index":
            assert st["rows"] >= 30 and st["rate_per_s"] > 0
            assert st["projected_s"] == pytest.approx(32 / st["rate_per_s"], abs=0.06), name
    streaming = {k: v["projected_s"] for k, v in stages.items() if k != "index"}
    assert streaming[proj["bounding_stage"]] == max(streaming.values())  # ties: the report compares unrounded
    done = requests[-1]["body"]["text"]
    assert f"bounded by {proj['bounding_stage']}" in done
    assert f"embed {stages['embed']['rate_per_s']:.1f}/s x{cfg.embed.actors}" in done or \
        f"embed {stages['embed']['rate_per_s']:.0f}/s x{cfg.embed.actors}" in done
    pushed = gateway.samples()
    for name, st in stages.items():
        assert pushed[("lookalike_run_projected_seconds", frozenset({"stage": name}.items()))] == st["projected_s"]
