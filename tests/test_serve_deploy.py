"""The Serve config file deployed as an operator does it, and logs as `ray job logs` shows them.

Against a `ray start --head` cluster of its own (loopback, its own temp dir and ports, stopped by
process group at the end, as in test_job_submit.py): `serve deploy configs/serve.yaml` (the local
variant: a free HTTP port, an empty storage root) until `serve status` says every deployment the
config lists is HEALTHY, with the sizes the config gave; then a job whose Ray workers log.
"""
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import free_port, ray_temp_dir
from test_job_submit import _env, ray_head

ROOT = Path(__file__).resolve().parent.parent
BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="module")
def head():
    with ray_temp_dir("lk-serve") as temp, ray_head(temp, worker_ports=60) as (url, _):
        yield url


def cli(*argv, timeout=300):
    return subprocess.run([os.path.join(BIN, argv[0]), *argv[1:]], env=_env(), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_serve_deploy_of_the_config_file_makes_every_deployment_healthy(head, tmp_path):
    serve_cfg = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    port = free_port()
    serve_cfg["http_options"]["port"] = port
    (app,) = serve_cfg["applications"]
    app["args"]["set"] += [f"storage.root={tmp_path}/store", f"serve.cache_dir={tmp_path}/cache"]
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(serve_cfg))
    deployed = cli("serve", "deploy", str(path), "-a", head)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    wanted = {d["name"]: d for d in app["deployments"]}
    deadline = time.monotonic() + 480
    while True:
        status = yaml.safe_load(cli("serve", "status", "-a", head).stdout)
        mine = status["applications"].get("lookalike", {})
        states = {n: d["status"] for n, d in mine.get("deployments", {}).items()}
        if mine.get("status") in ("RUNNING", "DEPLOY_FAILED") or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert mine.get("status") == "RUNNING", status
    assert states == {name: "HEALTHY" for name in wanted}, status
    # the sizes came from the file, not from the code's defaults
    details = json.loads(urllib.request.urlopen(f"{head}/api/serve/applications/", timeout=30).read())
    running = details["applications"]["lookalike"]["deployments"]
    for name, want in wanted.items():
        got = running[name]["deployment_config"]
        assert got["max_ongoing_requests"] == want["max_ongoing_requests"], name
        for key, value in want["autoscaling_config"].items():
            assert got["autoscaling_config"][key] == value, (name, key)
        assert got["ray_actor_options"]["num_cpus"] == want["ray_actor_options"]["num_cpus"], name
    with pytest.raises(urllib.error.HTTPError) as answer:  # the app itself answers: up, nothing published yet
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30)
    assert answer.value.code == 503 and json.loads(answer.value.read())["state"] == "unpublished"
    assert cli("serve", "shutdown", "-a", head, "-y").returncode == 0


WORKER_LOGS = """
import logging, ray
from engine import logs, raycluster
from engine.config import RayConfig
logs.setup("INFO", "text")
raycluster.connect(RayConfig())  # the defaults: ray.log_to_driver true

@ray.remote
def work(i):
    # words, not numbers: Ray folds log lines that differ only in numbers into one "[repeated Nx]"
    logging.getLogger("engine.worker_probe").info("worker %s says hello", ["alpha", "bravo", "charlie"][i])
    return i

print(sum(ray.get([work.remote(i) for i in range(3)])))
"""


def test_worker_logs_reach_ray_job_logs_by_default(head, tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(WORKER_LOGS)
    sid = "lookalike-log-probe"
    submitted = cli("ray", "job", "submit", "--address", head, "--submission-id", sid,
                    "--working-dir", str(tmp_path),
                    "--", "python", "probe.py", timeout=600)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    logs = cli("ray", "job", "logs", "--address", head, sid).stdout
    assert "3" in logs.splitlines()
    said = [line for line in logs.splitlines() if "engine.worker_probe: worker" in line and "says hello" in line]
    assert len(said) == 3 and all("(work pid=" in line for line in said), logs[-3000:]  # from the workers
