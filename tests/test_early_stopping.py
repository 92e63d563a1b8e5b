"""Early stopping (`train.early_stopping`) and `output.publish: best`, in the one loop every
objective shares (`recipe.fit`): in-process, through Ray Train and the CLI, and in Tune trials."""

from __future__ import annotations

import json
import os

import pytest
from helpers import job_dict, run_cli, write_job

from raylib.config import validate_job
from raylib.errors import ConfigError
from raylib.train_loop import PlainSession, run


def _never_improves(**train) -> dict:
    """An improvement must exceed 100 nats of eval loss: none does, so the run stops after
    `patience` evals whatever the CPU's rounding."""
    return {"max_steps": 20, "eval_every": 2, "checkpoint_every": 2, "lr_scheduler": "constant",
            "early_stopping": {"metric": "eval_loss", "patience": 3, "min_delta": 100.0}, **train}


def test_early_stopping_stops_checkpoints_and_resumes_to_the_same_stop(tiny_model, demo_data, tmp_path):
    job = validate_job(job_dict(tiny_model, demo_data, str(tmp_path / "o"), train=_never_improves()))
    assert job.train.early_stopping.mode == "min"  # a loss: lower is better
    assert validate_job(job_dict(tiny_model, demo_data, "o", train={
        "early_stopping": {"metric": "eval_token_accuracy"}})).train.early_stopping.mode == "max"
    full = PlainSession(str(tmp_path / "full"))
    out = run(job, full)
    # evals at 2, 4, 6 do not beat the base's eval loss by 100: stop at step 6 of 20, with a checkpoint
    assert out["step"] == 6 and [r["step"] for r in full.reports] == [2, 4, 6]
    final = full.reports[-1]
    assert "did not improve" in final["stopped_early"] and "eval_loss" in final["stopped_early"]
    assert os.path.isfile(os.path.join(final["checkpoint"], "expert", "adapter_model.safetensors"))
    assert out["state"].watch["early_stopping"]["step"] == 0  # the base stays the best
    assert [e["step"] for e in full.events if e["type"] == "eval" and e.get("stopped_early")] == [6]

    # resumed from step 2 (one eval without improvement recorded), it stops where the run did
    resumed = PlainSession(str(tmp_path / "resumed"), resume_from=full.reports[0]["checkpoint"])
    assert run(job, resumed)["step"] == 6 and resumed.reports[-1]["stopped_early"] == final["stopped_early"]
    # resumed from the stopping checkpoint, a stopped run trains no further
    again = PlainSession(str(tmp_path / "again"), resume_from=final["checkpoint"])
    out = run(job, again)
    assert out["step"] == 6 and not [e for e in again.events if e["type"] == "step"] and not again.reports
    assert out["state"].stopped_early == final["stopped_early"]


def test_an_improving_run_is_not_stopped(tiny_model, demo_data, tmp_path):
    job = validate_job(job_dict(tiny_model, demo_data, str(tmp_path / "o"), train=_never_improves(
        max_steps=8, early_stopping={"metric": "eval_loss", "patience": 3})))
    session = PlainSession(str(tmp_path / "ck"))
    out = run(job, session)
    final = session.reports[-1]
    assert out["step"] == 8 and "stopped_early" not in final and final["eval_loss"] < final["eval_loss_before"]
    assert out["state"].watch["early_stopping"]["step"] > 0  # a trained step beat the base


def test_rl_objectives_stop_early_on_their_eval_reward(tiny_model, tmp_path):
    from raylib.synthetic import write_dataset

    data = write_dataset(str(tmp_path / "data"), 60, 16, ["comparison"])
    job = validate_job(job_dict(
        tiny_model, data, str(tmp_path / "o"), method={"name": "lora", "r": 4, "dropout": 0.0},
        objective={"name": "reinforce", "reward": "tests.rl_rewards:is_number", "num_samples": 2,
                   "max_new_tokens": 4, "eval_rows": 8},
        train={"lr": 1e-3, "batch_size": 4, "max_steps": 10, "eval_every": 1, "checkpoint_every": 0,
               "early_stopping": {"metric": "eval_reward", "patience": 2, "min_delta": 5.0}}))
    session = PlainSession(str(tmp_path / "ck"))
    assert run(job, session)["step"] == 2  # a 0..1 reward never rises by 5 (train_loop.run dispatches to rl.run)
    assert "eval_reward" in session.reports[-1]["stopped_early"]


@pytest.mark.parametrize("train, output, objective, field, text", [
    ({"early_stopping": {"metric": "eval_acc"}}, {}, None, "train.early_stopping.metric", "eval_token_accuracy"),
    ({}, {"publish": "best", "best": {"metric": "eval_reward"}}, None, "output.best.metric", "eval_loss"),
    ({"early_stopping": {}}, {}, {"name": "grpo"}, "train.early_stopping.metric", "no eval metrics"),
    ({"early_stopping": {}, "eval_every": 0}, {}, None, "train.eval_every", "only at the end"),
])
def test_watched_metrics_are_checked_before_ray(tiny_model, demo_data, tmp_path, train, output, objective, field, text):
    raw = job_dict(tiny_model, demo_data, str(tmp_path / "o"), train=train, output=output)
    if objective:
        raw["objective"] = objective
        raw["method"] = {"name": "lora", "r": 4}
    with pytest.raises(ConfigError) as err:
        validate_job(raw)
    assert err.value.field == field and text in str(err.value), str(err.value)


def test_no_eval_data_is_refused(tiny_model, demo_data, tmp_path):
    raw = job_dict(tiny_model, demo_data, str(tmp_path / "o"), output={"publish": "best"})
    del raw["data"]["eval"]
    raw["data"]["eval_split"] = 0
    with pytest.raises(ConfigError) as err:
        validate_job(raw)
    assert err.value.field == "data.eval_split"


def _checkpoint_evals(out: str) -> dict[int, float]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        events = [json.loads(line) for line in f]
    return {e["step"]: e["eval_loss"] for e in events if e["type"] == "eval"}


def test_through_the_cli_a_run_stops_early_exits_0_and_publishes_its_best_checkpoint(tiny_model, demo_data, tmp_path):
    """One CLI run: early stopping ends it at step 6 of 20 (exit 0, the reason printed and in
    run.json), and `publish: best` by eval_loss with mode max (the highest eval loss counts as
    best, so the best checkpoint is an early one, not the last) publishes that checkpoint's
    expert; run.json says which, and Ray kept it beside the latest."""
    out = str(tmp_path / "run")
    job = write_job(tmp_path / "job.yaml", job_dict(
        tiny_model, demo_data, out, train=_never_improves(keep_checkpoints=1),
        output={"publish": "best", "best": {"metric": "eval_loss", "mode": "max"}}))
    proc = run_cli("train", job, "--local")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stopped early at step 6" in proc.stdout and "early stopping" in proc.stderr
    run_json = json.load(open(os.path.join(out, "run.json")))
    assert run_json["metrics"]["step"] == 6 and "did not improve" in run_json["metrics"]["stopped_early"]

    evals = _checkpoint_evals(out)
    assert sorted(evals) == [2, 4, 6]  # every checkpoint was evaluated
    best_step = max(evals, key=evals.get)
    assert best_step != 6, evals  # training lowered the eval loss: the "best" here is an early checkpoint
    published = run_json["published"]
    assert published["which"] == "best" and published["step"] == best_step
    assert published["eval_loss"] == pytest.approx(evals[best_step])
    ckpt = os.path.join(out, "checkpoints", f"step_{best_step:07d}", "expert")
    with open(os.path.join(ckpt, "adapter_model.safetensors"), "rb") as a, \
            open(os.path.join(out, "adapter_model.safetensors"), "rb") as b:
        assert a.read() == b.read()
    assert json.load(open(os.path.join(out, "expert.json")))["step"] == best_step
    assert os.path.isdir(os.path.join(out, "checkpoints", "step_0000006"))  # the latest is kept for resume
    assert f"published the best checkpoint: step {best_step}" in proc.stdout


@pytest.mark.slow
def test_tune_trials_stop_early_and_publish_their_best(tiny_model, demo_data, tmp_path):
    out = tmp_path / "run"
    job = write_job(tmp_path / "job.yaml", job_dict(
        tiny_model, demo_data, str(out), train=_never_improves(max_steps=12),
        output={"publish": "best", "best": {"metric": "eval_loss", "mode": "max"}}))
    search = tmp_path / "search.yaml"
    search.write_text("space: {train.lr: 'grid [3.0e-3, 1.0e-3]'}\nalgorithm: grid\nmax_concurrent: 1\n"
                      "scheduler: {name: none}\n")  # both trials run until early stopping ends them
    proc = run_cli("tune", job, "--search", str(search), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = sorted((tmp_path / "run-search" / "trials").iterdir())
    assert len(trials) == 2
    for trial in trials:
        run_json = json.loads((trial / "run.json").read_text())
        assert run_json["metrics"]["step"] == 6 and "did not improve" in run_json["metrics"]["stopped_early"]
        kept = {}  # the checkpoints Ray kept (the best by the metric and the latest), by their expert.json
        for ckpt in (trial / "checkpoints").glob("step_*"):
            info = json.loads((ckpt / "expert" / "expert.json").read_text())
            kept[info["step"]] = info["metrics"]["eval_loss"]
        assert 6 in kept and run_json["published"]["which"] == "best"
        assert run_json["published"]["step"] == max(kept, key=kept.get) != 6, kept
