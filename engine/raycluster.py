"""Connecting to Ray, and deciding CPU or GPU from what the cluster really has.

Inside ``ray job submit`` (RAY_ADDRESS set) or with ``ray.address`` configured we join that
cluster. Otherwise we start a single-machine cluster bound to 127.0.0.1 only: without
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 Ray binds every interface on Linux.
"""
from __future__ import annotations

import logging
import os

from engine import logs
from engine.config import RayConfig

log = logging.getLogger(__name__)


def loopback_env() -> dict:
    """Environment that keeps a single-machine Ray on 127.0.0.1 (set before ray starts)."""
    return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
            "RAY_USAGE_STATS_ENABLED": "0"}


def connect(cfg: RayConfig, quiet: bool | None = None):
    """Join or start Ray. Worker logs reach the driver (and so `ray job logs`) unless
    ``ray.log_to_driver`` is false or ``quiet``; workers log at the driver's level and format."""
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    to_driver = cfg.log_to_driver if quiet is None else not quiet
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    env = logs.worker_runtime_env()
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=to_driver, runtime_env=env)
    else:
        os.environ.update(loopback_env())
        ray.init(num_cpus=cfg.num_cpus, _temp_dir=cfg.temp_dir, dashboard_host="127.0.0.1", runtime_env=env,
                 include_dashboard=cfg.dashboard, _node_ip_address="127.0.0.1", log_to_driver=to_driver)
    _quiet_data_logs()
    return ray.get_runtime_context()


def _quiet_data_logs() -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = logs.current_format() != "json"  # a log pipeline wants records, not bars
    ctx.print_on_execution_start = False


def cpus_available() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 0))


def gpus_available() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def embed_device(requested: str) -> str:
    """'cuda' only when the cluster has GPUs: a num_gpus request on a GPU-less cluster hangs silently."""
    gpus = gpus_available()
    if requested == "cuda" and gpus < 1:
        raise RuntimeError("embed.device is 'cuda' but the Ray cluster reports no GPU; "
                           "set embed.device=auto or cpu")
    if requested == "cpu":
        return "cpu"
    return "cuda" if gpus >= 1 else "cpu"
