"""The OpenAI fine-tuning API: `raylib api` (files and fine_tuning.jobs over raylib jobs on a
Ray cluster) and `provider: openai` (a job YAML sent to such an API), both through the
official `openai` client. Bad requests are 4xx naming the field, before anything reaches Ray;
end to end, a real client fine-tunes the tiny model on a real Ray cluster."""

from __future__ import annotations

import json
import subprocess
import threading
import time

import openai
import pytest
from helpers import RAYLIB, RayHead, free_port, job_dict, run_cli, write_job

from raylib.config import validate_job
from raylib.errors import ConfigError
from raylib.finetune_api import Settings, build_app

KEY = "test-key"
SERVE_KEY = "serve-key"


def _chat_rows(data: dict[str, str], which: str, n: int) -> bytes:
    rows = [json.loads(line) for line in open(data[which])][:n]
    return "".join(json.dumps({"messages": [{"role": "user", "content": r["instruction"] + " " + (r.get("input") or "")},
                                            {"role": "assistant", "content": r["output"]}]}) + "\n"
                   for r in rows).encode()


def _provider_job(model: str, data: dict[str, str], out: str, base_url: str) -> dict:
    """A job YAML for provider openai: only what the fine-tuning API takes."""
    return {"provider": "openai", "provider_options": {"base_url": base_url, "model": "tiny"},
            "model": {"path": model}, "data": {"train": data["train"], "eval": data["eval"], "max_rows": 64},
            "method": {"name": "lora"}, "train": {"epochs": 1, "batch_size": 8}, "output": {"dir": out}}


@pytest.fixture(scope="module")
def api_no_ray(tiny_model, tmp_path_factory):
    """The app in this process (uvicorn on a thread), with no Ray behind it: what is refused
    never reaches Ray."""
    import uvicorn

    port = free_port()
    settings = Settings(root=str(tmp_path_factory.mktemp("api")), models={"tiny": tiny_model}, api_key=KEY,
                        ray_address=f"http://127.0.0.1:{free_port()}")
    server = uvicorn.Server(uvicorn.Config(build_app(settings), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
    server.should_exit = True
    thread.join(timeout=10)


def test_bad_requests_name_the_field_before_ray(api_no_ray, demo_data):
    client = api_no_ray
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=str(client.base_url), api_key="wrong", max_retries=0).files.create(
            file=("t.jsonl", _chat_rows(demo_data, "train", 4)), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("t.jsonl", b"not json\n"), purpose="fine-tune")
    assert err.value.body["param"] == "file"
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("t.jsonl", b'{"prompt": "x"}\n'), purpose="fine-tune")
    assert "messages" in err.value.body["message"]
    good = client.files.create(file=("t.jsonl", _chat_rows(demo_data, "train", 8)), purpose="fine-tune")
    assert good.id.startswith("file-") and good.bytes > 0 and client.files.retrieve(good.id).filename == "t.jsonl"

    cases = [
        (dict(model="gpt-nope", training_file=good.id), "model"),
        (dict(model="tiny", training_file="file-missing"), "training_file"),
        (dict(model="tiny", training_file=good.id, validation_file="file-missing"), "validation_file"),
        (dict(model="tiny", training_file=good.id, hyperparameters={"n_epoch": 2}), "hyperparameters.n_epoch"),
        (dict(model="tiny", training_file=good.id, hyperparameters={"batch_size": 0}), "hyperparameters.batch_size"),
        (dict(model="tiny", training_file=good.id, integrations=[{"type": "wandb", "wandb": {"project": "x"}}]),
         "integrations"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.fine_tuning.jobs.create(**kwargs)
        assert err.value.body["param"] == param, (kwargs, err.value.body)
    # rows the data check rejects (the last message is not the assistant's): a 400 naming the file
    bad = client.files.create(file=("b.jsonl", b'{"messages": [{"role": "user", "content": "hi"}]}\n'),
                              purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(model="tiny", training_file=bad.id)
    assert err.value.body["param"] == "training_file", err.value.body
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-missing")
    # a valid job when no Ray answers: a 503 and no job left behind
    with pytest.raises(openai.InternalServerError) as err:
        client.fine_tuning.jobs.create(model="tiny", training_file=good.id)
    assert err.value.status_code == 503 and err.value.body["code"] == "cluster_unavailable"
    assert client.fine_tuning.jobs.list().data == []


@pytest.mark.parametrize("change, field", [
    ({"train": {"lr": 1e-3}}, "train.lr"),
    ({"backend": {"name": "deepspeed"}}, "backend.name"),
    ({"method": {"name": "svf"}}, "method.name"),
    ({"provider_options": None}, "provider_options"),
    ({"objective": {"name": "dpo"}}, "objective.name"),
])
def test_the_openai_provider_refuses_what_it_cannot_send(tiny_model, demo_data, tmp_path, change, field):
    raw = _provider_job(tiny_model, demo_data, str(tmp_path / "o"), "http://127.0.0.1:1/v1")
    assert validate_job(raw).provider == "openai"
    for section, value in change.items():
        raw[section] = value
    with pytest.raises(ConfigError) as err:
        validate_job(raw)
    assert err.value.field == field, str(err.value)
    raw = job_dict(tiny_model, demo_data, str(tmp_path / "o"))
    raw["provider_options"] = {"model": "tiny"}
    with pytest.raises(ConfigError) as err:
        validate_job(raw)
    assert err.value.field == "provider_options"


def test_provider_openai_through_the_cli_refuses_ray_flags_and_checks_the_data(tiny_model, demo_data, tmp_path):
    job = write_job(tmp_path / "job.yaml", _provider_job(tiny_model, demo_data, str(tmp_path / "o"),
                                                         "http://127.0.0.1:1/v1"))
    resumed = run_cli("train", job, "--resume", env={"OPENAI_API_KEY": KEY})
    assert resumed.returncode == 2 and "--resume" in resumed.stderr, resumed.stderr
    checked = run_cli("validate", job)
    assert checked.returncode == 0 and "64 training rows" in checked.stdout, checked.stdout + checked.stderr
    unreachable = run_cli("train", job, env={"OPENAI_API_KEY": KEY})  # nothing listens on port 1
    assert unreachable.returncode == 1 and "cannot reach the fine-tuning API" in unreachable.stderr, unreachable.stderr


@pytest.mark.slow
def test_a_client_fine_tunes_on_a_ray_cluster_through_raylibs_api(tiny_model, demo_data, tmp_path):
    """`raylib api` on a `ray start` cluster; `raylib train` with provider: openai against it
    (uploads, creates, follows the events, writes expert.json with the model id); the official
    client lists the job and its events, reads the published expert, and cancels a second job."""
    head = RayHead(num_cpus=4)  # logical CPUs: a training run and the serving app's small replicas side by side
    port, serve_port = free_port(), free_port()
    api = subprocess.Popen([RAYLIB, "api", "--port", str(port), "--dir", str(tmp_path / "api"), "--model",
                            f"tiny={tiny_model}", "--ray-address", head.dashboard, "--serve-url",
                            f"http://127.0.0.1:{serve_port}"],
                           env={**head.env, "RAYLIB_API_KEY": KEY, "RAYLIB_SERVE_KEY": SERVE_KEY},
                           stdout=open(tmp_path / "api.log", "w"), stderr=subprocess.STDOUT)
    served = None
    try:
        base = f"http://127.0.0.1:{port}/v1"
        client = openai.OpenAI(base_url=base, api_key=KEY, max_retries=5)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                client.fine_tuning.jobs.list()
                break
            except openai.APIConnectionError:
                time.sleep(0.5)
        out = tmp_path / "run"
        raw = _provider_job(tiny_model, demo_data, str(out), base)
        raw["provider_options"].update(suffix="demo", poll_s=1)
        proc = run_cli("train", write_job(tmp_path / "job.yaml", raw), env={"OPENAI_API_KEY": KEY}, timeout=900)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        info = json.load(open(out / "expert.json"))
        assert info["provider"] == "openai" and info["fine_tuned_model"].startswith("ft-tiny-demo-")
        assert "Step" in proc.stderr and "successfully completed" in proc.stderr

        (job,) = client.fine_tuning.jobs.list().data
        assert job.status == "succeeded" and job.fine_tuned_model == info["fine_tuned_model"]
        assert job.hyperparameters.n_epochs == 1 and job.trained_tokens and job.trained_tokens > 0
        events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
        steps = [e for e in events if e.type == "metrics" and "train_loss" in (e.data or {})]
        assert steps and events[0].message == "The job has successfully completed"
        # the API's run is a raylib expert whose adapter plain PEFT loads
        run_dir = tmp_path / "api" / "jobs" / job.id / "run"
        assert (run_dir / "adapter_model.safetensors").is_file()

        # a second job, cancelled while it runs
        upload = client.files.create(file=("t.jsonl", _chat_rows(demo_data, "train", 200)), purpose="fine-tune")
        second = client.fine_tuning.jobs.create(model="tiny", training_file=upload.id, hyperparameters={"n_epochs": 20})
        assert second.status in ("queued", "running")
        cancelled = client.fine_tuning.jobs.cancel(second.id)
        assert cancelled.status == "cancelled" and cancelled.fine_tuned_model is None
        assert [j.id for j in client.fine_tuning.jobs.list(limit=1).data] == [second.id]  # newest first

        # a serving app on the cluster: the next succeeded job's model answers there by its name
        serve_cfg = tmp_path / "serve.yaml"
        serve_cfg.write_text(json.dumps({
            "base_model": tiny_model, "experts": {"first": {"path": str(run_dir), "resources": {"num_cpus": 0.1}}},
            "base": {"path": tiny_model, "resources": {"num_cpus": 0.1}},
            "router": {"strategy": "keywords", "keywords": {"first": ["+"]}, "resources": {"num_cpus": 0.1}},
            "http": {"port": serve_port}, "api_key": SERVE_KEY, "single_device": True}))
        served = subprocess.Popen([RAYLIB, "serve", str(serve_cfg), "--address", head.address], env=head.env,
                                  stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT)
        app = openai.OpenAI(base_url=f"http://127.0.0.1:{serve_port}/v1", api_key=SERVE_KEY, max_retries=0)
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                app.models.list()
                break
            except (openai.APIConnectionError, openai.APIStatusError):
                time.sleep(1)
        upload = client.files.create(file=("t.jsonl", _chat_rows(demo_data, "train", 16)), purpose="fine-tune")
        third = client.fine_tuning.jobs.create(model="tiny", training_file=upload.id, hyperparameters={"n_epochs": 1})
        deadline = time.time() + 600
        while third.status not in ("succeeded", "failed", "cancelled") and time.time() < deadline:
            time.sleep(2)
            third = client.fine_tuning.jobs.retrieve(third.id)  # a read of the succeeded job registers it
        assert third.status == "succeeded", third
        names = {m.id for m in app.models.list().data}
        assert third.fine_tuned_model in names, names
        answer = app.chat.completions.create(model=third.fine_tuned_model, max_tokens=4, temperature=0,
                                             messages=[{"role": "user", "content": "What is 2 + 3?"}])
        assert answer.choices[0].message.content is not None and answer.model == third.fine_tuned_model
    finally:
        if served is not None:
            served.terminate()
            served.wait(timeout=60)
        api.terminate()
        api.wait(timeout=30)
        head.stop()
