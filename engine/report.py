"""The run report: counts by outcome and reason, per-stage timings, where the time goes, and a
human summary.

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

    def measure(self, ds, pools: dict[str, tuple[int, int]], caps: dict[str, float] | None = None) -> None:
        """Per streaming stage: rows and busy seconds from Ray Data's stats of this run's execution.
        ``pools``: stage -> (configured actors, calls in flight per actor); ``caps``: stage -> rows/s
        it can never exceed (download.max_rps)."""
        try:  # Ray Data exposes per-operator stats only as text publicly; this is the structured form
            summary = ds._get_stats_summary()
        except Exception:  # noqa: BLE001 - no projection is a smaller report, not a failed run
            log.warning("no per-stage stats from Ray Data; the report has no projection", exc_info=True)
            return
        stages: dict[str, dict] = {}
        for op in _operators(summary):
            name = _stage_of(op.operator_name)
            if name is None or not op.wall_time or not op.output_num_rows or not op.total_input_num_rows:
                continue
            busy, rows = float(op.wall_time.sum), int(op.output_num_rows.sum)
            window = (op.latest_end_time - op.earliest_start_time) if op.earliest_start_time else 0.0
            actors, calls = pools.get(name, (None, 1))
            st = stages.setdefault(name, {"rows": 0, "busy_s": 0.0, "actors": actors, "calls_per_actor": calls})
            st["rows"] += rows
            st["busy_s"] = round(st["busy_s"] + busy, 3)
            if actors is None:  # a task stage: as parallel as it was in this run
                st["parallelism"] = round(max(1.0, busy / window) if window > 0 else 1.0, 2)
            if caps and caps.get(name):
                st["cap_per_s"] = caps[name]
        self.data.setdefault("throughput", {}).update(stages)

    def measure_task(self, stats: dict, pools: dict[str, tuple[int, int]], caps: dict[str, float] | None = None) -> None:
        """Per stage, as ``measure``, from the one task that ran every stage in turn
        (engine.onetask: ``stats`` holds its seconds and input rows per stage)."""
        stages = {}
        for name, rows in stats["rows"].items():
            busy = stats["seconds"].get(name, 0.0)
            if not rows or busy <= 0:
                continue
            actors, calls = pools.get(name, (None, 1))
            stages[name] = {"rows": rows, "busy_s": round(busy, 3), "actors": actors, "calls_per_actor": calls}
            if actors is None:
                stages[name]["parallelism"] = 1.0
            if caps and caps.get(name):
                stages[name]["cap_per_s"] = caps[name]
        self.data.setdefault("throughput", {}).update(stages)

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
            self.data["projection"] = projection(self.data)
        except Exception:  # noqa: BLE001
            log.warning("projection failed; the report goes out without it", exc_info=True)
        try:
            self.storage.write_json(self.data, "runs", self.data["run_id"], "report.json")
        finally:  # a run whose report cannot be written is still announced
            self._emit("on_finish", self.data)


STREAM_STAGES = (("Read", "read"), ("PlanStage", "plan"), ("DownloadStage", "download"),
                 ("DetectStage", "detect"), ("EmbedStage", "embed"), ("write_batch", "store"),
                 ("reblock", "repartition"))  # last: fused into the download pool, it is download time


def _stage_of(operator: str) -> str | None:
    if operator.startswith("ListFiles"):
        return None  # one listing, whatever the catalog size
    return next((name for key, name in STREAM_STAGES if key in operator), None)


def _operators(summary):
    for op in summary.operators_stats:
        yield op
    for parent in summary.parents:
        yield from _operators(parent)


def projection(report: dict) -> dict | None:
    """Per stage: measured rate (rows/s at this run's workers) and the time for the whole catalog.

    A streaming stage's capacity is rows / busy worker-seconds x its workers (the configured
    actors x calls in flight per actor; a task stage: the parallelism it had), capped by its rate
    limit; its projected time is the catalog's rows / capacity. The streaming stages overlap, so the
    slowest of them bounds the run; the index build follows it and scales with the items indexed.
    """
    rows = report["counts"]["rows_in"]
    measured = report.get("throughput")
    if not rows or not measured:
        return None
    stages, exact = {}, {}
    order = [name for _, name in STREAM_STAGES]
    for name, st in sorted(measured.items(), key=lambda kv: order.index(kv[0])):
        workers = (st["actors"] * st["calls_per_actor"]) if st.get("actors") else st.get("parallelism", 1.0)
        per_worker = st["rows"] / st["busy_s"] if st["busy_s"] > 0 else None
        capacity = per_worker * workers if per_worker else None
        if capacity and st.get("cap_per_s"):
            capacity = min(capacity, st["cap_per_s"])
        stages[name] = {"rows": st["rows"], "workers": workers,  # rate_per_s: at those workers
                        "rate_per_worker_s": round(per_worker, 2) if per_worker else None,
                        "rate_per_s": round(capacity, 2) if capacity else None,
                        "projected_s": round(rows / capacity, 1) if capacity else None}
        if capacity:
            exact[name] = rows / capacity
    index = report.get("stages", {}).get("index")
    indexed = report["counts"].get("indexed")
    if index and indexed and index["seconds"] > 0:
        rate = indexed / index["seconds"]
        stages["index"] = {"rows": indexed, "workers": None, "rate_per_worker_s": None, "rate_per_s": round(rate, 2),
                           "projected_s": round(rows / rate, 1)}
    if not exact:
        return None
    bounding = max(exact, key=exact.get)  # unrounded: stages that round alike still have an order
    fixed = sum(report.get("stages", {}).get(k, {}).get("seconds", 0) for k in ("connect", "validate", "publish"))
    total = stages[bounding]["projected_s"] + stages.get("index", {}).get("projected_s", 0) + fixed
    return {"catalog_rows": rows, "stages": stages, "bounding_stage": bounding, "projected_run_s": round(total, 1)}


def _rate(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}min"
    return f"{seconds / 3600:.1f}h"


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
    proj = report.get("projection")
    if proj:
        lines.append(f"  projected for the whole catalog ({proj['catalog_rows']} rows) at the configured actors: "
                     f"~{_duration(proj['projected_run_s'])}, bounded by {proj['bounding_stage']}")
        lines.append("    " + ", ".join(
            f"{k} {_rate(v['rate_per_s'])}/s" + (f" x{v['workers']:g}" if v.get("workers") else "")
            + f" -> {_duration(v['projected_s'])}" for k, v in proj["stages"].items() if v["projected_s"] is not None))
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
