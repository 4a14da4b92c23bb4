"""Slack notifications for pipeline runs: started, succeeded, failed, slow stage, too many rejects.

Failures nobody noticed until the next morning were the reference team's worst days, so a run
speaks up as it goes. Two transports, both through ``slack_sdk``: a bot token with a channel
(``WebClient.chat_postMessage``; ``notify.base_url`` points it elsewhere, e.g. at a test server)
or an incoming webhook. Secrets come from an environment variable or a mounted secret file
whose *names* are in the config, never from the config itself. With neither, notifications are
off and the log says so once. Slack being down never fails a run: slack_sdk's retry handlers give
each message up to ``notify.retries`` more attempts (a 429 waits what its Retry-After says;
connection errors and 5xx wait ``notify.retry_wait_s``), each of at most ``notify.timeout_s``,
then a warning.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time

from engine import report as report_mod
from engine.config import Config, NotifyConfig

log = logging.getLogger(__name__)
_said_off = False


def _secret(env: str | None, path: str | None) -> tuple[str | None, str]:
    """(value, where it came from) from an env var or a mounted secret file."""
    if env and os.environ.get(env, "").strip():
        return os.environ[env].strip(), f"${env}"
    if path:
        try:
            with open(path) as f:
                value = f.read().strip()
        except OSError:
            value = ""
        if value:
            return value, path
    return None, " or ".join(x for x in (env and f"${env}", path) if x) or "nothing configured"


class Notifier:
    """Sends text messages to Slack; ``enabled`` is False when no credentials were found."""

    def __init__(self, cfg: NotifyConfig):
        global _said_off
        self.cfg = cfg
        self.lock = threading.Lock()
        self.sent: list[str] = []
        self._post = None
        token, token_from = _secret(cfg.token_env, cfg.token_file)
        webhook, webhook_from = _secret(cfg.slack_webhook_env, cfg.webhook_file)
        if token:
            from slack_sdk import WebClient

            client = WebClient(token=token, base_url=cfg.base_url, timeout=int(max(1, cfg.timeout_s)),
                               retry_handlers=retry_handlers(cfg))
            self._post = lambda text: client.chat_postMessage(channel=cfg.channel, text=text, mrkdwn=True)
            self.transport = f"bot token from {token_from} -> {cfg.channel}"
        elif webhook:
            from slack_sdk.webhook import WebhookClient

            hook = WebhookClient(webhook, timeout=int(max(1, cfg.timeout_s)), retry_handlers=retry_handlers(cfg))
            self._post = lambda text: _check_webhook(hook.send(text=text))
            self.transport = f"webhook from {webhook_from}"
        else:
            self.transport = None
            if not _said_off:
                _said_off = True
                log.info("Slack notifications off: no bot token (%s) and no webhook (%s)", token_from, webhook_from)

    @property
    def enabled(self) -> bool:
        return self._post is not None

    def send(self, text: str) -> bool:
        """Post one message; False (and a warning) when Slack did not take it. Never raises."""
        if not self.enabled:
            return False
        with self.lock:
            try:
                self._post(text)
                self.sent.append(text)
                return True
            except Exception as exc:  # noqa: BLE001 - any Slack trouble is a warning, not a failed run
                log.warning("Slack message not sent after %d attempts (%s); last error %s: %s; message was: %s",
                            1 + self.cfg.retries, self.transport, type(exc).__name__, str(exc)[:200],
                            text.splitlines()[0])
                return False


def retry_handlers(cfg: NotifyConfig) -> list:
    """slack_sdk's own retries: rate limits honour Retry-After, connection errors and 5xx wait retry_wait_s."""
    from slack_sdk.http_retry import (ConnectionErrorRetryHandler, FixedValueRetryIntervalCalculator,
                                      RateLimitErrorRetryHandler)
    from slack_sdk.http_retry.builtin_handlers import ServerErrorRetryHandler

    wait = FixedValueRetryIntervalCalculator(cfg.retry_wait_s)
    return [RateLimitErrorRetryHandler(max_retry_count=cfg.retries),
            ConnectionErrorRetryHandler(max_retry_count=cfg.retries, interval_calculator=wait),
            ServerErrorRetryHandler(max_retry_count=cfg.retries, interval_calculator=wait)]


def _check_webhook(response) -> None:
    if response.status_code != 200:
        raise RuntimeError(f"webhook answered {response.status_code}: {str(response.body)[:200]}")


def submission_id() -> str | None:
    """The ``ray job submit`` id of this driver, when it runs as a Ray job (KubeRay RayJob included)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    try:
        return (json.loads(raw).get("metadata") or {}).get("job_submission_id") if raw else None
    except ValueError:
        return None


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def changes(previous: dict | None, now: dict) -> str:
    """'tops 120 (+5), bags 40 (new), hats gone' against the previous published index."""
    if previous is None:
        return "first index for this model version"
    parts = []
    for cat in sorted(set(previous) | set(now)):
        before, after = previous.get(cat), now.get(cat)
        if before is None:
            parts.append(f"{cat} {after} (new)")
        elif after is None:
            parts.append(f"{cat} gone (was {before})")
        else:
            parts.append(f"{cat} {after} ({after - before:+d})")
    return ", ".join(parts)


class RunNotifier:
    """A Report observer that turns a run's events into Slack messages."""

    def __init__(self, cfg: Config, notifier: Notifier | None = None):
        self.cfg = cfg
        self.ncfg = cfg.notify
        self.notifier = notifier or Notifier(cfg.notify)
        self.tag = f"[{self.ncfg.environment}]"
        self.previous: tuple[str, dict] | None = None
        self.last_stage: str | None = None
        self.timers: dict[str, threading.Timer] = {}
        self.over_budget: set[str] = set()
        self.rejects_said = False
        self.stage_t0: dict[str, float] = {}

    def on_start(self, data: dict) -> None:
        self.run_id = data["run_id"]
        if not self.notifier.enabled:
            return
        self.previous = self._previous_index(data["model_version"])
        src = self.cfg.source
        where = src.path if src.kind == "files" else "BigQuery"
        sid = submission_id()
        self.notifier.send(
            f":arrow_forward: {self.tag} Lookalike run `{self.run_id}` started: model `{data['model_version']}`, "
            f"catalog {where}, storage {self.cfg.storage.root}" + (f", Ray job `{sid}`" if sid else ""))

    def on_stage_start(self, name: str) -> None:
        self.last_stage = name
        self.stage_t0[name] = time.monotonic()
        budget = self.ncfg.stage_budgets_s.get(name)
        if budget is not None and self.notifier.enabled:
            timer = threading.Timer(budget, self._over_budget, args=(name, budget, None))
            timer.daemon = True
            self.timers[name] = timer
            timer.start()

    def on_stage_end(self, name: str, seconds: float) -> None:
        timer = self.timers.pop(name, None)
        if timer is None:
            return
        timer.cancel()
        if timer.is_alive():
            timer.join()  # its message goes out before anything said after the stage
        budget = self.ncfg.stage_budgets_s[name]
        if seconds > budget and name not in self.over_budget:
            self._over_budget(name, budget, seconds)

    def _over_budget(self, name: str, budget: float, took: float | None) -> None:
        if name in self.over_budget:
            return
        self.over_budget.add(name)
        state = (f"took {took:.1f}s" if took is not None
                 else f"still running after {time.monotonic() - self.stage_t0[name]:.1f}s")
        self.notifier.send(f":hourglass: {self.tag} run `{self.run_id}`: stage `{name}` {state}, over its budget "
                           f"of {budget:g}s (notify.stage_budgets_s.{name})")

    def on_progress(self, data: dict) -> None:
        if data["counts"]["rows_in"] >= self.ncfg.reject_check_min_rows:
            self._check_rejects(data)

    def _check_rejects(self, data: dict) -> None:
        c = data["counts"]
        if self.rejects_said or not c["rows_in"] or not self.notifier.enabled:
            return
        ratio = c["rejected"] / c["rows_in"]
        if ratio <= self.ncfg.max_reject_ratio:
            return
        self.rejects_said = True
        top = sorted(data["rejects_by_reason"].items(), key=lambda kv: -kv[1])[:5]
        self.notifier.send(
            f":warning: {self.tag} run `{self.run_id}`: reject ratio {_pct(ratio)} ({c['rejected']} of "
            f"{c['rows_in']} rows) is above the ceiling {_pct(self.ncfg.max_reject_ratio)} "
            f"(notify.max_reject_ratio). Reasons: " + ", ".join(f"{k} {v}" for k, v in top)
            + f". Rejected rows: {data['rejects_uri']}")

    def on_finish(self, data: dict) -> None:
        for name in list(self.timers):
            self.timers.pop(name).cancel()
        if not self.notifier.enabled:
            return
        self._check_rejects(data)
        summary = report_mod.summary(data)
        if data["status"] == "published":
            prev_version, prev_counts = self.previous or (None, None)
            self.notifier.send(
                f":white_check_mark: {self.tag} Lookalike run `{data['run_id']}` published index "
                f"`{data.get('index_version')}` (model `{data['model_version']}`) in {data['elapsed_s']:.1f}s\n"
                f"Changes vs {('`' + prev_version + '`') if prev_version else 'nothing'}: "
                f"{changes(prev_counts, data.get('categories', {}))}\n```{summary}```")
        else:
            stage = data.get("failed_stage") or self.last_stage or "start-up"
            self.notifier.send(
                f":x: {self.tag} Lookalike run `{data['run_id']}` FAILED in stage `{stage}`: "
                f"{data.get('error', 'unknown error')}\nLogs: {self._logs(data)}\n```{summary}```")

    def _logs(self, data: dict) -> str:
        sid = submission_id()
        where = []
        url = self.ncfg.logs_url
        if url and (sid or "{submission_id}" not in url):
            where.append(url.format(run_id=data["run_id"], submission_id=sid))
        if sid:
            where.append(f"`ray job logs {sid}` (Ray dashboard, Jobs tab)")
        where.append(f"report {data['report_uri']}")
        if data["counts"]["rejected"]:
            where.append(f"rejected rows {data['rejects_uri']}")
        return "; ".join(where)

    def _previous_index(self, model_version: str) -> tuple[str, dict] | None:
        """The LATEST index before this run and its counts per category, for 'what changed'."""
        from engine import index, publish
        from engine.storage import Storage

        try:
            storage = Storage.from_config(self.cfg.storage)
            version = publish.latest(storage, model_version)
            if version is None:
                return None
            manifest = storage.read_json(*index.version_prefix(model_version, version), index.MANIFEST)
            return version, {c: int(e["count"]) for c, e in manifest["categories"].items()}
        except Exception:  # noqa: BLE001 - a missing or odd old manifest only costs the 'changes' line
            log.info("no previous index to compare with", exc_info=True)
            return None
