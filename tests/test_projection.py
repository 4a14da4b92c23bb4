"""Where the time goes: per-stage rates from a run, projected to the whole catalog (engine.report)."""
import pytest

from engine import report


def measured_run(max_rps=None):
    """A 3M-row catalog whose small test run measured: embed 24 rows per actor-second, download 200
    rows per call-second, the read 12000/s on one task, the index 5000 items/s."""
    return {"counts": {"rows_in": 3_000_000, "ok": 3_000_000, "rejected": 0, "indexed": 3_000_000},
            "stages": {"connect": {"seconds": 30.0}, "index": {"seconds": 600.0}, "validate": {"seconds": 20.0},
                       "publish": {"seconds": 1.0}},
            "throughput": {
                "read": {"rows": 60, "busy_s": 0.005, "actors": None, "calls_per_actor": 1, "parallelism": 2.0},
                "download": {"rows": 60, "busy_s": 0.3, "actors": 8, "calls_per_actor": 4,
                             **({"cap_per_s": max_rps} if max_rps else {})},
                "embed": {"rows": 60, "busy_s": 2.5, "actors": 4, "calls_per_actor": 1}}}


def test_rates_scale_with_the_configured_workers_and_the_slowest_stage_bounds_the_run():
    p = report.projection(measured_run())
    st = p["stages"]
    assert list(st) == ["read", "download", "embed", "index"]  # the data flow's order
    assert st["embed"]["rate_per_worker_s"] == 24.0 and st["embed"]["workers"] == 4 and st["embed"]["rate_per_s"] == 96.0
    assert st["embed"]["projected_s"] == pytest.approx(3_000_000 / 96, abs=0.1)
    assert st["download"]["workers"] == 32 and st["download"]["rate_per_s"] == 6400.0
    assert st["read"]["rate_per_s"] == 24000.0  # a task stage: the parallelism it had
    assert st["index"]["rate_per_s"] == 5000.0 and st["index"]["projected_s"] == 600.0
    assert p["bounding_stage"] == "embed"
    assert p["projected_run_s"] == pytest.approx(3_000_000 / 96 + 600 + 30 + 20 + 1, abs=0.1)


def test_a_rate_limit_caps_its_stage_and_can_become_the_bound():
    p = report.projection(measured_run(max_rps=50.0))
    assert p["stages"]["download"]["rate_per_s"] == 50.0 and p["bounding_stage"] == "download"
    text = report.summary({"run_id": "r", "status": "published", "model_version": "m", "report_uri": "u",
                           **measured_run(max_rps=50.0), "projection": p})
    assert "(3000000 rows) at the configured actors: ~16.8h, bounded by download" in text
    assert "download 50.0/s x32 -> 16.7h" in text and "embed 96.0/s x4 -> 8.7h" in text


def test_nothing_measured_means_no_projection():
    assert report.projection({"counts": {"rows_in": 0}, "throughput": {}}) is None
    assert report.projection({"counts": {"rows_in": 10}}) is None
