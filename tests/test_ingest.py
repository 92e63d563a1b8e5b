"""Ray Data ingestion (`data.loader: ray`): the data is prepared once on the cluster and each
Ray Train worker streams its shard; packing, the data report, bad-data errors and resume keep
what the local loader guarantees."""

from __future__ import annotations

import json
import os
import tempfile

import pyarrow as pa
import pytest
from helpers import job_dict, run_cli, stray_stderr, write_job

from raylib import data, ingest, launch
from raylib.config import validate_job
from raylib.errors import ConfigError, DataError, TrainingFailed


def _job(model, files, out, data_: dict | None = None, **sections):
    """A job of tests/helpers.job_dict with `data_` over its data section."""
    job = job_dict(model, files, out, **sections)
    job["data"].update(data_ or {})
    return validate_job(job)


def _events(out_dir: str) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _rows(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


# --------------------------------------------------------------------------- the per-block work


def test_a_block_is_checked_tokenized_cut_split_and_packed(tiny_model, demo_data, tmp_path):
    rows = _rows(demo_data["train"])[:300]
    rows += [{"instruction": "", "output": "x"}, {"instruction": "q"}, {"instruction": "long " * 400, "output": "y"}]
    job = _job(tiny_model, demo_data, str(tmp_path / "o"), data_={"eval": None, "eval_split": 0.2, "max_length": 256})
    out = ingest.process_block(pa.Table.from_pylist(rows), job.to_dict(), None)

    stats = json.loads([s for s in out["stats"].to_pylist() if s][0])
    assert stats["rows"] == 303
    assert stats["bad:empty 'instruction'"] == 1 and stats["bad:missing 'output'"] == 1
    held = [ingest.held_out(data._as_text(dict(r), job.data), 0.2, job.train.seed) for r in rows[:300]]
    assert stats["eval:kept"] == sum(held) and 30 <= sum(held) <= 90  # the seeded share, per row
    assert stats["train:dropped"] + stats.get("eval:dropped", 0) == 1  # the 400-word instruction
    train = [r for r in out.to_pylist() if r["split"] == "train"]
    assert stats["train:sequences"] == len(train)
    # whole examples packed: positions restart at 0 per example, every sequence fits, and
    # the tokens are those the local pipeline makes from the same rows
    local = data.to_sequences(data.tokenize_rows(
        [data._as_text(dict(r), job.data) for r, h in zip(rows[:300], held) if not h],
        _tokenizer(job), job.data), job.data, None, 0)
    assert sorted(len(s["input_ids"]) for s in train) == sorted(len(s["input_ids"]) for s in local)
    assert sum(r["num_tokens"] for r in train) == sum(len(s["input_ids"]) for s in local)
    for r in train:
        assert len(r["input_ids"]) <= 256 and r["position_ids"][0] == 0
        assert len(r["input_ids"]) == len(r["labels"]) == len(r["position_ids"]) == r["num_tokens"]
    # the same block processed again gives the same sequences in the same order
    again = ingest.process_block(pa.Table.from_pylist(rows), job.to_dict(), None)
    assert again.drop_columns(["stats"]).equals(out.drop_columns(["stats"]))  # (stats: also the CPU time)


def _tokenizer(job):
    from raylib import models

    return models.load_tokenizer(job.model)


def test_loader_auto_streams_multi_worker_sft_only(tiny_model, demo_data, cls_data, tmp_path):
    out = str(tmp_path / "o")
    assert ingest.resolve(_job(tiny_model, demo_data, out)) == "local"
    assert ingest.resolve(_job(tiny_model, demo_data, out, scaling={"num_workers": 2})) == "ray"
    assert ingest.resolve(_job(tiny_model, demo_data, out, scaling={"num_workers": 2}, data_={"loader": "local"})) == "local"
    assert ingest.resolve(_job(tiny_model, demo_data, out, data_={"loader": "ray"})) == "ray"
    cls = _job(tiny_model, cls_data, out, scaling={"num_workers": 2}, objective={"name": "classification"},
               method={"name": "heads", "tasks": {"sentiment": ["negative", "positive"]}})
    assert ingest.resolve(cls) == "local"
    cls.data.loader = "ray"
    with pytest.raises(ConfigError, match="data.loader") as err:
        ingest.check(cls)
    assert "classification" in str(err.value) and "data.loader: local" in err.value.fix


# --------------------------------------------------------------------------- through Ray Train


def test_two_workers_stream_their_shards_and_learn(ray_session, tiny_model, demo_data, tmp_path):
    out = str(tmp_path / "run")
    job = _job(tiny_model, demo_data, out, scaling={"num_workers": 2}, train={"max_steps": 12, "checkpoint_every": 6})
    result = launch.train(job, show_progress=False)
    m = result.metrics
    assert m["data_loader"] == "ray" and m["world_size"] == 2
    assert m["eval_loss"] < m["eval_loss_before"] - 0.5, m
    assert m["packing_efficiency"] >= 0.95, m
    # the report counts what the local loader counts on the same files
    local = data.prepare(job, _tokenizer(job)).report
    assert (m["data_rows"], m["data_bad_rows"], m["data_train_examples"], m["data_eval_examples"]) == (
        local.rows, local.bad_total, local.train_examples, local.eval_examples)
    start = [e for e in _events(out) if e["type"] == "start"][0]
    assert start["data"] == local.summary()
    assert os.path.isfile(os.path.join(out, "adapter_model.safetensors"))


def test_no_usable_rows_is_a_data_error_before_any_training_worker(ray_session, tiny_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps({"question": "q", "answer": "a"}) for _ in range(50)) + "\n")
    job = _job(tiny_model, {"train": str(bad), "eval": None}, str(tmp_path / "o"), data_={"loader": "ray"})
    with pytest.raises(DataError, match="no usable rows") as err:
        ingest.build(job)
    assert err.value.field == "data.train" and "50x missing 'instruction'" in str(err.value)


def test_cli_exits_2_on_unusable_data_found_on_the_cluster(tiny_model, tmp_path):
    """A directory source is read only on the cluster: its unusable rows are still one exit-2
    `error:` line naming data.train, before any training worker starts."""
    folder = tmp_path / "rows"
    folder.mkdir()
    (folder / "a.jsonl").write_text("\n".join(json.dumps({"question": "q", "answer": "a"}) for _ in range(30)) + "\n")
    out = tmp_path / "run"
    job = job_dict(tiny_model, {"train": str(folder), "eval": None}, str(out), scaling={"num_workers": 2})
    proc = run_cli("train", write_job(tmp_path / "job.yaml", job))
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "data.train" in errors[0] and "no usable rows" in errors[0], proc.stderr[-2000:]
    assert not (out / "checkpoints").exists()


def test_validate_checks_a_sample_of_streamed_data_and_refuses_uris_without_ray_data(tiny_model, demo_data, tmp_path):
    job = job_dict(tiny_model, demo_data, str(tmp_path / "run"), scaling={"num_workers": 2})
    proc = run_cli("validate", write_job(tmp_path / "job.yaml", job))
    assert proc.returncode == 0 and "Ray Data reads the rest on the cluster" in proc.stdout, proc.stdout + proc.stderr
    proc = run_cli("validate", str(tmp_path / "job.yaml"), "--set", "data.train=s3://bucket/rows.jsonl",
                   "--set", "scaling.num_workers=1", "--set", "data.eval=null")
    assert proc.returncode == 2 and "error: data.train:" in proc.stderr and "data.loader: ray" in proc.stderr, proc.stderr


def test_parquet_directories_csv_json_and_saved_datasets_read_alike(ray_session, tiny_model, demo_data, tmp_path):
    import datasets
    import pyarrow.csv
    import pyarrow.parquet as pq

    rows = _rows(demo_data["train"])[:200]
    folder = tmp_path / "pq"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:120]), folder / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows[120:]), folder / "part-1.parquet")
    pyarrow.csv.write_csv(pa.Table.from_pylist(rows), tmp_path / "rows.csv")
    (tmp_path / "rows.json").write_text(json.dumps(rows))  # one JSON array
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    reports = []
    for source in (str(folder), str(tmp_path / "rows.csv"), str(tmp_path / "rows.json"), str(tmp_path / "saved")):
        job = _job(tiny_model, {"train": source, "eval": None}, str(tmp_path / "o"), data_={"loader": "ray"})
        reports.append({k: v for k, v in ingest.build(job).info["report"].items() if k != "prepare_cpu_s"})
    assert all(r == reports[0] for r in reports) and reports[0]["rows"] == 200 and reports[0]["bad"] == {}, reports


@pytest.mark.slow
def test_resumed_streamed_run_matches_the_straight_run(ray_session, tiny_model, demo_data, tmp_path):
    """2 workers, loader ray: 2 steps, a crash in step 3, `--resume` for steps 3-4 == 4 straight
    steps (the resumed shard skips to the same data position)."""
    marker = os.path.join(tempfile.gettempdir(), "raylib-test-crash-once")

    def run(out, resume=False):
        job = _job(tiny_model, demo_data, out, scaling={"num_workers": 2}, data_={"loader": "ray"},
                   objective={"name": "sft", "loss": "tests.custom_losses:crash_once_at_call_3"},
                   method={"name": "lora", "r": 8, "dropout": 0.0},  # no RNG draws: the runs can match exactly
                   train={"max_steps": 4, "checkpoint_every": 2, "batch_size": 2, "max_failures": 0})
        return launch.train(job, resume=resume, show_progress=False)

    straight = run(str(tmp_path / "a")).metrics
    out = str(tmp_path / "b")
    open(marker, "w").close()
    try:
        with pytest.raises(TrainingFailed):
            run(out)
    finally:
        if os.path.exists(marker):
            os.remove(marker)
    resumed = run(out, resume=True).metrics
    restart = [e for e in _events(out) if e["type"] == "start"][-1]
    assert restart["resumed_from"] and restart["step"] == 2
    assert resumed["eval_loss"] == pytest.approx(straight["eval_loss"], abs=1e-5)
    assert resumed["loss"] == pytest.approx(straight["loss"], abs=1e-5)


@pytest.mark.slow
def test_cli_streams_a_jsonl_from_s3(s3_server, tiny_model, demo_data, tmp_path):
    """`raylib train` with data on s3:// and 2 workers: Ray Data reads it on the cluster, and
    stderr carries only raylib's progress."""
    s3_server.client().upload_file(demo_data["train"], "bucket", "data/train.jsonl")
    out = str(tmp_path / "run")
    job = job_dict(tiny_model, {"train": "s3://bucket/data/train.jsonl", "eval": None}, out,
                   scaling={"num_workers": 2}, train={"max_steps": 4, "checkpoint_every": 0})
    proc = run_cli("train", write_job(tmp_path / "job.yaml", job), env=s3_server.env("rw"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not stray_stderr(proc.stderr), stray_stderr(proc.stderr)
    run = json.load(open(os.path.join(out, "run.json")))
    assert run["metrics"]["data_loader"] == "ray" and run["metrics"]["data_rows"] == 600
