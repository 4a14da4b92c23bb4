"""Write the openAPIV3Schema of CRDs as JSON files here, for tests/test_manifests.py.

The JSON files are derived from KubeRay (github.com/ray-project/kuberay, v1.6.2) and
prometheus-operator (github.com/prometheus-operator/prometheus-operator, v0.93.0), both under
the Apache License 2.0, as is this repository; each file names its source in ``x-source``.

    git -C kuberay show v1.6.2:helm-chart/kuberay-operator/crds/ray.io_rayjobs.yaml \
        | python cluster/schemas/extract.py kuberay-v1.6.2
    git -C kuberay show v1.6.2:ray-operator/apis/ray/v1/rayservice_types.go \
        | python cluster/schemas/extract.py kuberay-v1.6.2 --deprecated ray.io-v1

Descriptions are dropped to keep the files small, except those that mark a field deprecated;
everything that validates is kept as published. KubeRay's published CRDs carry no descriptions
at all, so ``--deprecated`` reads the fields marked ``// Deprecated:`` from its Go API types
(the operator ignores them) into ``deprecated-<group>-<version>.json``, which the test refuses.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def slim(node):
    if isinstance(node, dict):
        out = {k: slim(v) for k, v in node.items() if k != "description"}
        text = node.get("description")
        if isinstance(text, str) and "deprecated" in text.lower():
            out["description"] = text
        return out
    if isinstance(node, list):
        return [slim(v) for v in node]
    return node


def deprecated(go_source: str) -> list[str]:
    """json names of struct fields whose doc comment says Deprecated."""
    return re.findall(r'//\s*Deprecated:[^\n]*\n(?:\s*//[^\n]*\n)*\s*\w+\s+[^`\n]+`json:"(\w+)', go_source)


def main(argv: list[str]) -> int:
    source = argv[0]  # e.g. kuberay-v1.6.2: recorded in each file
    if len(argv) == 3 and argv[1] == "--deprecated":
        out = HERE / f"deprecated-{argv[2]}.json"
        known = json.loads(out.read_text())["fields"] if out.exists() else []
        fields = sorted(set(known) | set(deprecated(sys.stdin.read())))
        out.write_text(json.dumps({"x-source": source, "fields": fields}, indent=1) + "\n")
        print(f"{out.name}: {fields}", file=sys.stderr)
        return 0
    for crd in yaml.safe_load_all(sys.stdin.read()):
        if not crd or crd.get("kind") != "CustomResourceDefinition":
            continue
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if not version.get("storage"):  # the version the API server stores and our manifests use
                continue
            schema = slim(version["schema"]["openAPIV3Schema"])
            schema["x-source"] = source
            out = HERE / f"{kind.lower()}-{group}-{version['name']}.json"
            out.write_text(json.dumps(schema, separators=(",", ":"), sort_keys=True) + "\n")
            print(f"{out.name}: {out.stat().st_size} bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
