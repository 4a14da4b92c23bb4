"""The KubeRay manifests in cluster/: valid, complete, and consistent with the code and configs.

Overlays are rendered by a small kustomize subset below (what cluster/ uses: resources,
namespace, labels, images, RFC 6902 patches); where kubectl is installed, the same render by
`kubectl kustomize` must agree with it.
"""
import collections
import copy
import json
import re
import shlex
import shutil
import subprocess
import threading
import tomllib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from engine import config, pipeline

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
APP_DIR = "/home/ray/lookalike"  # WORKDIR in cluster/Dockerfile
OVERLAYS = ("dev", "prod")
MAX_RAYJOB_NAME = 47  # KubeRay: RayCluster names <= 53, RayJob adds 6
RUN_SUFFIX = len("-20261124-0200")


# -- a kustomize subset ---------------------------------------------------------------------------

def _pointer(doc, path):
    parts = [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]
    for p in parts[:-1]:
        doc = doc[int(p)] if isinstance(doc, list) else doc[p]
    return doc, parts[-1]


def _json6902(doc, ops):
    for op in ops:
        parent, key = _pointer(doc, op["path"])
        if isinstance(parent, list):
            key = len(parent) if key == "-" else int(key)
        if op["op"] == "replace":
            parent[key]  # must exist
            parent[key] = copy.deepcopy(op["value"])
        elif op["op"] == "add":
            parent.insert(key, copy.deepcopy(op["value"])) if isinstance(parent, list) else \
                parent.__setitem__(key, copy.deepcopy(op["value"]))
        elif op["op"] == "remove":
            del parent[key]
        else:
            raise ValueError(f"unsupported op {op}")


def _images(node, images):
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for c in value:
                    name = c["image"].split(":")[0]
                    for img in images:
                        if img["name"] == name:
                            c["image"] = f"{img.get('newName', name)}:{img['newTag']}"
            _images(value, images)
    elif isinstance(node, list):
        for item in node:
            _images(item, images)


def render(directory: Path) -> list[dict]:
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    docs = []
    for res in kust.get("resources", []):
        path = (directory / res).resolve()
        docs += render(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in kust.get("patches", []):
        target = patch["target"]
        ops = yaml.safe_load((directory / patch["path"]).read_text())
        hits = [d for d in docs if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]]
        assert hits, f"{directory}: patch {patch['path']} matches nothing"
        for d in hits:
            _json6902(d, ops)
    for entry in kust.get("labels", []):
        for d in docs:
            d["metadata"].setdefault("labels", {}).update(entry["pairs"])
    _images(docs, kust.get("images", []))
    if kust.get("namespace"):
        for d in docs:
            d["metadata"]["namespace"] = kust["namespace"]
            for s in d.get("subjects", []):
                if s["kind"] == "ServiceAccount":
                    s["namespace"] = kust["namespace"]
    return docs


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request):
    docs = render(CLUSTER / "overlays" / request.param)
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    return request.param, by_kind


def one(by_kind, kind):
    assert len(by_kind.get(kind, [])) == 1, f"expected one {kind}"
    return by_kind[kind][0]


def ray_pin() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(re.search(r"==([\d.]+)", d).group(1) for d in deps if d.startswith("ray["))


def local_path(path: str) -> Path:
    assert path.startswith(APP_DIR + "/"), f"{path}: not under the image's {APP_DIR}"
    return ROOT / path[len(APP_DIR) + 1:]


# -- YAML and kustomize ---------------------------------------------------------------------------

def test_every_yaml_file_parses():
    files = sorted(CLUSTER.rglob("*.yaml")) + sorted((ROOT / "configs").glob("*.yaml"))
    assert len(files) >= 14
    for f in files:
        for doc in yaml.safe_load_all(f.read_text()):
            assert doc is not None, f"{f}: empty document"
            if isinstance(doc, dict) and "apiVersion" in doc and doc.get("kind") != "Kustomization":
                assert doc["metadata"]["name"], f


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed; the subset render still runs")
@pytest.mark.parametrize("name", OVERLAYS)
def test_subset_render_matches_kubectl_kustomize(name):
    out = subprocess.run(["kubectl", "kustomize", str(CLUSTER / "overlays" / name)], capture_output=True,
                         text=True, check=True).stdout
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(yaml.safe_load_all(out), key=key) == sorted(render(CLUSTER / "overlays" / name), key=key)


# -- KubeRay --------------------------------------------------------------------------------------

def pods(cluster_spec):
    yield "head", cluster_spec["headGroupSpec"]
    for group in cluster_spec.get("workerGroupSpecs", []):
        yield group["groupName"], group


def check_ray_cluster(spec, where):
    assert spec["rayVersion"] == ray_pin(), f"{where}: rayVersion != ray pin in pyproject.toml"
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    images = set()
    for name, group in pods(spec):
        if name != "head":
            assert group["groupName"] and {"minReplicas", "maxReplicas", "template"} <= set(group), name
            assert 0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        pod = group["template"]["spec"]
        assert pod["serviceAccountName"] == "lookalike"
        ray = pod["containers"][0]
        images.add(ray["image"])
        assert {"name": "RAY_AUTH_MODE", "value": "token"} in ray["env"], f"{where}/{name}"
        shm = [v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
        assert len(shm) == 1 and {"name": shm[0]["name"], "mountPath": "/dev/shm"} in ray["volumeMounts"]
        res = ray["resources"]
        assert res["requests"] == res["limits"], f"{where}/{name}: requests != limits"
        gpus = int(res["limits"].get("nvidia.com/gpu", 0))
        assert (gpus >= 1) == (name == "gpu"), f"{where}/{name}: GPU request does not match the group"
        if gpus:
            assert any(t["key"] == "nvidia.com/gpu" for t in pod.get("tolerations", []))
    assert len(images) == 1, f"{where}: one image for every pod, got {images}"


def cpus(quantity) -> float:
    q = str(quantity)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def shape(spec, group):
    g = next(g for n, g in pods(spec) if n == group)
    limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
    return g, cpus(limits["cpu"]), int(limits.get("nvidia.com/gpu", 0))


def test_rayjob_has_what_kuberay_requires(overlay):
    name, by_kind = overlay
    job = one(by_kind, "RayJob")
    spec = job["spec"]
    assert job["apiVersion"] == "ray.io/v1" and spec["entrypoint"]
    assert spec["suspend"] is True, "the RayJob is a template the CronJob copies; it must not run on apply"
    assert spec["activeDeadlineSeconds"] > spec["preRunningDeadlineSeconds"] > 0
    # deletionRules mode: KubeRay refuses it together with shutdownAfterJobFinishes or a global TTL
    assert "shutdownAfterJobFinishes" not in spec and "ttlSecondsAfterFinished" not in spec
    rules = {(r["condition"].get("jobStatus") or r["condition"]["jobDeploymentStatus"], r["policy"]):
             r["condition"]["ttlSeconds"] for r in spec["deletionStrategy"]["deletionRules"]}
    assert rules[("SUCCEEDED", "DeleteCluster")] <= 600, "a succeeded run's GPUs go within minutes"
    assert rules[("FAILED", "DeleteWorkers")] <= 900 < 3600 <= rules[("FAILED", "DeleteCluster")], \
        "a failed run's workers go soon, its head (dashboard, logs) stays to be inspected"
    assert rules[("Failed", "DeleteCluster")] >= 3600
    submitter = spec["submitterPodTemplate"]["spec"]["containers"][0]
    assert submitter["resources"]["requests"] and submitter["resources"]["limits"]
    assert submitter["image"] == spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert "runtimeEnvYAML" not in spec, "runs install nothing: everything is in the image"
    assert len(job["metadata"]["name"]) + RUN_SUFFIX <= MAX_RAYJOB_NAME
    check_ray_cluster(spec["rayClusterSpec"], f"{name}/RayJob")
    assert [g["groupName"] for g in spec["rayClusterSpec"]["workerGroupSpecs"]] == ["cpu", "gpu"]


def test_rayjob_entrypoint_names_real_code_and_config(overlay):
    from engine import cli

    name, by_kind = overlay
    argv = shlex.split(one(by_kind, "RayJob")["spec"]["entrypoint"])
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert argv[0] in scripts and scripts[argv[0]] == "engine.cli:main"
    args = cli.parser().parse_args(argv[1:])
    assert args.command == "run"
    path = local_path(args.config)
    assert path == ROOT / "configs" / f"{name}.yaml" and path.exists()
    config.load(path, args.overrides)  # every key known, every value valid


def test_actor_pools_fit_the_worker_shapes(overlay):
    """What the pipeline checks at start-up (pipeline.check_fits, GPU detection) against minReplicas."""
    name, by_kind = overlay
    spec = one(by_kind, "RayJob")["spec"]["rayClusterSpec"]
    cfg = config.load(ROOT / "configs" / f"{name}.yaml")
    cpu_group, cpu_pod, _ = shape(spec, "cpu")
    gpu_group, gpu_pod_cpus, gpus_per_pod = shape(spec, "gpu")
    at_start = cpu_group["minReplicas"] * cpu_pod + gpu_group["minReplicas"] * gpu_pod_cpus
    pipeline.check_fits(cfg, at_start)
    assert cfg.download.cpus_per_actor <= cpu_pod
    assert cfg.embed.device in ("auto", "cuda") and cfg.embed.gpus_per_actor <= gpus_per_pod
    assert cfg.embed.cpus_per_actor <= gpu_pod_cpus, "an embed actor and its GPU must fit one GPU pod"
    per_pod = min(gpus_per_pod // cfg.embed.gpus_per_actor, gpu_pod_cpus // cfg.embed.cpus_per_actor)
    assert cfg.embed.actors <= gpu_group["minReplicas"] * per_pod, "embed actors need GPU pods at start-up"


def test_slack_secret_and_gcp_identity_are_wired(overlay):
    name, by_kind = overlay
    cfg = config.load(ROOT / "configs" / f"{name}.yaml")
    head = one(by_kind, "RayJob")["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    vol = next(v for v in head["volumes"] if "secret" in v)
    assert vol["secret"] == {"secretName": "lookalike-slack", "optional": True}
    mount = next(m for m in head["containers"][0]["volumeMounts"] if m["name"] == vol["name"])
    files = [f for f in (cfg.notify.token_file, cfg.notify.webhook_file) if f]
    assert files and all(f.startswith(mount["mountPath"] + "/") for f in files)
    sa = next(d for d in by_kind["ServiceAccount"] if d["metadata"]["name"] == "lookalike")
    gsa = sa["metadata"]["annotations"]["iam.gke.io/gcp-service-account"]
    assert gsa.startswith(f"lookalike-{name}@") and gsa.endswith(".iam.gserviceaccount.com")
    assert cfg.storage.root.startswith("gs://") and cfg.notify.environment == name


def test_rayservice_serves_the_configs_serve_file(overlay):
    import importlib

    name, by_kind = overlay
    svc = one(by_kind, "RayService")
    check_ray_cluster(svc["spec"]["rayClusterConfig"], f"{name}/RayService")
    serve_cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])
    assert serve_cfg == yaml.safe_load((ROOT / "configs" / f"serve-{name}.yaml").read_text()), \
        f"serveConfigV2 differs from configs/serve-{name}.yaml: copy the file into the manifest"
    assert serve_cfg["http_options"]["host"] == "0.0.0.0"
    (app,) = serve_cfg["applications"]
    module, attr = app["import_path"].split(":")
    built = getattr(importlib.import_module(module), attr)
    assert callable(built)
    assert app["args"]["config"] == f"configs/{name}.yaml"
    cfg = config.load(ROOT / app["args"]["config"], app["args"]["set"])
    from serve import app as serve_app

    built = {serve_app.Encoder.name, serve_app.SearchAPI.name} | {
        f"Searcher{g}" for g in range(cfg.serve.searcher_groups)}
    deployments = {d["name"]: d for d in app["deployments"]}
    assert set(deployments) == built, f"serve config lists {sorted(deployments)}, the app builds {sorted(built)}"
    for d in deployments.values():
        assert {"autoscaling_config", "max_ongoing_requests", "ray_actor_options"} <= set(d), d["name"]
        auto = d["autoscaling_config"]
        assert 1 <= auto["min_replicas"] <= auto["max_replicas"] and auto["target_ongoing_requests"] <= \
            d["max_ongoing_requests"], d["name"]
    spec = svc["spec"]["rayClusterConfig"]
    _, cpu_pod, _ = shape(spec, "cpu")
    gpu_group, gpu_pod_cpus, gpus_per_pod = shape(spec, "gpu")
    enc = deployments["Encoder"]["ray_actor_options"]
    assert 1 <= enc["num_gpus"] <= gpus_per_pod and enc["num_cpus"] <= gpu_pod_cpus
    assert deployments["Encoder"]["autoscaling_config"]["max_replicas"] <= gpu_group["maxReplicas"] * gpus_per_pod
    cpu_group = next(g for n, g in pods(spec) if n == "cpu")
    on_cpu = [d for n, d in deployments.items() if n != "Encoder"]
    for d in on_cpu:
        assert d["ray_actor_options"].get("num_gpus", 0) == 0 and d["ray_actor_options"]["num_cpus"] <= cpu_pod
    at_min = sum(d["autoscaling_config"]["min_replicas"] * d["ray_actor_options"]["num_cpus"] for d in on_cpu)
    at_max = sum(d["autoscaling_config"]["max_replicas"] * d["ray_actor_options"]["num_cpus"] for d in on_cpu)
    assert at_min <= cpu_group["minReplicas"] * cpu_pod, "the minimum replicas fit the CPU pods at minReplicas"
    assert at_max <= cpu_group["maxReplicas"] * cpu_pod, "the maximum replicas fit the CPU pods at maxReplicas"
    assert cfg.serve.cache_dir.startswith("/tmp/")


def test_cronjob_launches_the_rayjob_template(overlay):
    name, by_kind = overlay
    cron = one(by_kind, "CronJob")
    assert len(cron["spec"]["schedule"].split()) == 5 and cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    argv = pod["containers"][0]["command"]
    assert argv[0] == "python" and local_path(argv[1]) == CLUSTER / "launch_rayjob.py"
    template = argv[argv.index("--template") + 1]
    job = one(by_kind, "RayJob")
    assert template == job["metadata"]["name"]
    assert pod["containers"][0]["image"] == job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"][
        "containers"][0]["image"]
    role = next(d for d in by_kind["Role"] if d["metadata"]["name"] == "lookalike-scheduler")
    assert {"get", "list", "create", "delete"} <= set(role["rules"][0]["verbs"])
    binding = next(d for d in by_kind["RoleBinding"] if d["roleRef"]["name"] == role["metadata"]["name"])
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"],
                                    "namespace": f"lookalike-{name}"}]


def test_dockerfile_matches_the_pins_and_copies_what_exists():
    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"ARG RAY_IMAGE=rayproject/ray:([\d.]+)-py(\d)(\d+)-gpu", text)
    assert base and base.group(1) == ray_pin()
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert f">={base.group(2)}.{base.group(3)}" in requires
    assert f"WORKDIR {APP_DIR}" in text
    for line in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M):
        for src in line.split():
            assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
    assert locked()["torch"][0] == "2.14.1" and '"torch==2.14.1"' in (ROOT / "pyproject.toml").read_text()


# -- the launcher ---------------------------------------------------------------------------------

def launcher():
    import importlib.util

    spec = importlib.util.spec_from_file_location("launch_rayjob", CLUSTER / "launch_rayjob.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class FakeKube:
    """The rayjobs endpoints of a Kubernetes API server, in memory, on 127.0.0.1."""

    def __init__(self, objects):
        self.objects = {o["metadata"]["name"]: o for o in objects}
        self.calls = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                outer.calls.append(("GET", self.path))
                base, _, query = self.path.partition("?")
                name = base.rsplit("/rayjobs", 1)[1].strip("/")
                if name:
                    return self._send(200, outer.objects[name]) if name in outer.objects else self._send(404, {})
                label = query.split("=", 1)[1].replace("%2F", "/").replace("%3D", "=")
                key, value = label.split("=")
                self._send(200, {"items": [o for o in outer.objects.values()
                                           if o["metadata"].get("labels", {}).get(key) == value]})

            def do_POST(self):
                outer.calls.append(("POST", self.path))
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                body["metadata"]["creationTimestamp"] = "2099-01-01T00:00:00Z"
                outer.objects[body["metadata"]["name"]] = body
                self._send(201, body)

            def do_DELETE(self):
                outer.calls.append(("DELETE", self.path))
                outer.objects.pop(self.path.rsplit("/", 1)[1])
                self._send(200, {})

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def past_run(name, status, created):
    return {"metadata": {"name": name, "creationTimestamp": created,
                         "labels": {"lookalike.io/run-of": "lookalike-pipeline"}},
            "status": {"jobDeploymentStatus": status}}


def test_launcher_copies_the_template_and_prunes_old_runs(capsys):
    mod = launcher()
    template = one({"RayJob": [d for d in render(CLUSTER / "overlays" / "prod") if d["kind"] == "RayJob"]}, "RayJob")
    kube = FakeKube([template] + [past_run(f"lookalike-pipeline-2026111{i}-0200", "Complete", f"2026-11-1{i}T02:00:00Z")
                                  for i in range(4)])
    try:
        assert mod.main(["--api", kube.url, "--namespace", "lookalike-prod", "--keep", "3"]) == 0
    finally:
        kube.server.shutdown()
    created = [o for n, o in kube.objects.items() if o.get("spec", {}).get("suspend") is False]
    assert len(created) == 1
    run = created[0]
    assert re.fullmatch(r"lookalike-pipeline-\d{8}-\d{4}", run["metadata"]["name"])
    assert run["metadata"]["labels"]["lookalike.io/run-of"] == "lookalike-pipeline"
    assert {**run["spec"], "suspend": True} == template["spec"]
    # keep 3: the new run and the two newest finished ones
    assert sorted(n for n in kube.objects if n != "lookalike-pipeline") == sorted(
        ["lookalike-pipeline-20261112-0200", "lookalike-pipeline-20261113-0200", run["metadata"]["name"]])
    assert all(path.startswith("/apis/ray.io/v1/namespaces/lookalike-prod/rayjobs") for _, path in kube.calls)
    assert "created RayJob lookalike-pipeline-" in capsys.readouterr().out


def test_launcher_will_not_start_beside_a_run_still_going(capsys):
    mod = launcher()
    template = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "lookalike-pipeline"},
                "spec": {"suspend": True, "entrypoint": "x"}}
    kube = FakeKube([template, past_run("lookalike-pipeline-20261123-0200", "Running", "2026-11-23T02:00:00Z")])
    try:
        assert mod.main(["--api", kube.url, "--namespace", "ns"]) == mod.EXIT_BUSY
    finally:
        kube.server.shutdown()
    assert not any(m == "POST" for m, _ in kube.calls)
    assert "lookalike-pipeline-20261123-0200 still going" in capsys.readouterr().err


# -- schemas: KubeRay and prometheus-operator CRDs, Kubernetes core kinds ---------------------------

SCHEMAS = CLUSTER / "schemas"
KUBERAY = "kuberay-v1.6.2"  # the operator version cluster/ is written for (cluster/base/kustomization.yaml)
CORE_GROUPS = ("batch/", "rbac.authorization.k8s.io/", "networking.k8s.io/")  # kubernetes-validate knows these
KUBERNETES = "1.33"  # the oldest Kubernetes minor we validate core kinds against (GKE regular channel)


def _structural(node):
    """A CRD's openAPIV3Schema as JSON Schema, with unknown fields refused (kubectl --validate=strict)."""
    if isinstance(node, list):
        return [_structural(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _structural(v) for k, v in node.items() if not k.startswith("x-")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable"):
        out["type"] = [out["type"], "null"] if "type" in out else None
        out.pop("nullable")
        if out["type"] is None:
            out.pop("type")
    if "properties" in node and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def crd_validator(kind: str, api_version: str):
    import jsonschema

    group, version = api_version.split("/")
    raw = json.loads((SCHEMAS / f"{kind.lower()}-{group}-{version}.json").read_text())
    schema = _structural(raw)
    schema["properties"]["metadata"] = {"type": "object"}
    return raw["x-source"], jsonschema.Draft7Validator(schema)


def deprecated_fields(node, banned: set[str], path="") -> list[str]:
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k in banned:
                found.append(f"{path}/{k}")
            found += deprecated_fields(v, banned, f"{path}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += deprecated_fields(v, banned, f"{path}/{i}")
    return found


def test_every_object_of_every_overlay_passes_its_schema(overlay):
    import kubernetes_validate

    name, by_kind = overlay
    banned = set(json.loads((SCHEMAS / "deprecated-ray.io-v1.json").read_text())["fields"])
    checked = collections.Counter()
    for kind, docs in by_kind.items():
        for doc in docs:
            where = f"{name}/{kind}/{doc['metadata']['name']}"
            if "." in doc["apiVersion"].split("/")[0] and not doc["apiVersion"].startswith(CORE_GROUPS):
                source, validator = crd_validator(kind, doc["apiVersion"])
                errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
                assert not errors, f"{where} against {source}:\n" + "\n".join(errors[:10])
                if doc["apiVersion"].startswith("ray.io/"):
                    assert source == KUBERAY
                    assert not deprecated_fields(doc["spec"], banned), \
                        f"{where}: fields {KUBERAY} ignores: {deprecated_fields(doc['spec'], banned)}"
            else:
                kubernetes_validate.validate(doc, KUBERNETES, strict=True)
            checked[kind] += 1
    expected = {"RayJob": 1, "RayService": 1, "CronJob": 1, "ServiceAccount": 2, "Role": 1, "RoleBinding": 1,
                "PodMonitor": 2}
    if name == "prod":  # sign-in through IAP (cluster/overlays/prod/iap.yaml)
        expected.update({"BackendConfig": 2, "ManagedCertificate": 1, "Ingress": 1})
    assert checked == expected, checked


def test_the_schema_check_refuses_what_the_operator_would_ignore():
    """The validator is not a rubber stamp: a misspelt field, a wrong type and a bad enum all fail."""
    job = copy.deepcopy(one({"RayJob": [d for d in render(CLUSTER / "overlays" / "prod") if d["kind"] == "RayJob"]},
                            "RayJob"))
    _, validator = crd_validator("RayJob", "ray.io/v1")
    assert not list(validator.iter_errors(job))
    bad = [("spec", "activeDeadlineSecond", 10), ("spec", "activeDeadlineSeconds", "1d"),
           ("spec", "suspend", "yes")]
    for parent, key, value in bad:
        broken = copy.deepcopy(job)
        broken[parent][key] = value
        assert list(validator.iter_errors(broken)), (key, value)
    broken = copy.deepcopy(job)
    broken["spec"]["deletionStrategy"]["deletionRules"][0]["policy"] = "DeleteEverything"
    assert list(validator.iter_errors(broken))
    import kubernetes_validate

    cron = copy.deepcopy(next(d for d in render(CLUSTER / "overlays" / "prod") if d["kind"] == "CronJob"))
    cron["spec"]["schedul"] = cron["spec"].pop("schedule")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(cron, KUBERNETES, strict=True)
    backend = next(d for d in render(CLUSTER / "overlays" / "prod") if d["kind"] == "BackendConfig")
    _, validator = crd_validator("BackendConfig", "cloud.google.com/v1")
    assert not list(validator.iter_errors(backend))
    for change in ({"oauthClientCredentials": {"secretName": "x"}}, {"enabled": "true"}, {"oauthclientCredentials": {}}):
        broken = copy.deepcopy(backend)
        broken["spec"]["iap"].update(change)
        assert list(validator.iter_errors(broken)), change
    svc = next(d for d in render(CLUSTER / "overlays" / "prod") if d["kind"] == "RayService")
    banned = set(json.loads((SCHEMAS / "deprecated-ray.io-v1.json").read_text())["fields"])
    assert "serviceUnhealthySecondThreshold" in banned
    assert deprecated_fields({**svc["spec"], "serviceUnhealthySecondThreshold": 900}, banned)


def test_rayservice_upgrades_by_new_cluster_and_pods_export_metrics(overlay):
    name, by_kind = overlay
    svc = one(by_kind, "RayService")["spec"]
    assert svc["upgradeStrategy"]["type"] == "NewCluster"
    monitors = {d["metadata"]["name"]: d["spec"] for d in by_kind["PodMonitor"]}
    scraped = {(m["selector"]["matchLabels"]["ray.io/node-type"], e["port"])
               for m in monitors.values() for e in m["podMetricsEndpoints"]}
    for spec in (svc["rayClusterConfig"], one(by_kind, "RayJob")["spec"]["rayClusterSpec"]):
        for group, g in pods(spec):
            node_type = "head" if group == "head" else "worker"
            ports = {p["name"] for p in g["template"]["spec"]["containers"][0].get("ports", [])}
            assert (node_type, "metrics") in scraped and "metrics" in ports, f"{name}/{group}"
            assert {p for t, p in scraped if t == node_type} <= ports, f"{name}/{group}: a scraped port is not named"


# -- the image's lock file ------------------------------------------------------------------------

LOCK = CLUSTER / "requirements.lock"


def locked() -> dict:
    """name -> (version, [sha256]) from a pip-compile --generate-hashes file."""
    from packaging.utils import canonicalize_name

    out, current = {}, None
    for line in LOCK.read_text().splitlines():
        pin = re.match(r"^([A-Za-z0-9_.-]+)==([^\s\\;]+)", line)
        if pin:
            current = canonicalize_name(pin.group(1))
            out[current] = (pin.group(2), [])
        for digest in re.findall(r"--hash=sha256:([0-9a-f]{64})", line):
            out[current][1].append(digest)
    return out


def test_lock_pins_every_dependency_with_hashes_and_the_image_installs_it():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = locked()
    assert len(pins) > 50 and all(hashes for _, hashes in pins.values()), "every pin carries its hashes"
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is in pyproject.toml but not in {LOCK.name}: re-run pip-compile"
        assert req.specifier.contains(pins[name][0], prereleases=True), \
            f"{req.name}: locked {pins[name][0]} does not satisfy {req.specifier} in pyproject.toml"
        for extra in req.extras:  # ray[data,serve]: what the extras pull in is locked too
            import importlib.metadata as md

            wanted = [Requirement(r) for r in md.requires(req.name) or []]
            for sub in wanted:
                if sub.marker and sub.marker.evaluate({"extra": extra}) and not sub.marker.evaluate({"extra": ""}):
                    assert canonicalize_name(sub.name) in pins, f"{sub.name} (from {dep}) not locked"
    docker = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"^RUN pip install --require-hashes --no-deps -r cluster/requirements\.lock$", docker, re.M)
    assert re.search(r"^RUN pip install --no-deps -e \.$", docker, re.M), "the app itself adds no dependency"


# -- sign-in through IAP (prod) -------------------------------------------------------------------

def _annotation(template: dict, key: str) -> dict:
    return json.loads(template["metadata"]["annotations"][key])


def test_prod_puts_search_and_dashboard_behind_iap():
    """The Ingress reaches KubeRay's own Services, each with NEGs and a BackendConfig that turns IAP on
    with the OAuth client Secret, and health checks on paths that need no IAP header."""
    import importlib

    by_kind = collections.defaultdict(list)
    for d in render(CLUSTER / "overlays" / "prod"):
        by_kind[d["kind"]].append(d)
    ingress, rayservice = one(by_kind, "Ingress"), one(by_kind, "RayService")
    backends = {d["metadata"]["name"]: d["spec"] for d in by_kind["BackendConfig"]}
    name = rayservice["metadata"]["name"]
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]
    ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    routes = {r["host"]: r["http"]["paths"][0]["backend"]["service"] for r in ingress["spec"]["rules"]}
    # KubeRay's stable Services of the RayService (they follow the active cluster across upgrades)
    templates = {f"{name}-serve-svc": (rayservice["spec"]["serveService"], "serve"),
                 f"{name}-head-svc": (head["headService"], "dashboard")}
    assert {s["name"] for s in routes.values()} == set(templates)
    health = {}
    for service in routes.values():
        template, port_name = templates[service["name"]]
        port = service["port"]["number"]
        assert port == ports[port_name]
        assert _annotation(template, "cloud.google.com/neg") == {"ingress": True}
        chosen = _annotation(template, "cloud.google.com/backend-config")
        config_name = chosen.get("ports", {}).get(str(port)) or chosen.get("default")
        spec = backends[config_name]
        assert spec["iap"]["enabled"] is True and spec["iap"]["oauthclientCredentials"]["secretName"] == "lookalike-iap-oauth"
        assert spec["healthCheck"]["port"] == port
        health[port_name] = spec["healthCheck"]["requestPath"]
    assert set(backends) == {"lookalike-search-iap", "lookalike-dashboard-iap"}
    # the service's health check is a route of the app that asks for no sign-in (tests/test_auth.py checks it live)
    from serve import app

    assert health["serve"] in app.api.openapi()["paths"]
    healthz = importlib.import_module("inspect").getsource(app.SearchAPI.func_or_class.healthz)
    assert "_authorize" not in healthz
    # the dashboard's is one of the paths Ray's token auth leaves public
    dashboard = importlib.import_module("ray.dashboard.http_server_head")
    assert f'"{health["dashboard"]}"' in Path(dashboard.__file__).read_text()
    # one certificate for exactly the Ingress's hosts, HTTPS only
    assert one(by_kind, "ManagedCertificate")["spec"]["domains"] == list(routes)
    notes = ingress["metadata"]["annotations"]
    assert notes["networking.gke.io/managed-certificates"] == one(by_kind, "ManagedCertificate")["metadata"]["name"]
    assert notes["kubernetes.io/ingress.allow-http"] == "false" and notes["kubernetes.io/ingress.class"] == "gce"
    # the service the RayService runs verifies IAP's header for its backend
    args = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]["args"]
    cfg = config.load(ROOT / args["config"], args.get("set") or [])
    assert cfg.serve.auth == "iap" and re.match(config.IAP_AUDIENCE, cfg.serve.iap.audience)
    assert cfg.serve.iap.certs_url == config.IAP_CERTS_URL
    readme = (ROOT / "README.md").read_text()
    assert "kubectl create secret generic lookalike-iap-oauth" in readme and "roles/iap.httpsResourceAccessor" in readme
    dev = [d["kind"] for d in render(CLUSTER / "overlays" / "dev")]
    assert "Ingress" not in dev and "BackendConfig" not in dev  # dev is reached by port-forward, with the token
