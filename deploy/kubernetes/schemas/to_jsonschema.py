"""The JSON Schema check-jsonschema reads, made from one of KEDA's vendored CRD files (see README.md).

    python deploy/kubernetes/schemas/to_jsonschema.py keda-2.16.1/crd-scaledobjects.yaml > so.json

tests/integration/test_kubernetes.py calls `schema_of()` on the vendored files at every run: no JSON
schema is stored, so the one checked is always the CRD's. What it does, mechanically, nothing else:
- drops the Helm chart's template lines (`{{ ... }}`: the chart's install switch, labels and
  annotations, all outside `spec`; refused if one is found inside it);
- takes `spec.versions[name].schema.openAPIV3Schema` of the CRD, unchanged but for:
- `additionalProperties: false` on every object that lists `properties` (unless it says otherwise or
  carries `x-kubernetes-preserve-unknown-fields`): an unknown field is an error, as with
  `kubectl apply --validate=strict` (the default since Kubernetes 1.27), not silently pruned;
- `x-kubernetes-*` markers dropped (JSON Schema has no such keywords);
- `apiVersion` pinned to the CRD's group/version and `kind` to its `names.kind`, both required with
  `metadata`, so that a document of another kind (a ClusterTriggerAuthentication, say) cannot pass.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

VERSION = "v1alpha1"


def crd_of(source: Path) -> dict[str, Any]:
    """The CustomResourceDefinition in `source`, without the Helm chart's template lines."""
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    spec_at = lines.index("spec:\n")
    templated = [n for n, line in enumerate(lines) if "{{" in line]
    if any(n > spec_at for n in templated if not lines[n].startswith("{{- end")):
        raise ValueError(f"{source}: a template line inside the CRD's spec; this script only drops metadata ones")
    crd = yaml.safe_load("".join(line for line in lines if "{{" not in line))
    if crd.get("kind") != "CustomResourceDefinition":
        raise ValueError(f"{source}: not a CustomResourceDefinition")
    return crd


def openapi_schema(crd: dict[str, Any], version: str = VERSION) -> dict[str, Any]:
    [served] = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema: dict[str, Any] = served["schema"]["openAPIV3Schema"]
    return schema


def convert(node: Any) -> Any:
    if isinstance(node, list):
        return [convert(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: convert(value) for key, value in node.items() if not key.startswith("x-kubernetes-")}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def schema_of(source: Path, version: str = VERSION) -> dict[str, Any]:
    """The JSON Schema of the custom resource the CRD file `source` defines."""
    crd = crd_of(source)
    kind, api_version = crd["spec"]["names"]["kind"], f"{crd['spec']['group']}/{version}"
    schema = convert(openapi_schema(crd, version))
    schema["properties"]["apiVersion"] = {"type": "string", "const": api_version}
    schema["properties"]["kind"] = {"type": "string", "const": kind}
    schema["required"] = ["apiVersion", "kind", "metadata", *schema.get("required", [])]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"{kind} ({api_version}) from {source.parent.name}/{source.name}",
        **schema,
    }


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    print(json.dumps(schema_of(Path(argv[0])), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
