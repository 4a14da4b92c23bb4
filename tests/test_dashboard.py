"""cluster/grafana/lookalike.json: loadable as is, and every metric it queries is one something exports."""
import json
import re
from pathlib import Path

from engine import metrics

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "cluster" / "grafana" / "lookalike.json"
PROMQL_WORDS = {"sum", "by", "rate", "max", "avg", "time", "histogram_quantile", "le", "route", "status", "stage",
                "outcome", "reason", "category", "deployment", "model_version", "index_version", "ray_io_cluster"}


def ray_exported() -> set[str]:
    """Names as Prometheus scrapes the ray.util.metrics objects in engine/metrics.py."""
    text = (ROOT / "engine" / "metrics.py").read_text()
    names = set()
    for kind, name in re.findall(r'\b(Counter|Gauge|Histogram)\("(\w+)"', text):
        base = f"ray_{name}"
        names |= {base + "_total"} if kind == "Counter" else {base} if kind == "Gauge" else {
            base + s for s in ("_bucket", "_count", "_sum")}
    return names


def pushed() -> set[str]:
    """Names in what RunPush sends, from a real registry of a finished run."""
    data = {"run_id": "r", "model_version": "m", "status": "published", "index_version": "v", "elapsed_s": 1.0,
            "counts": {"rows_in": 2, "ok": 1, "rejected": 1}, "rejects_by_reason": {"not_found": 1},
            "stages": {"index": {"seconds": 1.0, "items_per_s": 2.0}},
            "projection": {"stages": {"embed": {"projected_s": 3.0}}}}
    return {m.name for m in metrics.run_registry(data).collect()}


def ray_builtin(name: str) -> bool:
    """A Ray or Serve metric defined in the installed Ray (scraped with a ray_ prefix)."""
    import ray

    bare = re.sub(r"_(total|bucket|count|sum)$", "", name[len("ray_"):])
    base = Path(ray.__file__).parent
    files = [*(base / "serve" / "_private").rglob("*.py"), base / "dashboard" / "modules" / "reporter" / "reporter_agent.py"]
    return any(f'"{bare}"' in p.read_text(errors="ignore") for p in files)


def test_dashboard_loads_and_queries_only_exported_metrics():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 30
    assert [v["name"] for v in dash["templating"]["list"]] == ["datasource"]
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len(panels) >= 15 and len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    ours, pushed_names = ray_exported(), pushed()
    used = set()
    for p in panels:
        assert p["targets"], p["title"]
        assert p["datasource"]["uid"] == "${datasource}"
        for t in p["targets"]:
            expr = re.sub(r'"[^"]*"', "", re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", t["expr"]))
            used |= {w for w in re.findall(r"[a-z_][a-z0-9_]*", expr) if w not in PROMQL_WORDS}
    assert used, "no metric names found"
    unknown = {n for n in used if n not in ours and n not in pushed_names and not (
        n.startswith("ray_") and not n.startswith("ray_lookalike_") and ray_builtin(n))}
    assert not unknown, f"the dashboard queries metrics nothing exports: {sorted(unknown)}"
    # the pipeline's pushed numbers and the service's scraped ones are both on it
    assert {"lookalike_run_success", "lookalike_run_projected_seconds"} <= used
    assert {"ray_lookalike_search_latency_seconds_bucket", "ray_serve_deployment_replica_healthy"} <= used
    gauges = {n for n in pushed_names} - used
    assert not gauges - {"lookalike_run_status", "lookalike_run_info"}, f"pushed but not shown: {gauges}"
