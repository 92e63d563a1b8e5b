"""cluster/ and serve/serve_config.yaml, each checked by the validator of the tool that reads it:

- cluster/ray-cluster-gpu.yaml: Ray's cluster launcher, as `ray up` prepares and validates it
  (prepare_config, validate_config: ray-schema.json plus its cross-field checks)
- serve/serve_config.yaml and the RayService's serveConfigV2: Ray Serve's ServeDeploySchema
  (`serve run`, `serve deploy`, and the dashboard API that KubeRay sends serveConfigV2 to)
- every runtime_env in these files: ray.runtime_env.RuntimeEnv
- cluster/kuberay/*.yaml: the KubeRay CRDs' OpenAPI schemas (tests/data/kuberay, KubeRay
  v1.7.0) with jsonschema, given the Kubernetes semantics the API server adds to them

Each validator is also shown refusing a broken copy, so a pass means something. Beyond the
schemas: the files and entrypoints they name exist in this repository."""

from __future__ import annotations

import ast
import copy
import functools
import gzip
import json
import os
import re
import shlex

import jsonschema
import pytest
import yaml
from helpers import REPO

CLUSTER = os.path.join(REPO, "cluster")
KUBERAY_DATA = os.path.join(REPO, "tests", "data", "kuberay")
KUBERAY_VERSION = "v1.7.0"  # of the vendored schemas: tests/data/kuberay/README.md
CRD_SCHEMAS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices"}


def load_all(name: str) -> list[dict]:
    with open(os.path.join(CLUSTER, name)) as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs), name
    return docs


def by_kind(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, got {[d.get('kind') for d in docs]}"
    return found[0]


def dockerfile_ray_version() -> str:
    text = open(os.path.join(CLUSTER, "Dockerfile")).read()
    return re.search(r"^FROM rayproject/ray:([0-9.]+)-", text, re.M).group(1)


# ---------------------------------------------------------------- ray up (cluster launcher)


def launcher_config() -> dict:
    (cfg,) = load_all("ray-cluster-gpu.yaml")
    return cfg


def ray_up_validate(cfg: dict) -> dict:
    """What `ray up` does to the file before it calls the cloud (commands._bootstrap_config):
    fill in the provider's defaults, then validate. Returns the prepared config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def test_ray_up_config_passes_rays_validation():
    cfg = launcher_config()
    prepared = ray_up_validate(cfg)
    types = prepared["available_node_types"]
    workers = [t for n, t in types.items() if n != prepared["head_node_type"]]
    assert any(t["max_workers"] > t.get("min_workers", 0) for t in workers), "workers must autoscale"
    assert any(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers), "a GPU instance type"
    setup = " ".join(prepared["setup_commands"])
    assert "pip install -e ~/raylib" in setup, "setup installs raylib from the mounted copy"
    assert prepared["file_mounts"]["~/raylib"] == ".", "the project is mounted where setup installs it from"
    assert any("ray start --head" in c for c in prepared["head_start_ray_commands"])
    assert any("--address" in c for c in prepared["worker_start_ray_commands"])


@pytest.mark.parametrize("breakage, error", [
    (lambda c: c.update(rsync_excludes=[".venv"]), jsonschema.ValidationError),  # a misspelt key
    (lambda c: c.update(rsync_exclude=".venv"), jsonschema.ValidationError),  # a string, not a list
    (lambda c: c.update(head_node_type="gpu"), ValueError),  # not one of available_node_types
    (lambda c: c["available_node_types"]["gpu_worker"].update(min_workers=9), ValueError),  # > max_workers
])
def test_ray_up_validation_refuses_a_broken_copy(breakage, error):
    cfg = launcher_config()
    breakage(cfg)
    with pytest.raises(error):
        ray_up_validate(cfg)


def test_ray_up_nodes_boot_an_ubuntu_deep_learning_ami():
    """An explicit ImageId: AWS's current Ubuntu 22.04 DLAMI, looked up by EC2 in AWS's public
    SSM parameter for the cluster's region (no AMI id that only exists in one region)."""
    from ray.autoscaler._private.aws.config import DEFAULT_AMI, DEFAULT_AMI_NAME, _check_ami

    cfg = ray_up_validate(launcher_config())
    (image,) = {t["node_config"].get("ImageId") for t in cfg["available_node_types"].values()}
    assert re.fullmatch(r"resolve:ssm:/aws/service/deeplearning/ami/x86_64/[a-z0-9-]+-ubuntu-22\.04/latest/ami-id",
                        image), image
    # Ray's AWS bootstrap keeps it ...
    checked = copy.deepcopy(cfg)
    _check_ami(checked)
    assert {t["node_config"]["ImageId"] for t in checked["available_node_types"].values()} == {image}
    # ... where an omitted one becomes Ray's default, an Ubuntu 18.04 DLAMI too old for cu128 torch
    for t in checked["available_node_types"].values():
        del t["node_config"]["ImageId"]
    _check_ami(checked)
    region = cfg["provider"]["region"]
    assert {t["node_config"]["ImageId"] for t in checked["available_node_types"].values()} == {DEFAULT_AMI[region]}
    assert "Ubuntu 18.04" in DEFAULT_AMI_NAME


def test_ray_up_rsync_leaves_the_venv_and_local_artifacts_behind():
    """The arguments ray up's SSH command runner gives rsync for file_mounts (the `rsync_options`
    commands.py builds from the config)."""
    from ray.autoscaler._private.command_runner import SSHCommandRunner

    cfg = ray_up_validate(launcher_config())
    runner = SSHCommandRunner("", "node", None, cfg["auth"], cfg["cluster_name"], None, False)
    args = runner._create_rsync_filter_args(
        {"rsync_exclude": cfg.get("rsync_exclude"), "rsync_filter": cfg.get("rsync_filter")})
    excluded = {value for flag, value in zip(args[::2], args[1::2]) if flag == "--exclude"}
    assert {".venv", ".git", "/models/", "/data/", "/runs/"} <= excluded, args
    # and whatever .gitignore lists (rsync reads it in every directory)
    assert ["--filter", "dir-merge,- .gitignore"] == args[-2:]
    assert ".venv" in open(os.path.join(REPO, ".gitignore")).read().split()


# ---------------------------------------------------------------- Ray Serve config files


def serve_config_file() -> dict:
    return yaml.safe_load(open(os.path.join(REPO, "serve", "serve_config.yaml")))


def rayservice_serve_config() -> dict:
    doc = by_kind(load_all("kuberay/rayservice.yaml"), "RayService")
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


SERVE_CONFIGS = {"serve/serve_config.yaml": serve_config_file, "RayService serveConfigV2": rayservice_serve_config}


def app_builder_exists(import_path: str) -> None:
    """The module is found by Python's own import machinery (the installed raylib) and defines
    the builder; parsed, not imported, so a typo fails here with its name."""
    import importlib.util

    module, func = import_path.split(":")
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"{module} is not importable"
    path = spec.origin
    tree = ast.parse(open(path).read())
    names = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    names |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    assert func in names, f"{path} defines no {func}"


@pytest.mark.parametrize("name", SERVE_CONFIGS)
def test_serve_config_passes_serve_deploy_schema(name):
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(SERVE_CONFIGS[name]())
    (app,) = config.applications
    assert app.import_path == "raylib.serve.app:build_app"
    app_builder_exists(app.import_path)
    # no working_dir: the nodes import raylib.serve.app from the raylib installed there
    assert not (app.runtime_env or {}).get("working_dir")


@pytest.mark.parametrize("working_dir", [".", "/app"])  # what both files had: local paths
def test_serve_deploy_schema_refuses_a_local_working_dir(working_dir):
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    for load in SERVE_CONFIGS.values():
        config = load()
        config["applications"][0]["runtime_env"] = {"working_dir": working_dir}
        with pytest.raises(ValidationError, match="working_dir"):
            ServeDeploySchema.model_validate(config)


def test_serve_config_file_names_a_valid_raylib_serve_config():
    """serve/serve_config.yaml points build_app at serve/config.yaml (relative: `serve run` from
    the repository root), which must pass raylib's serve-config schema."""
    from raylib.serve.config import load_serve_config

    (app,) = serve_config_file()["applications"]
    cfg_path = os.path.join(REPO, app["args"]["config"])
    assert os.path.isfile(cfg_path)
    load_serve_config(cfg_path, [], check_paths=False)  # the experts are trained by the user (README)


def test_rayservice_serve_app_reads_its_config_from_the_shared_volume():
    (app,) = rayservice_serve_config()["applications"]
    assert app["args"]["config"].startswith("/shared/")


# ---------------------------------------------------------------- runtime_env


def runtime_envs() -> dict[str, dict]:
    """Every runtime_env these files hold, by where it is."""
    (env_file,) = load_all("runtime_env.yaml")
    job = by_kind(load_all("kuberay/rayjob.yaml"), "RayJob")
    envs = {"cluster/runtime_env.yaml": env_file,
            "RayJob runtimeEnvYAML": yaml.safe_load(job["spec"]["runtimeEnvYAML"])}
    for name, load in SERVE_CONFIGS.items():
        for app in load()["applications"]:
            if "runtime_env" in app:
                envs[f"{name} {app['name']}"] = app["runtime_env"]
    return envs


@pytest.mark.parametrize("where", runtime_envs())
def test_runtime_env_passes_rays_runtime_env(where):
    from ray.runtime_env import RuntimeEnv

    env = runtime_envs()[where]
    RuntimeEnv(**env)  # Ray's validation of each field's value
    assert set(env) <= RuntimeEnv.known_fields, "other keys are taken for runtime_env plugin names"


@pytest.mark.parametrize("env, error", [
    ({"env_vars": {"TOKENIZERS_PARALLELISM": False}}, r"must be of type Dict\[str, str\]"),
    ({"pip": "sacrebleu>=2.4"}, "is not a valid file"),  # a string names a requirements file
    ({"working_dir": "/nonexistent/app"}, "is not a valid path"),
])
def test_runtime_env_refuses_a_broken_one(env, error):
    from ray.runtime_env import RuntimeEnv

    with pytest.raises((TypeError, ValueError), match=error):
        RuntimeEnv(**env)


def test_runtime_env_example_ships_the_project_without_the_venv():
    env = runtime_envs()["cluster/runtime_env.yaml"]
    assert env["working_dir"] == "."  # raylib submit / ray job submit upload it, unlike Serve
    assert ".venv" in env["excludes"]


# ---------------------------------------------------------------- KubeRay manifests


def kubernetes_schema(schema):
    """A CRD's openAPIV3Schema as plain JSON Schema, with the meaning the API server gives it:
    - x-kubernetes-int-or-string: an integer or a string (quantities: `4`, `"4"`, `"16Gi"`),
      a string still matching the node's pattern;
    - nullable: null is allowed too;
    - an object with properties refuses other fields (strict field validation, kubectl's
      default), unless x-kubernetes-preserve-unknown-fields keeps them."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in out:
        out["properties"] = {name: kubernetes_schema(s) for name, s in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = kubernetes_schema(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [kubernetes_schema(s) for s in out[key]]
    return out


def list_type(validator, kind, instance, schema):
    """x-kubernetes-list-type: a `set` holds no duplicates, a `map` no two items with the same
    x-kubernetes-list-map-keys (e.g. two containers with one name)."""
    if not isinstance(instance, list):
        return
    if kind == "set":
        keys = [json.dumps(item, sort_keys=True) for item in instance]
    elif kind == "map":
        names = schema["x-kubernetes-list-map-keys"]
        keys = [", ".join(f"{n}={item.get(n)}" for n in names) for item in instance]
    else:  # atomic
        return
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        yield jsonschema.ValidationError(f"duplicate entries in a list of type {kind}: {duplicates}")


KubernetesValidator = jsonschema.validators.extend(jsonschema.Draft4Validator, {"x-kubernetes-list-type": list_type})


@functools.cache
def crd_schema(kind: str) -> dict:
    with gzip.open(os.path.join(KUBERAY_DATA, f"{CRD_SCHEMAS[kind]}.json.gz")) as f:
        return json.load(f)


@functools.cache
def crd_validator(kind: str):
    schema = kubernetes_schema(crd_schema(kind))
    KubernetesValidator.check_schema(schema)
    return KubernetesValidator(schema)


def kuberay_errors(doc: dict) -> list[str]:
    errors = crd_validator(doc["kind"]).iter_errors(doc)
    return sorted(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def cel_rule_paths(schema, path=()):
    """Paths (`*` for any list item or map value) of the fields that carry CEL rules
    (x-kubernetes-validations), which jsonschema cannot evaluate."""
    if not isinstance(schema, dict):
        return
    if "x-kubernetes-validations" in schema:
        yield path
    for name, sub in schema.get("properties", {}).items():
        yield from cel_rule_paths(sub, path + (name,))
    for key in ("items", "additionalProperties"):
        yield from cel_rule_paths(schema.get(key), path + ("*",))


def is_set(doc, path) -> bool:
    if not path:
        return True
    head, rest = path[0], path[1:]
    if head == "*":
        values = doc if isinstance(doc, list) else list(doc.values()) if isinstance(doc, dict) else []
        return any(is_set(v, rest) for v in values)
    return isinstance(doc, dict) and head in doc and is_set(doc[head], rest)


MANIFESTS = {"RayCluster": "kuberay/raycluster.yaml", "RayJob": "kuberay/rayjob.yaml",
             "RayService": "kuberay/rayservice.yaml"}


def manifest(kind: str) -> dict:
    return by_kind(load_all(MANIFESTS[kind]), kind)


def test_vendored_kuberay_schemas_are_the_named_release():
    readme = open(os.path.join(KUBERAY_DATA, "README.md")).read()
    assert f"release **{KUBERAY_VERSION}**" in readme
    for kind in CRD_SCHEMAS:
        assert crd_schema(kind)["properties"]["kind"]["type"] == "string"


@pytest.mark.parametrize("kind", MANIFESTS)
def test_kuberay_manifest_passes_the_crd_schema(kind):
    doc = manifest(kind)
    assert doc["apiVersion"] == "ray.io/v1"  # the version the vendored schema is for
    assert kuberay_errors(doc) == []
    unchecked = [p for p in cel_rule_paths(crd_schema(kind)) if is_set(doc, p)]
    assert unchecked == [], f"fields with CEL rules this test cannot evaluate: {unchecked}"


def gpu_group(doc: dict) -> dict:
    return doc["spec"]["workerGroupSpecs"][0]


def gpu_container(doc: dict) -> dict:
    return gpu_group(doc)["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("breakage, error", [
    (lambda d: gpu_group(d).update(minReplica=0), r"workerGroupSpecs\.0: Additional properties .*'minReplica'"),
    (lambda d: gpu_group(d).update(replicas="two"), r"workerGroupSpecs\.0\.replicas: 'two' is not of type 'integer'"),
    (lambda d: gpu_container(d)["resources"]["limits"].update(memory="64 GB"),
     r"limits\.memory: '64 GB' does not match"),
    (lambda d: gpu_container(d)["resources"]["limits"].update(cpu=[8]), r"limits\.cpu: \[8\] is not valid"),
    (lambda d: gpu_container(d).pop("name"), r"containers\.0: 'name' is a required property"),
    (lambda d: gpu_group(d)["template"]["spec"]["containers"].append(dict(gpu_container(d))),
     r"containers: duplicate entries in a list of type map: \['name=ray-worker'\]"),
    (lambda d: d["spec"].update(enableInTreeAutoscaling="yes"),
     r"enableInTreeAutoscaling: 'yes' is not of type 'boolean'"),
])
def test_crd_schema_refuses_a_broken_manifest(breakage, error):
    doc = copy.deepcopy(manifest("RayCluster"))
    breakage(doc)
    errors = kuberay_errors(doc)
    assert len(errors) == 1 and re.search(error, errors[0]), errors


@pytest.mark.parametrize("cpu", [8, "8", "7500m"])
def test_crd_schema_takes_a_quantity_as_int_or_string(cpu):
    doc = copy.deepcopy(manifest("RayCluster"))
    gpu_container(doc)["resources"]["limits"]["cpu"] = cpu
    assert kuberay_errors(doc) == []


def check_ray_cluster_spec(spec: dict) -> None:
    """What the manifests are for, beyond their schema: the image's Ray, GPU workers."""
    assert spec["rayVersion"] == dockerfile_ray_version()
    groups = spec["workerGroupSpecs"]
    assert groups
    for g in groups:
        assert g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]
        containers = g["template"]["spec"]["containers"]
        assert any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in containers)


def test_kuberay_raycluster_autoscales_gpu_workers():
    spec = manifest("RayCluster")["spec"]
    check_ray_cluster_spec(spec)
    assert spec["enableInTreeAutoscaling"] is True
    assert any(g["maxReplicas"] > g["minReplicas"] for g in spec["workerGroupSpecs"])


def test_kuberay_rayjob_runs_finetune_with_the_configmap_job():
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


def test_kuberay_rayservice_runs_on_gpu_workers():
    check_ray_cluster_spec(manifest("RayService")["spec"]["rayClusterConfig"])


# ---------------------------------------------------------------- the image


def test_dockerfile_installs_raylib_and_copies_the_repo():
    text = open(os.path.join(CLUSTER, "Dockerfile")).read()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert lines[0].startswith("FROM rayproject/ray:")
    assert "COPY . /app" in lines
    assert re.search(r"pip install [^\n]*-e \"/app\[", text), "installs the copy (serve/ included) in place"
    ignore = open(os.path.join(CLUSTER, "Dockerfile.dockerignore")).read().split()
    assert ".venv" in ignore
