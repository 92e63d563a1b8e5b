"""Ray Data ingestion (`data.loader: ray`): the data is read, checked, templated, tokenized,
cut and packed once, on the cluster, and each Ray Train worker streams its shard.

Why: with `loader: local` every worker reads the whole file and tokenizes and packs all of it
(N workers: N times the work, each holding the whole dataset, the file readable from every
node). Here the driver builds a Ray Data pipeline before any training worker starts:

    read (JSON/JSONL/CSV/parquet files or directories, s3:// / gs:// URIs, saved datasets, hf:)
      -> blocks of `ROWS_PER_BLOCK` rows
      -> per block, in parallel over the cluster's CPUs: row checks (bad rows by reason),
         template + tokenizer, the max_length cut, the held-out eval split (a seeded hash of
         the row, so it does not depend on how rows fall into blocks)
      -> materialized; the data report is an aggregation over it (an exit-2 DataError when no
         row is usable: no training worker has been spent)
      -> per block: first-fit-decreasing packing of whole examples (as `data.pack_ffd`), the
         block's sequences in a seeded order -> materialized "train" and "eval" datasets.

Workers read "train" through `ray.train.get_dataset_shard` (Ray Train's equal streaming split
with order preserved: the same rows in the same order on a rerun, so a resumed run skips to
the same data position) and reshuffle each epoch within a seeded local buffer. "eval" is not
split: every worker streams it and scores every world-th batch (`EvalStream`), so eval sums
are exact and nobody holds the eval set either.

sft on decoder models streams; the other objectives read their data with the local loader
(`resolve` says which a job uses; `check` refuses `loader: ray` where it does not apply).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from raylib.errors import ConfigError, DataError

log = logging.getLogger("raylib.data")

#: rows per block before tokenizing: the unit of parallel work and of packing (FFD within a
#: block of this many examples packs as tightly as over the whole set on the demo data)
ROWS_PER_BLOCK = 4096
#: rows per epoch-local shuffle buffer on each worker
SHUFFLE_BUFFER = 1024
#: rows of a local file `preflight_sample` checks on the driver before Ray starts
PREFLIGHT_ROWS = 1000
STREAMED_OBJECTIVES = ("sft",)


# --------------------------------------------------------------------------- which loader


def resolve(job) -> str:
    """"ray" or "local": `data.loader`, where `auto` is ray for sft on decoder models run by
    more than one worker (one process gains nothing from a second copy of its data)."""
    if job.data.loader != "auto":
        return job.data.loader
    return "ray" if job.scaling.num_workers > 1 and _streams(job) is None else "local"


def _streams(job) -> str | None:
    """Why `job`'s data cannot stream through Ray Data, or None when it can."""
    from raylib import models

    if job.objective.name not in STREAMED_OBJECTIVES:
        return f"objective {job.objective.name!r} reads its data in each worker (Ray Data streams sft)"
    if models.family(job.model) != "causal":
        return "encoder-decoder and encoder models read their data in each worker (Ray Data streams decoder sft)"
    if job.provider != "ray":
        return f"provider {job.provider!r} uploads the data to its own service"
    return None


def check(job) -> None:
    """`loader: ray` where it does not apply is a ConfigError naming the field."""
    if job.data.loader != "ray":
        return
    why = _streams(job)
    if why:
        raise ConfigError("data.loader", f"is 'ray', but {why}", "set data.loader: local (or auto)")


# --------------------------------------------------------------------------- sources


def _source_format(source: str, field_name: str) -> str:
    """json, csv, parquet, saved (datasets.save_to_disk) or hf, from the path or its files."""
    if source.startswith("hf:"):
        return "hf"
    if "://" not in source:
        if not os.path.exists(source):
            raise DataError(field_name, f"{source!r} does not exist",
                            "give a JSONL/JSON/CSV/parquet file or directory, an s3:// / gs:// URI, or hf:<id>")
        if os.path.isdir(source):
            if any(os.path.exists(os.path.join(source, f)) for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
                return "saved"
            names = [n for _, _, files in os.walk(source) for n in files if not n.startswith(".")]
        else:
            names = [source]
    else:
        names = [source] if _extension(source) else _remote_names(source, field_name)
    kinds = {_reader_of(_extension(n)) for n in names} - {None}
    if len(kinds) != 1:
        found = sorted({_extension(n) or "(none)" for n in names})[:5]
        raise DataError(field_name, f"{source!r}: cannot tell its format (file types: {', '.join(found)})",
                        "point it at .jsonl/.json/.csv/.parquet files of one type")
    return kinds.pop()


def _extension(name: str) -> str:
    base = name.rstrip("/").rsplit("/", 1)[-1].lower()
    for compressed in (".gz", ".zst", ".br", ".lz4"):
        base = base.removesuffix(compressed)
    return base.rsplit(".", 1)[-1] if "." in base else ""


def _reader_of(ext: str) -> str | None:
    return {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}.get(ext)


def _remote_names(uri: str, field_name: str) -> list[str]:
    import pyarrow.fs

    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(uri)
        infos = fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True))
    except Exception as exc:
        raise DataError(field_name, f"cannot list {uri!r}: {type(exc).__name__}: {exc}".replace("\n", " ")) from exc
    return [i.path for i in infos if i.type == pyarrow.fs.FileType.File]


def read(source: str, field_name: str = "data.train"):
    """The raw rows of `source` as a `ray.data.Dataset` (lazy)."""
    import ray.data

    kind = _source_format(source, field_name)
    if kind in ("saved", "hf"):
        from raylib import data

        return ray.data.from_huggingface(data.load_rows(source, field_name))
    reader = {"json": ray.data.read_json, "csv": ray.data.read_csv, "parquet": ray.data.read_parquet}[kind]
    return reader(source)


# --------------------------------------------------------------------------- the per-block work

_TOKENIZERS: dict[str, Any] = {}


def _job(job_dict: dict):
    from raylib.config import JobConfig

    return JobConfig.model_validate(job_dict)


def _tokenizer(job):
    key = json.dumps(job.model.model_dump(), sort_keys=True, default=str)
    if key not in _TOKENIZERS:
        from raylib import models, noise

        noise.quiet_libraries()
        _TOKENIZERS[key] = models.load_tokenizer(job.model)
    return _TOKENIZERS[key]


def held_out(row: dict, share: float, seed: int) -> bool:
    """Whether a row is in the eval split: a seeded hash of its content below `share` (the
    same row lands on the same side whatever block it is read in; duplicates stay together)."""
    if share <= 0:
        return False
    key = f"{seed}:{json.dumps(row, sort_keys=True, default=str)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / 2**64 < share


def process_block(table, job_dict: dict, split: str | None):
    """One block of raw rows -> its training/eval sequences and one stats row.

    Each row: checked (bad rows counted by reason), templated and tokenized, cut to
    `max_length`, put in its split (`split`, or None: the seeded held-out share of
    data.eval_split); each split's kept examples packed whole (FFD) or one per sequence, in an
    order seeded by the block's content. Output columns: split ("train", "eval", or "stats" for
    the one row whose `stats` holds the block's counts as JSON), input_ids, labels,
    position_ids (packing), num_tokens."""
    import random
    from collections import Counter

    import pyarrow as pa

    from raylib import data

    job = _job(job_dict)
    cfg, tokenizer = job.data, _tokenizer(job)
    cpu_started = time.process_time()  # the rows' work (a worker's imports and tokenizer load are set-up, as in `local`)
    stats: Counter = Counter()
    good: dict[str, list[dict]] = {"train": [], "eval": []}
    for row in table.to_pylist():
        row = data._as_text(row, cfg)
        stats["rows"] += 1
        problem = data._row_problem(row, cfg)
        if problem:
            stats["bad:" + problem] += 1
            continue
        side = split or ("eval" if held_out(row, cfg.eval_split, job.train.seed) else "train")
        good[side].append(row)
    out = {"split": [], "input_ids": [], "labels": [], "position_ids": [], "num_tokens": []}
    for side, rows in good.items():
        kept = []
        for example in data.tokenize_rows(rows, tokenizer, cfg) if rows else []:
            pair, cut = data.cut_example(example, cfg)
            stats[f"{side}:{cut or 'kept'}"] += 1
            if pair is not None:
                kept.append(pair)
        seqs = data.sequences_of(kept, cfg)
        random.Random(zlib.crc32(json.dumps(kept[:1]).encode()) ^ job.train.seed).shuffle(seqs)
        for s in seqs:
            out["split"].append(side)
            out["input_ids"].append(s["input_ids"])
            out["labels"].append(s["labels"])
            out["position_ids"].append(s.get("position_ids", []))
            out["num_tokens"].append(len(s["input_ids"]))
        stats[f"{side}:sequences"] += len(seqs)
        stats[f"{side}:tokens"] += sum(out["num_tokens"][-len(seqs):]) if seqs else 0
    stats["cpu_ms"] += round(1000 * (time.process_time() - cpu_started))
    ids = pa.list_(pa.int32())
    n = len(out["split"])
    return pa.table({
        "split": pa.array(out["split"] + ["stats"], pa.string()),
        "input_ids": pa.array(out["input_ids"] + [[]], ids), "labels": pa.array(out["labels"] + [[]], ids),
        "position_ids": pa.array(out["position_ids"] + [[]], ids),
        "num_tokens": pa.array(out["num_tokens"] + [0], pa.int32()),
        "stats": pa.array([""] * n + [json.dumps(stats)], pa.string()),
    })


def _of_split(table, split: str):
    import pyarrow.compute as pc

    kept = table.filter(pc.equal(table["split"], split)).drop_columns(["split", "stats"])
    return kept


def _stats_of(table):
    import pyarrow.compute as pc

    return table.filter(pc.equal(table["split"], "stats")).select(["stats"])


# --------------------------------------------------------------------------- the driver


@dataclass
class Ingested:
    """What the driver hands Ray Train: the materialized datasets and what the workers need to
    know about them (the data report, how many training sequences)."""

    datasets: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)

    def data_config(self):
        """Ray Train splits "train" over the workers (equal shares, order preserved: a rerun
        sees the same shard in the same order); "eval" reaches every worker whole."""
        from ray.data import ExecutionOptions
        from ray.train import DataConfig

        return DataConfig(datasets_to_split=["train"], execution_options=ExecutionOptions(preserve_order=True))

    @property
    def trainer_datasets(self) -> dict:
        """What Ray Train shards: "train" (workers read "eval" from `info["eval_blocks"]`)."""
        return {"train": self.datasets["train"]}


def quiet_ray_data() -> None:
    """Ray Data's progress bars and per-dataset start lines are its own progress: ours says
    what the data step did."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    ctx.execution_options.preserve_order = True  # same rows, same order, whatever the timing
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def _processed(source: str, field_name: str, job, split: str | None):
    """`source` read, cut into blocks and processed (`process_block`): one materialized dataset."""
    ds = read(source, field_name)
    if job.data.max_rows and split != "eval":
        ds = ds.limit(job.data.max_rows)
    ds = ds.repartition(target_num_rows_per_block=ROWS_PER_BLOCK, strict=True)  # small files: merged
    return ds.map_batches(process_block, batch_size=None, batch_format="pyarrow", zero_copy_batch=True,
                          fn_kwargs={"job_dict": job.to_dict(), "split": split}).materialize()


def _stats(ds) -> Counter:
    total: Counter = Counter()
    for row in ds.map_batches(_stats_of, batch_size=None, batch_format="pyarrow").take_all():
        total.update(json.loads(row["stats"]))
    return total


def build(job) -> Ingested:
    """Run the pipeline (module doc) on the connected cluster; DataError when nothing is usable."""
    from raylib.data import DataReport

    quiet_ray_data()
    started = time.perf_counter()
    cfg = job.data
    processed = _processed(cfg.train, "data.train", job, "train" if cfg.eval else None)
    stats = _stats(processed)
    report = DataReport(rows=stats["rows"], too_long_dropped=stats["train:dropped"], truncated=stats["train:truncated"],
                        train_sequences=stats["train:sequences"], train_tokens=stats["train:tokens"])
    report.bad.update({k[4:]: n for k, n in stats.items() if k.startswith("bad:")})
    report.train_examples = stats["train:kept"] + stats["train:truncated"]
    report.prepare_cpu_s = stats["cpu_ms"] / 1000
    if report.rows == report.bad_total:
        reasons = ", ".join(f"{n}x {why}" for why, n in report.bad.most_common(3)) or "no rows"
        raise DataError("data.train", f"{cfg.train!r} has no usable rows ({report.rows} read: {reasons})",
                        f"check data.template ({cfg.template}) and data.fields match the file's columns")
    if report.train_sequences == 0:
        raise DataError("data.max_length", f"no training example fits in {cfg.max_length} tokens ({report.summary()})",
                        "raise data.max_length or set data.too_long: truncate")
    evals = processed
    if cfg.eval:
        evals = _processed(cfg.eval, "data.eval", job, "eval")
        eval_stats = _stats(evals)
        if eval_stats["rows"] == sum(n for k, n in eval_stats.items() if k.startswith("bad:")):
            raise DataError("data.eval", f"{cfg.eval!r} has no usable rows", "fix the file or remove data.eval")
        report.prepare_cpu_s += eval_stats["cpu_ms"] / 1000
        stats = eval_stats
    report.eval_examples = stats["eval:kept"] + stats["eval:truncated"]
    datasets = {"train": processed.map_batches(_of_split, batch_size=None, batch_format="pyarrow",
                                               fn_kwargs={"split": "train"}).materialize()}
    info = {}
    if stats["eval:sequences"]:
        datasets["eval"] = evals.map_batches(_of_split, batch_size=None, batch_format="pyarrow",
                                             fn_kwargs={"split": "eval"}).materialize()
        info["eval_blocks"] = datasets["eval"].to_arrow_refs()
    seconds = time.perf_counter() - started
    log.info("data: %s; %d training sequences of %d tokens, %d eval examples (Ray Data, %.1f s)",
             report.summary(), report.train_sequences, report.train_tokens, report.eval_examples, seconds)
    return Ingested(datasets, {"report": report_dict(report), "prepare_s": round(seconds, 3), **info})


def report_dict(report) -> dict:
    return {"rows": report.rows, "bad": dict(report.bad), "too_long_dropped": report.too_long_dropped,
            "truncated": report.truncated, "train_examples": report.train_examples,
            "eval_examples": report.eval_examples, "train_sequences": report.train_sequences,
            "train_tokens": report.train_tokens, "prepare_cpu_s": report.prepare_cpu_s}


def report_of(info: dict):
    from collections import Counter

    from raylib.data import DataReport

    r = dict(info["report"])
    return DataReport(**{**r, "bad": Counter(r["bad"])})


# --------------------------------------------------------------------------- in the workers


def _rows(table) -> list[dict]:
    return table.to_pylist()


class ShardLoader:
    """This worker's share of "train", batch by batch: each epoch the shard in order, shuffled
    within a buffer seeded by (seed, epoch); collated and on the worker's device. Its length
    (batches per epoch) is known up front from the equal split."""

    def __init__(self, shard, n_sequences: int, world: int, batch_size: int, collator, seed: int, device):
        self.shard, self.batch_size, self.collator, self.seed, self.device = shard, batch_size, collator, seed, device
        self.per_worker = n_sequences // world  # Ray's equal split drops the remainder
        self.batches_per_epoch = max(1, math.ceil(self.per_worker / batch_size))

    def __len__(self) -> int:
        return self.batches_per_epoch

    def epoch(self, epoch: int, skip: int = 0):
        """The collated batches of `epoch`, after the first `skip` (a resumed run's position)."""
        batches = self.shard.iter_batches(batch_size=self.batch_size, batch_format="pyarrow",
                                          local_shuffle_buffer_size=SHUFFLE_BUFFER,
                                          local_shuffle_seed=self.seed * 100_003 + epoch)
        for i, table in enumerate(batches):
            if i < skip:
                continue
            rows = _rows(table.drop_columns(["num_tokens"]))
            yield {k: v.to(self.device) for k, v in self.collator(rows).items()}


class EvalStream:
    """The "eval" sequences as the driver's materialized blocks (object refs): every worker
    reads them block by block and scores every world-th batch (exact sums after the
    all-reduce; nobody holds the whole set). Under lockstep (ZeRO-3) a rank with one batch
    fewer runs one more uncounted forward, so every rank runs the same number. Blocks, not a
    Ray Data iterator: an iterator starts a streaming execution per eval (seconds each)."""

    def __init__(self, blocks: list, n_examples: int):
        self.blocks, self.n_examples = blocks, n_examples

    def __bool__(self) -> bool:
        return self.n_examples > 0

    def _batches(self, batch_size: int):
        import ray

        carry: list[dict] = []
        for ref in self.blocks:
            carry += _rows(ray.get(ref).drop_columns(["num_tokens"]))
            while len(carry) >= batch_size:
                yield carry[:batch_size]
                carry = carry[batch_size:]
        if carry:
            yield carry

    def rank_batches(self, batch_size: int, rank: int, world: int, lockstep: bool = False):
        total = mine = 0
        last: list[dict] = []
        for b, rows in enumerate(self._batches(batch_size)):
            total += 1
            if b % world == rank:
                mine += 1
                last = rows
                yield rows, True
        if lockstep:
            for _ in range(math.ceil(total / world) - mine):
                yield last[:1], False


def worker_data(info: dict, job, world: int, collator, device):
    """(ShardLoader over "train", EvalStream over "eval" or [], DataReport) in a Ray Train worker."""
    import ray.train

    report = report_of(info)
    loader = ShardLoader(ray.train.get_dataset_shard("train"), report.train_sequences, world,
                         job.train.batch_size, collator, job.train.seed, device)
    evals = EvalStream(info["eval_blocks"], report.eval_examples) if info.get("eval_blocks") else []
    return loader, evals, report
