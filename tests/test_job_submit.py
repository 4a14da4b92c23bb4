"""`ray job submit --working-dir . -- python -m engine run ...` against a `ray start --head` cluster.

This is how a run reaches any long-lived Ray cluster (KubeRay's RayJob does the same through
its submitter pod). It is the one test with a second Ray cluster: small (2 CPUs), bound to
127.0.0.1 on free ports with its own temp dir, and stopped by its own process group at the end
(never `ray stop`, which would stop every Ray on the machine).
"""
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port, ray_temp_dir
from engine import publish, sample
from engine.storage import Storage

ROOT = Path(__file__).resolve().parent.parent
MV = "effnet-lite0-512-v1"
MAX_WORKING_DIR = 100 * 1024 * 1024  # Ray's cap on a job's working_dir package


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
                "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0",
                "PATH": os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")})
    return env


@contextlib.contextmanager
def ray_head(temp: Path, worker_ports: int = 40):
    """A `ray start --head` cluster in its own process group, loopback only: (dashboard URL, ports).
    Stopped by its process group at the end, and checked to leave no process behind."""
    ports = {name: free_port() for name in ("port", "dashboard-port", "ray-client-server-port",
                                            "metrics-export-port", "dashboard-agent-listen-port",
                                            "dashboard-agent-grpc-port", "runtime-env-agent-port",
                                            "node-manager-port", "object-manager-port")}
    low = free_port()
    cmd = [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head",
           "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
           "--num-cpus=2", "--num-gpus=0", f"--temp-dir={temp}", "--disable-usage-stats",
           f"--min-worker-port={low}", f"--max-worker-port={low + worker_ports}",
           *[f"--{k}={v}" for k, v in ports.items()]]
    log = open(temp / "ray-start.log", "w")
    proc = subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    pgid = proc.pid  # start_new_session: the Ray processes it starts stay in this group after it exits
    url = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        if proc.wait(timeout=300) != 0:
            raise RuntimeError("ray start failed:\n" + (temp / "ray-start.log").read_text()[-3000:])
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/api/version", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("dashboard not up:\n" + (temp / "ray-start.log").read_text()[-3000:])
                time.sleep(1)
        yield url, ports
    finally:
        _stop(pgid)
        log.close()
        left = subprocess.run(["pgrep", "-f", str(temp)], capture_output=True, text=True).stdout.split()
        assert not left, f"Ray processes of the test cluster still running: {left}"


@pytest.fixture(scope="module")
def head():
    """(dashboard URL, metrics port, temp dir) of this module's `ray start --head` cluster."""
    with ray_temp_dir("lk-head") as temp, ray_head(temp) as (url, ports):
        yield url, ports["metrics-export-port"], temp


def _alive(pgid: int) -> list[str]:
    """Members of the process group that are not zombies (a container's init may never reap them)."""
    out = subprocess.run(["ps", "-o", "pid=,stat=", "-g", str(pgid)], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.split() and not line.split()[1].startswith("Z")]


def _stop(pgid: int) -> None:
    """SIGTERM to the cluster's own process group, then SIGKILL (as `ray stop` does after its grace
    period; gcs_server and the autoscaler monitor outlast SIGTERM by more than 40 s here)."""
    for sig, grace_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace_s
        while _alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not _alive(pgid):
            return


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_ray_job_submit_runs_and_publishes(head, tmp_path):
    url, metrics_port, temp = head
    catalog = sample.make_catalog(tmp_path / "catalog", 40, seed=5, broken=1)
    store = tmp_path / "store"
    sid = "lookalike-submit-test"
    result = subprocess.run(
        ["ray", "job", "submit", "--address", url, "--working-dir", str(ROOT), "--submission-id", sid, "--",
         "python", "-m", "engine", "run", "--set", f"source.path={catalog}", "--set", f"storage.root={store}",
         "--set", f"serve.cache_dir={tmp_path}/cache"],
        env=_env(), capture_output=True, text=True, timeout=900, cwd=ROOT)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert f"Job '{sid}' succeeded" in out
    assert "PUBLISHED" in out and "rows 41: ok 40, rejected 1" in out
    version = publish.latest(Storage(str(store)), MV)
    assert version and f"published {version}" in out

    # The working dir as the cluster received it: under Ray's cap, without the virtualenv or .git.
    (pkg,) = [p for p in (temp / "session_latest" / "runtime_resources" / "working_dir_files").iterdir()
              if p.is_dir()]
    assert (pkg / "engine" / "pipeline.py").exists() and (pkg / "configs" / "local.yaml").exists()
    assert not (pkg / ".venv").exists() and not (pkg / ".git").exists()
    assert _dir_size(pkg) < MAX_WORKING_DIR

    # The run's metrics on this fresh cluster's Prometheus endpoint: exactly this run's rows.
    from test_notify import wait_for_port

    key = ("ray_lookalike_rows_total", frozenset({"model_version": MV, "outcome": "ok"}.items()))
    seen = wait_for_port(metrics_port, lambda s: s.get(key) == 40)
    assert seen.get(key) == 40, {k: v for k, v in seen.items() if "rows" in k[0]}
    assert seen[("ray_lookalike_rejects_total",
                 frozenset({"model_version": MV, "reason": "decode_error"}.items()))] == 1


def test_rayignore_alone_keeps_the_package_under_the_cap(tmp_path):
    """Ray's own packaging of this directory with .gitignore disregarded (as with
    RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1): .rayignore alone keeps out the virtualenv, .git and data."""
    import zipfile

    from ray._private.runtime_env import packaging

    target = tmp_path / "pkg.zip"
    packaging.create_package(str(ROOT), target, include_gitignore=False)
    names = zipfile.ZipFile(target).namelist()
    assert "engine/pipeline.py" in names and "cluster/launch_rayjob.py" in names
    assert not [n for n in names if n.split("/")[0] in (".venv", ".git", ".lookalike", "lookalike-demo")]
    assert not [n for n in names if "__pycache__" in n]
    assert target.stat().st_size < MAX_WORKING_DIR
