"""The run report: counts by outcome and reason, per-stage timings, and a human summary.

Written to ``runs/<run_id>/report.json`` at the end of every run, failed ones included, so
the question "what happened last night" always has an answer.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import time

import pyarrow as pa

from engine import logs
from engine.storage import Storage

log = logging.getLogger(__name__)


class Report:
    def __init__(self, run_id: str, model_version: str, storage: Storage):
        self.storage = storage
        self.t0 = time.time()
        self.current: str | None = None
        self.data = {
            "run_id": run_id, "model_version": model_version, "status": "running",
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "counts": {"rows_in": 0, "ok": 0, "rejected": 0},
            "categories": {}, "rejects_by_reason": {}, "stages": {},
            "report_uri": storage.uri("runs", run_id, "report.json"),
            "rejects_uri": storage.uri("runs", run_id, "rejects.parquet"),
        }
        self.observers: list = []
        logs.set_context(run_id=run_id, stage=None)

    def observe(self, *observers) -> None:
        """Attach observers (Slack, metrics); each hears on_start now, then every event."""
        self.observers.extend(observers)
        for obs in observers:
            self._emit_to(obs, "on_start", self.data)

    def _emit(self, event: str, *args) -> None:
        for obs in self.observers:
            self._emit_to(obs, event, *args)

    @staticmethod
    def _emit_to(obs, event: str, *args) -> None:
        """An observer's failure is logged, never the run's failure."""
        handler = getattr(obs, event, None)
        if handler is None:
            return
        try:
            handler(*args)
        except Exception:  # noqa: BLE001
            log.warning("%s.%s failed; the run goes on", type(obs).__name__, event, exc_info=True)

    @contextlib.contextmanager
    def stage(self, name: str):
        self.current = name
        logs.set_context(stage=name)
        t = time.time()
        self._emit("on_stage_start", name)
        try:
            yield
        finally:
            self.data["stages"][name] = {"seconds": round(time.time() - t, 3)}
            logs.set_context(stage=None)
            self._emit("on_stage_end", name, self.data["stages"][name]["seconds"])
        self.current = None

    def rate(self, stage: str, items: int) -> None:
        s = self.data["stages"][stage]
        s["items"] = items
        # No work done is no throughput: a run that only reused features must not read as 0/s on the dashboard.
        s["items_per_s"] = round(items / s["seconds"], 2) if s["seconds"] and items else None

    def count_outcomes(self, batch: pa.Table) -> None:
        counts = self.data["counts"]
        cats = collections.Counter(self.data["categories"])
        reasons = collections.Counter(self.data["rejects_by_reason"])
        for status, reason, category in zip(batch.column("status").to_pylist(), batch.column("reason").to_pylist(),
                                            batch.column("category").to_pylist()):
            counts["rows_in"] += 1
            if status == "ok":
                counts["ok"] += 1
                cats[category] += 1
            else:
                counts["rejected"] += 1
                reasons[reason] += 1
        self.data["categories"] = dict(sorted(cats.items()))
        self.data["rejects_by_reason"] = dict(sorted(reasons.items()))
        self._emit("on_progress", self.data)

    def progress(self) -> None:
        """Tell observers the running totals changed (after each batch of outcomes)."""
        self._emit("on_progress", self.data)

    def finish(self, status: str, error: str | None = None) -> None:
        self.data["status"] = status
        if error:
            self.data["error"] = error
            self.data["failed_stage"] = self.current
        self.data["elapsed_s"] = round(time.time() - self.t0, 3)
        try:
            self.storage.write_json(self.data, "runs", self.data["run_id"], "report.json")
        finally:  # a run whose report cannot be written is still announced
            self._emit("on_finish", self.data)


def summary(report: dict) -> str:
    """A few lines a person reads at the end of a run."""
    c = report["counts"]
    lines = [f"run {report['run_id']}: {report['status'].upper()} in {report.get('elapsed_s', 0):.1f}s "
             f"(model {report['model_version']}, device {report.get('device', '?')})",
             f"  rows {c['rows_in']}: ok {c['ok']}, rejected {c['rejected']}"
             + (f", reused {c['unchanged_reused']}" if "unchanged_reused" in c else "")]
    if "processed" in c:
        lines.append(f"  plan: new {c['new']}, changed {c['changed']}, unchanged {c['unchanged_reused']}, "
                     f"removed {c.get('removed', 0)}, duplicates {c['duplicates']} -> processed {c['processed']}, "
                     f"indexed {c.get('indexed', '?')}")
    if report.get("rejects_by_reason"):
        lines.append("  rejects: " + ", ".join(f"{k} {v}" for k, v in report["rejects_by_reason"].items())
                     + f"  -> {report['rejects_uri']}")
    if report.get("categories"):
        lines.append("  indexed per category: " + ", ".join(f"{k} {v}" for k, v in report["categories"].items()))
    stages = report.get("stages", {})
    if stages:
        lines.append("  stages: " + ", ".join(
            f"{k} {v['seconds']:.1f}s" + (f" ({v['items_per_s']:.1f}/s)" if v.get("items_per_s") else "")
            for k, v in stages.items()))
    val = report.get("validation")
    if val:
        lines.append(f"  validation: {'ok' if val['ok'] else 'FAILED'} recall@10 {val.get('recall_at_10')} "
                     f"self-hit {val.get('self_hit_rate')} on {val.get('sample')} queries"
                     + ("" if val["ok"] else f" -- {'; '.join(val['failures'])}"))
    if report.get("publish"):
        lines.append(f"  published {report['publish']['published']} -> {report['publish']['latest_uri']}")
    if report.get("error"):
        lines.append(f"  error in {report.get('failed_stage') or 'run'}: {report['error']}")
    lines.append(f"  report: {report['report_uri']}")
    return "\n".join(lines)
