"""Bad input gets one clear line naming the field and the fix, exit 2, before Ray starts."""

from __future__ import annotations

import json

import pytest
from helpers import job_dict, run_cli, write_job

from raylib.config import apply_override, load_job, validate_job
from raylib.errors import ConfigError


@pytest.fixture
def base(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"instruction": "What is 1 + 1?", "input": "", "output": "2"}) + "\n")
    return {"model": {"path": "m"}, "data": {"train": str(data)}, "method": {"name": "lora"}, "output": {"dir": str(tmp_path / "out")}}


def test_minimal_job_gets_defaults(base):
    job = validate_job(base)
    assert job.method.r == 16 and job.train.optimizer == "adamw"
    assert job.scaling.num_workers == 1 and job.backend.name == "accelerate"
    assert job.data.template == "alpaca" and job.data.packing


def test_qlora_defaults_to_nf4_and_paged_adamw(base):
    base["method"] = {"name": "qlora"}
    job = validate_job(base)
    assert job.model.quantization == "nf4" and job.train.optimizer == "paged_adamw_8bit"


def test_svf_gets_its_own_learning_rate_unless_the_job_sets_one(base):
    """z scales singular values around 1: at the schema's LoRA-scale 2e-4 it barely moves."""
    assert validate_job(base).train.lr == 2e-4
    base["method"] = {"name": "svf"}
    assert validate_job(base).train.lr == 0.05
    base["train"] = {"lr": 0.1}
    assert validate_job(base).train.lr == 0.1


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda j: j.setdefault("train", {}).update(lrr=1e-4), "train.lrr: unknown field (did you mean 'lr'?)"),
        (lambda j: j["method"].update(r="sixteen"), "method.r: Input should be a valid integer"),
        (lambda j: j["method"].update(name="loraa"), "method.name: unknown method 'loraa' (did you mean 'lora'?)"),
        (lambda j: j.pop("output"), "output: required field is missing"),
        (lambda j: j["method"].update(name="full", r=8), "method.r: unknown field"),
        (lambda j: j.update(optimiser={}), "optimiser: unknown field"),
        (lambda j: j["data"].update(max_length=-1), "data.max_length: Input should be greater than 0"),
    ],
)
def test_schema_errors_name_the_field(base, mutate, expected):
    mutate(base)
    with pytest.raises(ConfigError) as err:
        validate_job(base)
    assert expected in str(err.value)


def test_full_rejects_quantized_base(base):
    base["method"] = {"name": "full"}
    base["model"]["quantization"] = "nf4"
    with pytest.raises(ConfigError, match="model.quantization: full fine-tuning cannot train"):
        validate_job(base)


def test_overrides_parse_yaml_values(base, tmp_path):
    path = write_job(tmp_path / "job.yaml", base)
    job = load_job(path, ["train.lr=1e-4", "method.r=4", "data.packing=false"])
    assert job.train.lr == 1e-4 and job.method.r == 4 and job.data.packing is False
    with pytest.raises(ConfigError, match="--set"):
        apply_override({}, "train.lr")


# The CLI runs in a subprocess whose RAY_ADDRESS points at a closed port: had it tried to
# reach Ray, it would fail with a connection error instead of the config error asserted.
NO_RAY = {"RAY_ADDRESS": "127.0.0.1:1"}


def _cli_error(*args):
    proc = run_cli(*args, env=NO_RAY, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return proc.returncode, lines


def test_cli_unknown_field_exits_2(base, tmp_path):
    base["train"] = {"epochz": 2}
    code, lines = _cli_error("train", write_job(tmp_path / "job.yaml", base))
    assert code == 2
    assert lines == [f"error: {tmp_path / 'job.yaml'}: train.epochz: unknown field (did you mean 'epochs'?)"]


def test_cli_wrong_type_exits_2(base, tmp_path):
    base["train"] = {"batch_size": "big"}
    code, lines = _cli_error("train", write_job(tmp_path / "job.yaml", base))
    assert code == 2 and len(lines) == 1 and "train.batch_size" in lines[0]


def test_cli_missing_data_file_exits_2(tiny_model, tmp_path):
    job = job_dict(tiny_model, {"train": str(tmp_path / "nope.jsonl"), "eval": None}, str(tmp_path / "out"))
    code, lines = _cli_error("train", write_job(tmp_path / "job.yaml", job))
    assert code == 2 and len(lines) == 1
    assert "data.train:" in lines[0] and "does not exist" in lines[0]


@pytest.mark.parametrize("content", ["", "\n".join(json.dumps({"instruction": "x", "output": ""}) for _ in range(3))])
def test_cli_empty_dataset_exits_2(tiny_model, tmp_path, content):
    data = tmp_path / "empty.jsonl"
    data.write_text(content)
    job = job_dict(tiny_model, {"train": str(data), "eval": None}, str(tmp_path / "out"))
    code, lines = _cli_error("train", write_job(tmp_path / "job.yaml", job))
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: data.train:")
    assert ("is empty" in lines[0]) or ("no usable rows (3 read: 3x empty 'output')" in lines[0])


def test_cli_missing_model_and_job_file(tmp_path, base):
    base["model"]["path"] = str(tmp_path / "no-model")
    code, lines = _cli_error("train", write_job(tmp_path / "job.yaml", base))
    assert code == 2 and "model.path:" in lines[0] and "does not exist" in lines[0]
    code, lines = _cli_error("train", str(tmp_path / "missing.yaml"))
    assert code == 2 and "does not exist" in lines[0]


def test_cli_validate_reports_bad_rows(tiny_model, tmp_path):
    data = tmp_path / "mixed.jsonl"
    rows = [{"instruction": "What is 1 + 1?", "output": "2"}, {"instruction": "x"}, {"output": "y"}]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    job = job_dict(tiny_model, {"train": str(data), "eval": None}, str(tmp_path / "out"))
    proc = run_cli("validate", write_job(tmp_path / "job.yaml", job), env=NO_RAY, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "3 rows, 2 bad" in proc.stdout and "missing 'output'" in proc.stdout


def test_config_errors_survive_pickling():
    """Ray pickles exceptions raised in workers and trials; the driver must see the same error."""
    import pickle

    from raylib.errors import ConfigError, DataError

    for err in (ConfigError("train.lr", "must be positive", "set train.lr > 0"), DataError("data.train", "is empty")):
        again = pickle.loads(pickle.dumps(err))
        assert type(again) is type(err) and str(again) == str(err) and again.field == err.field


def test_every_example_job_validates():
    """jobs/examples/*.yaml are what users copy: each is a valid job (search.yaml: a search)."""
    import glob
    import os

    from raylib.config import load_job

    root = os.path.join(os.path.dirname(__file__), "..", "jobs", "examples")
    names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(root, "*.yaml")))
    assert {"dpo.yaml", "dpo-svf.yaml", "simpo.yaml", "orpo.yaml", "kto.yaml", "reward.yaml", "lora.yaml"} <= set(names)
    for name in names:
        if name != "search.yaml":
            load_job(os.path.join(root, name))
