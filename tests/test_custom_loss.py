"""`objective.loss: package.module:function` for SFT and classification: the user's loss
trains (the run reports it), the objective's own eval still measures, and a loss that cannot
be imported or called is a ConfigError naming objective.loss before Ray starts."""

from __future__ import annotations

import pytest
from helpers import job_dict, run_cli, write_job
from test_methods import method_job

from raylib.config import validate_job
from raylib.errors import ConfigError
from raylib.train_loop import PlainSession, run


def test_a_custom_sft_loss_is_the_one_that_trains(tiny_model, demo_data, tmp_path):
    job = validate_job(job_dict(tiny_model, demo_data, str(tmp_path / "o"),
                                objective={"name": "sft", "loss": "tests.custom_losses:shifted_ce_plus_ten"},
                                train={"max_steps": 8, "checkpoint_every": 0}))
    session = PlainSession(str(tmp_path / "ck"))
    run(job, session)
    losses = [e["loss"] for e in session.events if e["type"] == "step"]
    assert all(10 < x < 30 for x in losses), losses  # the +10 shows: this loss trained
    final = session.reports[-1]
    assert final["eval_loss"] < final["eval_loss_before"] - 0.5, final  # and it is still cross-entropy underneath
    assert losses[-1] < losses[0]


def test_a_custom_classification_loss_trains_the_heads(tiny_model, demo_data, cls_data, tmp_path):
    raw = method_job("heads", tiny_model, demo_data, cls_data, str(tmp_path / "o"))
    raw["objective"]["loss"] = "tests.custom_losses:focal"
    session = PlainSession(str(tmp_path / "ck"))
    run(validate_job(raw), session)
    final = session.reports[-1]
    assert final["eval_accuracy"] > 0.6 and final["eval_loss"] < final["eval_loss_before"], final


@pytest.mark.parametrize("spec, text", [
    ("no_such_module:fn", "cannot import"),
    ("tests.custom_losses:nope", "cannot import"),
    ("tests.custom_losses:NOT_CALLABLE", "is not callable"),
    ("tests.custom_losses:three_args", "cannot be called as fn(model_output, batch)"),
    ("just_a_name", "is not a 'package.module:function' path"),
])
def test_bad_custom_losses_are_config_errors(spec, text, tiny_model, demo_data, tmp_path):
    with pytest.raises(ConfigError) as err:
        validate_job(job_dict(tiny_model, demo_data, str(tmp_path / "o"), objective={"name": "sft", "loss": spec}))
    assert err.value.field == "objective.loss" and text in str(err.value)


def test_the_cli_refuses_a_bad_loss_with_exit_2(tiny_model, demo_data, tmp_path):
    path = write_job(tmp_path / "job.yaml", job_dict(tiny_model, demo_data, str(tmp_path / "o"),
                                                     objective={"name": "sft", "loss": "no_such_module:fn"}))
    proc = run_cli("train", path, "--local")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: objective.loss")


def test_the_custom_loss_loads_in_ray_train_workers(ray_session, tiny_model, demo_data, tmp_path):
    from raylib import launch

    out = str(tmp_path / "run")
    job = validate_job(job_dict(tiny_model, demo_data, out, scaling={"num_workers": 2},
                                objective={"name": "sft", "loss": "tests.custom_losses:shifted_ce_plus_ten"},
                                train={"max_steps": 4, "checkpoint_every": 0}))
    result = launch.train(job, show_progress=False)
    import json
    import os

    steps = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"step"' in line]
    losses = [e["loss"] for e in steps if e["type"] == "step"]
    assert result.metrics["world_size"] == 2 and len(losses) == 4 and all(x > 10 for x in losses), losses
