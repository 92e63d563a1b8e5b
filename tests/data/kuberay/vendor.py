"""Regenerate the vendored KubeRay CRD schemas from a KubeRay checkout:

    git clone https://github.com/ray-project/kuberay /tmp/kuberay
    python tests/data/kuberay/vendor.py /tmp/kuberay v1.7.0

For each CRD (ray-operator/config/crd/bases/ray.io_<plural>.yaml at TAG) this keeps only the
openAPIV3Schema of the storage version (ray.io/v1), drops the `description` texts (they are
most of the bytes and never validate anything) and writes <plural>.json.gz next to this file.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import yaml

PLURALS = ("rayclusters", "rayjobs", "rayservices")
HERE = os.path.dirname(os.path.abspath(__file__))


def without_descriptions(schema):
    """The schema minus its `description` keywords (a property *named* description stays)."""
    if not isinstance(schema, dict):
        return schema
    out = {k: v for k, v in schema.items() if k != "description"}
    if "properties" in out:
        out["properties"] = {name: without_descriptions(s) for name, s in out["properties"].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = without_descriptions(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [without_descriptions(s) for s in out[key]]
    return out


def main(checkout: str, tag: str) -> None:
    commit = subprocess.check_output(["git", "-C", checkout, "rev-parse", f"{tag}^{{commit}}"], text=True).strip()
    for plural in PLURALS:
        path = f"ray-operator/config/crd/bases/ray.io_{plural}.yaml"
        crd = yaml.safe_load(subprocess.check_output(["git", "-C", checkout, "show", f"{tag}:{path}"]))
        (version,) = [v for v in crd["spec"]["versions"] if v["storage"]]
        assert version["name"] == "v1" and version["served"], version["name"]
        schema = without_descriptions(version["schema"]["openAPIV3Schema"])
        data = json.dumps(schema, sort_keys=True, separators=(",", ":")).encode()
        with open(os.path.join(HERE, f"{plural}.json.gz"), "wb") as f:
            f.write(gzip.compress(data, mtime=0))
        print(f"{crd['spec']['names']['kind']} {version['name']}: {path} @ {tag} ({commit})")


if __name__ == "__main__":
    main(*sys.argv[1:3])
