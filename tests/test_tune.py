"""`raylib tune`: search files are validated before Ray starts; a real ASHA search on local
Ray early-stops bad trials, survives a killed driver (--resume) and writes a best job that trains."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time

import pytest
import yaml

from helpers import RAYLIB, job_dict, run_cli, write_job


def _search(path, **values) -> str:
    search = {"space": {"train.lr": "grid [3.0e-3, 1.0e-6, 2.0e-3, 1.0e-7]"}, "algorithm": "grid",
              "max_concurrent": 1, "scheduler": {"name": "asha", "grace_period": 2, "reduction_factor": 2}}
    search.update(values)
    with open(path, "w") as f:
        yaml.safe_dump(search, f)
    return str(path)


@pytest.mark.parametrize(
    "space, expected",
    [
        ({"train.lrr": "loguniform [1e-5, 1e-3]"}, "train.lrr: the job.train has no field 'lrr'"),
        ({"method.num_virtual_tokens": "choice [10, 20]"}, "method has no field 'num_virtual_tokens'"),
        ({"train.lr": "lognormal [1e-5, 1e-3]"}, "is not a distribution"),
        ({"train.lr": "loguniform [1e-3, 1e-5]"}, "needs low < high"),
        ({"train.lr": "choice [-1.0, 0.1]"}, "train.lr"),
        ({"method.r": "choice [4, 0]"}, "method.r"),
    ],
)
def test_bad_search_file_is_a_config_error_before_ray(tmp_path, tiny_model, demo_data, space, expected):
    job = write_job(tmp_path / "job.yaml", job_dict(tiny_model, demo_data, str(tmp_path / "out")))
    search = _search(tmp_path / "search.yaml", space=space, algorithm="random")
    proc = run_cli("tune", job, "--search", search)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    assert expected.replace("the job.", "").split(":")[0] in err
    assert "Started a local Ray" not in proc.stderr + proc.stdout
    assert not os.path.exists(tmp_path / "out-search")


def test_unknown_search_key_and_grid_with_ranges(tmp_path, tiny_model, demo_data):
    job = write_job(tmp_path / "job.yaml", job_dict(tiny_model, demo_data, str(tmp_path / "out")))
    proc = run_cli("tune", job, "--search", _search(tmp_path / "s1.yaml", num_trials=3))
    assert proc.returncode == 2 and "search.num_trials: unknown field" in proc.stderr
    proc = run_cli("tune", job, "--search", _search(tmp_path / "s2.yaml", space={"train.lr": "uniform [0.001, 0.01]"}))
    assert proc.returncode == 2 and "algorithm grid needs listed values" in proc.stderr


@pytest.mark.slow
def test_asha_search_stops_bad_trials_resumes_and_best_job_trains(tmp_path, tiny_model, demo_data):
    """Four lrs, one at a time: the good first trial sets the bar, ASHA stops the 1e-6/1e-7
    trials at their first rung. The driver is killed after the first trial and resumed."""
    out = tmp_path / "run"
    job = write_job(tmp_path / "job.yaml", job_dict(
        tiny_model, demo_data, str(out), train={"max_steps": 6, "checkpoint_every": 2, "lr": 3e-3}))
    search = _search(tmp_path / "search.yaml")
    search_dir = tmp_path / "run-search"

    # start, wait for the first trial's expert, then kill the driver and its embedded Ray
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen([RAYLIB, "tune", job, "--search", search], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 600
    trials = search_dir / "trials"
    while time.time() < deadline and proc.poll() is None:
        if trials.is_dir() and any((d / "expert.json").exists() for d in trials.iterdir()):
            break
        time.sleep(1)
    first_finished = proc.poll() is not None
    if not first_finished:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    resumed = run_cli("tune", job, "--search", search, "--resume", timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "best trial" in resumed.stdout

    with open(search_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4, rows
    by_lr = {float(r["config/train.lr"]): r for r in rows}
    assert by_lr[3e-3]["status"] == "FINISHED" and int(by_lr[3e-3]["step"]) == 6
    stopped = [r for r in rows if r["status"] == "STOPPED"]
    assert stopped and all(int(r["step"]) < 6 for r in stopped), rows  # stopped for real, before the end
    assert by_lr[1e-7]["status"] == "STOPPED"
    summary = json.loads((search_dir / "search.json").read_text())
    assert summary["failed"] == [] and summary["best"]["config/train.lr"] in (3e-3, 2e-3)
    assert (search_dir / "metric_vs_step.png").stat().st_size > 1000
    assert os.path.isfile(os.path.join(summary["best"]["expert"], "expert.json"))

    # Tune's own analysis reads the experiment
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(search_dir / "tune"))
    assert len(analysis.trials) == 4

    best = yaml.safe_load((search_dir / "best_job.yaml").read_text())
    assert best["train"]["lr"] == summary["best"]["config/train.lr"]
    trained = run_cli("train", str(search_dir / "best_job.yaml"), "--local", "--quiet",
                      "--set", f"output.dir={tmp_path / 'best'}", "--set", "train.max_steps=2")
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert (tmp_path / "best" / "expert.json").exists()
