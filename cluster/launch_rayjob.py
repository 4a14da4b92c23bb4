"""Start one pipeline run on KubeRay: copy the suspended RayJob template into a dated RayJob.

Run by the daily CronJob (cluster/base/cronjob.yaml) inside the cluster, or by hand with
``--api`` and ``--token`` (e.g. through ``kubectl proxy``). Standard library only, so it runs
in any Python image. Refuses to start while an earlier run of the same template is still
going (exit 3), and keeps only the newest ``--keep`` finished runs.
"""
from __future__ import annotations

import argparse
import copy
import json
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
RUN_OF = "lookalike.io/run-of"
TERMINAL = {"Complete", "Failed", "ValidationFailed"}
EXIT_BUSY = 3


def run_from_template(template: dict, now: float | None = None) -> dict:
    """The RayJob to create: the template's spec, unsuspended, under a name with the UTC time."""
    name = template["metadata"]["name"]
    stamp = time.strftime("%Y%m%d-%H%M", time.gmtime(now))
    labels = {k: v for k, v in (template["metadata"].get("labels") or {}).items()
              if k != "app.kubernetes.io/component"}
    spec = copy.deepcopy(template["spec"])
    spec["suspend"] = False
    return {"apiVersion": template["apiVersion"], "kind": "RayJob",
            "metadata": {"name": f"{name}-{stamp}", "labels": {**labels, RUN_OF: name,
                                                               "app.kubernetes.io/component": "pipeline-run"}},
            "spec": spec}


def to_prune(runs: list[dict], keep: int) -> list[str]:
    """Names of finished runs beyond the newest ``keep``; runs still going are never pruned."""
    done = [r for r in runs if (r.get("status") or {}).get("jobDeploymentStatus") in TERMINAL]
    done.sort(key=lambda r: r["metadata"]["creationTimestamp"])
    return [r["metadata"]["name"] for r in done[:-keep or None]] if keep else [r["metadata"]["name"] for r in done]


def active(runs: list[dict]) -> list[str]:
    return [r["metadata"]["name"] for r in runs
            if (r.get("status") or {}).get("jobDeploymentStatus") not in TERMINAL]


class Kube:
    """The few calls we need on ray.io/v1 rayjobs, through the Kubernetes REST API."""

    def __init__(self, api: str, token: str | None, namespace: str, cafile: str | None):
        self.base = f"{api.rstrip('/')}/apis/ray.io/v1/namespaces/{namespace}/rayjobs"
        self.headers = {"Accept": "application/json", "Content-Type": "application/json"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self.context = ssl.create_default_context(cafile=cafile) if cafile else None

    def call(self, method: str, path: str = "", body: dict | None = None) -> dict:
        req = urllib.request.Request(self.base + path, method=method, headers=self.headers,
                                     data=json.dumps(body).encode() if body is not None else None)
        try:
            with urllib.request.urlopen(req, timeout=30, context=self.context) as resp:
                return json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            raise SystemExit(f"{method} {self.base + path}: HTTP {exc.code}: {exc.read()[:500].decode(errors='replace')}")

    def get(self, name: str) -> dict:
        return self.call("GET", "/" + name)

    def runs_of(self, template: str) -> list[dict]:
        return self.call("GET", "?labelSelector=" + urllib.parse.quote(f"{RUN_OF}={template}"))["items"]

    def create(self, body: dict) -> dict:
        return self.call("POST", "", body)

    def delete(self, name: str) -> None:
        self.call("DELETE", "/" + name)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--template", default="lookalike-pipeline", help="name of the suspended RayJob to copy")
    ap.add_argument("--keep", type=int, default=7, help="finished runs to keep (older ones are deleted)")
    ap.add_argument("--api", default="https://kubernetes.default.svc", help="Kubernetes API server")
    ap.add_argument("--namespace", default=None, help="default: this pod's namespace")
    ap.add_argument("--token", default=None, help="default: this pod's service account token")
    ap.add_argument("--cafile", default=None, help="default: this pod's service account CA")
    ap.add_argument("--dry-run", action="store_true", help="print the RayJob that would be created")
    args = ap.parse_args(argv)
    in_cluster = args.api.startswith("https://kubernetes.default")
    namespace = args.namespace or _read(f"{SA_DIR}/namespace") or "default"
    token = args.token or (_read(f"{SA_DIR}/token") if in_cluster else None)
    cafile = args.cafile or (f"{SA_DIR}/ca.crt" if in_cluster else None)
    kube = Kube(args.api, token, namespace, cafile)

    run = run_from_template(kube.get(args.template))
    if args.dry_run:
        print(json.dumps(run, indent=2))
        return 0
    runs = kube.runs_of(args.template)
    busy = active(runs)
    if busy:
        print(f"not starting a run: {', '.join(busy)} still going (see `kubectl get rayjob {busy[0]}`)",
              file=sys.stderr)
        return EXIT_BUSY
    created = kube.create(run)
    print(f"created RayJob {created['metadata']['name']} in {namespace}")
    for name in to_prune(runs, args.keep - 1):
        kube.delete(name)
        print(f"deleted finished RayJob {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
