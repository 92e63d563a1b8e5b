"""cluster/: the launcher YAML, KubeRay manifests, runtime_env and Dockerfile parse, carry the
keys their tools require, and name entrypoints/files that exist in this repository."""

from __future__ import annotations

import ast
import os
import sys
import shlex

import pytest
import yaml
from helpers import REPO

CLUSTER = os.path.join(REPO, "cluster")


def load_all(name: str) -> list[dict]:
    with open(os.path.join(CLUSTER, name)) as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs), name
    return docs


def by_kind(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, got {[d.get('kind') for d in docs]}"
    return found[0]


def check_pod_template(template: dict, gpu: bool) -> None:
    containers = template["spec"]["containers"]
    assert containers and all(c.get("image") for c in containers)
    if gpu:
        assert any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in containers)


def check_ray_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"].startswith("2.")
    check_pod_template(spec["headGroupSpec"]["template"], gpu=False)
    assert "rayStartParams" in spec["headGroupSpec"]
    groups = spec["workerGroupSpecs"]
    assert groups
    for g in groups:
        assert {"groupName", "rayStartParams", "template", "minReplicas", "maxReplicas"} <= set(g)
        assert g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]
        check_pod_template(g["template"], gpu=True)


def test_cluster_launcher_yaml():
    (cfg,) = load_all("ray-cluster-gpu.yaml")
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands", "max_workers"):
        assert key in cfg, key
    assert cfg["provider"]["type"]
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    workers = [t for n, t in types.items() if n != cfg["head_node_type"]]
    assert any(t["max_workers"] > t.get("min_workers", 0) for t in workers), "workers must autoscale"
    assert any("g" in t["node_config"]["InstanceType"].split(".")[0] for t in workers), "a GPU instance type"
    for t in types.values():
        assert "resources" in t and "node_config" in t
    setup = " ".join(cfg["setup_commands"])
    assert "pip install" in setup and "raylib" in setup, "setup installs raylib"
    # the project is mounted where setup installs it from
    assert "." in cfg["file_mounts"].values()
    assert any("ray start --head" in c or "ray start --head" in c.replace("~/venv/bin/", "")
               for c in cfg["head_start_ray_commands"])
    assert any("--address" in c for c in cfg["worker_start_ray_commands"])


def test_kuberay_raycluster():
    doc = by_kind(load_all("kuberay/raycluster.yaml"), "RayCluster")
    assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["name"]
    spec = doc["spec"]
    check_ray_cluster_spec(spec)
    assert spec["enableInTreeAutoscaling"] is True


def test_kuberay_rayjob_runs_finetune_with_the_configmap_job(tmp_path):
    docs = load_all("kuberay/rayjob.yaml")
    job = by_kind(docs, "RayJob")
    cm = by_kind(docs, "ConfigMap")
    spec = job["spec"]
    check_ray_cluster_spec(spec["rayClusterSpec"])
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "python"
    script = argv[1]
    # the image copies the repository to /app (Dockerfile): the script must exist here
    assert script.startswith("/app/")
    assert os.path.isfile(os.path.join(REPO, script.removeprefix("/app/"))), script
    # the job YAML argument is a key of the ConfigMap mounted into the head pod
    config_path = argv[2]
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for c in head["containers"] for m in c.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in head["volumes"]}
    mount_name = next(n for n, p in mounts.items() if config_path.startswith(p + "/"))
    assert volumes[mount_name]["configMap"]["name"] == cm["metadata"]["name"]
    key = os.path.basename(config_path)
    assert key in cm["data"]
    # and it is a valid raylib job
    from raylib.config import validate_job

    parsed = validate_job(yaml.safe_load(cm["data"][key]), source="configmap")
    assert parsed.output.dir.startswith("/shared/")
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"] == "/app"


def test_kuberay_rayservice_names_the_serve_app():
    doc = by_kind(load_all("kuberay/rayservice.yaml"), "RayService")
    check_ray_cluster_spec(doc["spec"]["rayClusterConfig"])
    serve = yaml.safe_load(doc["spec"]["serveConfigV2"])
    (app,) = serve["applications"]
    assert app["import_path"] == "serve.app:build_app"
    module, func = app["import_path"].split(":")
    path = os.path.join(REPO, *module.split(".")) + ".py"
    tree = ast.parse(open(path).read())
    names = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    names |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    assert func in names, f"{path} defines no {func}"
    # build_app(args) takes a raylib serve config file on the shared volume
    assert app["args"]["config"].startswith("/shared/")


def test_serve_config_file_names_a_valid_raylib_serve_config():
    """serve/serve_config.yaml (serve run / serve deploy) points build_app at serve/config.yaml,
    which must pass raylib's serve-config schema."""
    sys_path = list(sys.path)
    sys.path.insert(0, REPO)
    try:
        from serve.config import load_serve_config
    finally:
        sys.path[:] = sys_path
    doc = yaml.safe_load(open(os.path.join(REPO, "serve", "serve_config.yaml")))
    (app,) = doc["applications"]
    assert app["import_path"] == "serve.app:build_app"
    cfg_path = os.path.join(REPO, app["args"]["config"])
    assert os.path.isfile(cfg_path)
    load_serve_config(cfg_path, [], check_paths=False)  # the experts are trained by the user (README)


def test_runtime_env_example():
    (env,) = load_all("runtime_env.yaml")
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**env)  # Ray's own validation of the keys and values
    assert isinstance(env["env_vars"], dict) and all(isinstance(v, str) for v in env["env_vars"].values())
    assert ".venv" in env["excludes"]


def test_dockerfile_installs_raylib_and_copies_the_repo():
    text = open(os.path.join(CLUSTER, "Dockerfile")).read()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert lines[0].startswith("FROM rayproject/ray:")
    assert "COPY . /app" in lines
    assert "pip install" in text and "/app" in text
    ignore = open(os.path.join(CLUSTER, "Dockerfile.dockerignore")).read().split()
    assert ".venv" in ignore
