"""Turn a CRD's openAPIV3Schema (transcribed in *.openapi.yaml) into the JSON Schema check-jsonschema reads.

    python deploy/kubernetes/schemas/to_jsonschema.py     rewrites keda-*/*.schema.json

What changes, and why (nothing else does):
- every object that lists `properties` gets `additionalProperties: false` (unless it says otherwise):
  an unknown field is an error, as with `kubectl apply --validate=strict` (the default since
  Kubernetes 1.27), not silently pruned by the API server;
- `apiVersion` and `kind` are pinned (`const`) and required with `metadata`, so that a document of
  another kind cannot pass;
- `format: int32` and `x-kubernetes-*` markers are dropped (JSON Schema has no such keywords).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
KINDS = {"scaledobject": "ScaledObject", "triggerauthentication": "TriggerAuthentication"}
API_VERSION = "keda.sh/v1alpha1"


def convert(node: Any) -> Any:
    if isinstance(node, list):
        return [convert(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {
        key: convert(value)
        for key, value in node.items()
        if not key.startswith("x-kubernetes-") and not (key == "format" and value == "int32")
    }
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def schema_of(source: Path) -> dict[str, Any]:
    kind = KINDS[source.name.split(".")[0]]
    schema = convert(yaml.safe_load(source.read_text()))
    schema["properties"]["apiVersion"] = {"type": "string", "const": API_VERSION}
    schema["properties"]["kind"] = {"type": "string", "const": kind}
    schema["required"] = ["apiVersion", "kind", "metadata", *schema.get("required", [])]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"{kind} ({API_VERSION}), from KEDA's CRD: see README.md beside this file",
        **schema,
    }


def render(source: Path) -> str:
    return json.dumps(schema_of(source), indent=1, sort_keys=False) + "\n"


def main() -> int:
    for source in sorted(HERE.glob("keda-*/*.openapi.yaml")):
        target = source.with_name(source.name.replace(".openapi.yaml", ".schema.json"))
        target.write_text(render(source))
        print(f"wrote {target.relative_to(HERE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
