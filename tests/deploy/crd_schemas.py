"""Vendors the JSON schemas of the CRDs deploy/k8s uses, from the CRD manifests their projects publish:

    python tests/deploy/crd_schemas.py CRD.yaml [CRD.yaml ...]

writes tests/deploy/crd-schemas/<group>_<kind>_<version>.json: each served version's openAPIV3Schema with the
descriptions dropped (they are most of the bytes), plus `x-kubernetes-*` kept as they are (jsonschema ignores
them). tests/deploy/test_manifests.py validates rendered objects of those kinds against these files; where
each came from is in crd-schemas/SOURCES.md.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

OUT = Path(__file__).parent / "crd-schemas"


def _strip(node):
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def main(paths: list[str]) -> int:
    for path in paths:
        for crd in yaml.safe_load_all(Path(path).read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if not version.get("served", True):
                    continue
                schema = _strip(version["schema"]["openAPIV3Schema"])
                out = OUT / f"{group}_{kind}_{version['name']}.json".lower()
                out.write_text(json.dumps(schema, sort_keys=True, separators=(",", ":")) + "\n")
                print(f"{out} ({out.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
