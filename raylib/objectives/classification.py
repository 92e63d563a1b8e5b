"""Classification objective (`objective.name: classification`).

Two kinds of model: `method.name: heads` (a frozen causal-LM backbone with one head per task,
`method.tasks`), or, with `objective.labels`, transformers' `...ForSequenceClassification`
over those classes (`SequenceClassification`: encoders such as BERT/RoBERTa/DeBERTa, or any
backbone; trained by full, LoRA and the other methods for the model's family; one task).

Rows carry a text, a task name and a label: `{"text": "...", "task": "domain", "label":
"strings"}` (columns renamed with data.fields.text/task/label; without a text column the text
is `instruction` + `input`; a single-task job may omit the task column; a label may be the
class name or its index). The loss is the mean cross-entropy of each row under its task's
head. Eval reports loss, accuracy and macro-F1 overall (macro-F1 averaged over tasks) and
per task (`eval_<task>_accuracy`, `eval_<task>_macro_f1`), exact across workers (confusion
counts are all-reduced).

With `method.cache_features` the backbone runs once per row here (`prepare`), and training
and eval batches carry the pooled features instead of token ids.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from raylib.errors import DataError


class ClassificationOptions(BaseModel):
    """Cross-entropy per task head; eval: accuracy and macro-F1."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["classification"] = "classification"
    loss: str | None = Field(None, description="package.module:function — fn(model_output, batch) -> loss "
                             "(raylib.objectives.CustomLoss)")
    labels: list[str] | None = Field(None, min_length=2, description="the classes of a sequence classifier "
                                     "(not with method heads, which lists them in method.tasks)")


#: the one task of a sequence classifier (objective.labels)
SINGLE_TASK = "label"


def tasks_of(job) -> dict[str, list[str]]:
    """Task name -> classes: method.tasks (heads), or the one task of objective.labels."""
    if job.objective.labels:
        return {SINGLE_TASK: list(job.objective.labels)}
    return job.method.tasks


# --------------------------------------------------------------------------- rows


def _text(row: dict, f) -> str | None:
    value = row.get(f.text)
    if isinstance(value, str) and value.strip():
        return value
    parts = [row.get(f.instruction), row.get(f.input)]
    text = " ".join(p for p in parts if isinstance(p, str) and p.strip())
    return text or None


def encode_rows(rows, job, report=None) -> list[dict]:
    """Rows -> {"text", "task_ids", "labels"}; bad rows counted in `report` (or raised)."""
    f, tasks = job.data.fields, tasks_of(job)
    names = list(tasks)
    out = []
    for row in rows:
        if report is not None:
            report.rows += 1
        problem, item = _encode(dict(row), f, tasks, names, one_task=bool(job.objective.labels))
        if problem:
            if report is not None:
                report.bad[problem] += 1
            continue
        out.append(item)
    return out


def _encode(row, f, tasks, names, one_task: bool = False):
    text = _text(row, f)
    if text is None:
        return f"no text (column '{f.text}', or '{f.instruction}'/'{f.input}')", None
    task = names[0] if one_task else row.get(f.task)  # a sequence classifier has one task: no task column
    if task is None:
        if len(names) != 1:
            return f"missing '{f.task}'", None
        task = names[0]
    if task not in tasks:
        return f"unknown task {task!r}", None
    label = row.get(f.label)
    if label is None:
        return f"missing '{f.label}'", None
    labels = tasks[task]
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        return f"'{f.label}' is not a class name or index", None
    if isinstance(label, int):
        if not 0 <= label < len(labels):
            return f"label index out of range for task {task!r}", None
        index = label
    elif label in labels:
        index = labels.index(label)
    else:
        return ("label not in objective.labels" if one_task else f"label not in method.tasks.{task}"), None
    return None, {"text": text, "task_ids": names.index(task), "labels": index}


def preflight(job):
    """Driver-side: rows have text, a known task and a label of that task (before Ray)."""
    from raylib.data import DataReport, load_rows

    report = DataReport()
    ds = load_rows(job.data.train, "data.train")
    missing = [c for c in (job.data.fields.label,) if c not in ds.column_names]
    if missing:
        raise DataError(
            "data.fields.label",
            f"{job.data.train!r} has no '{missing[0]}' column (columns: {', '.join(ds.column_names)})",
            "add a label per row, or point data.fields.label at the column that holds it",
        )
    tasks = tasks_of(job)
    if len(tasks) > 1 and job.data.fields.task not in ds.column_names:
        raise DataError(
            "data.fields.task",
            f"method.tasks has {len(tasks)} tasks but {job.data.train!r} has no '{job.data.fields.task}' column",
            "add the task name per row, or point data.fields.task at the column that holds it",
        )
    limit = job.data.max_rows
    rows = encode_rows(ds.select(range(min(limit, len(ds)))) if limit else ds, job, report)
    if not rows:
        reasons = ", ".join(f"{n}x {why}" for why, n in report.bad.most_common(3)) or "no rows"
        raise DataError("data.train", f"{job.data.train!r} has no usable classification rows ({reasons})",
                        "rows need text, task (one of method.tasks) and label (one of that task's labels)"
                        if job.method.name == "heads" else "rows need text and label (one of objective.labels)")
    seen = {r["task_ids"] for r in rows}
    absent = [t for i, t in enumerate(tasks) if i not in seen]
    if absent:
        raise DataError("data.train", f"no rows for tasks {absent}", "add rows for every task in method.tasks, or remove it")
    if job.data.eval:
        ds_eval = load_rows(job.data.eval, "data.eval")
        if not encode_rows(ds_eval, job):
            raise DataError("data.eval", f"{job.data.eval!r} has no usable classification rows", "fix the file or remove data.eval")
    return report


# --------------------------------------------------------------------------- worker side


def prepare(job, tokenizer, model=None, device=None):
    """Tokenized rows (or cached backbone features) for train and eval."""
    from raylib.data import DataReport, Prepared, load_rows, split_rows

    report = DataReport()
    ds = load_rows(job.data.train, "data.train")
    if job.data.max_rows:
        ds = ds.select(range(min(job.data.max_rows, len(ds))))
    rows = encode_rows(ds, job, report)
    if job.data.eval:
        eval_rows = encode_rows(load_rows(job.data.eval, "data.eval"), job)
    else:
        rows, eval_rows = split_rows(rows, job.data.eval_split, job.train.seed)
    train, evals = _tokenize(rows, tokenizer, job), _tokenize(eval_rows, tokenizer, job)
    report.too_long_dropped = report.truncated = 0
    report.train_examples = report.train_sequences = len(train)
    report.eval_examples = len(evals)
    report.train_tokens = sum(s["num_tokens"] for s in train)
    if job.method.name == "heads" and job.method.use_cache() and model is not None:
        train, evals = cache_features(model, train, device), cache_features(model, evals, device)
    return Prepared(train, evals, report)


def _tokenize(rows: list[dict], tokenizer, job) -> list[dict]:
    if not rows:
        return []
    ids = tokenizer([r["text"] for r in rows], add_special_tokens=True, truncation=True,
                    max_length=job.data.max_length)["input_ids"]
    return [{"input_ids": list(i), "task_ids": r["task_ids"], "labels": r["labels"], "num_tokens": len(i)}
            for i, r in zip(ids, rows)]


def cache_features(model, seqs: list[dict], device, batch_size: int = 64) -> list[dict]:
    """Run the frozen backbone once: each sequence -> its pooled feature vector.

    This runs before the DeepSpeed engine exists; under ZeRO-3 the backbone was partitioned
    while it loaded, so its weights are gathered whole for the duration (the backbone is
    frozen and each rank caches every row: the same peak as loading it without ZeRO-3).
    """
    import torch

    from raylib.backends import gathered_zero3_params

    if not seqs:
        return []
    collate = Collator(pad_id=0)
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad(), gathered_zero3_params(model):
        for i in range(0, len(seqs), batch_size):
            chunk = seqs[i : i + batch_size]
            batch = collate(chunk)
            feats = model.features(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().cpu()
            for s, f in zip(chunk, feats):
                out.append({"features": f, "task_ids": s["task_ids"], "labels": s["labels"], "num_tokens": s["num_tokens"]})
    model.train(was_training)
    return out


class Collator:
    """Pads token ids (right, with an attention mask) or stacks cached features."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[dict]) -> dict[str, Any]:
        import torch

        out = {
            "labels": torch.tensor([b["labels"] for b in batch], dtype=torch.long),
            "task_ids": torch.tensor([b["task_ids"] for b in batch], dtype=torch.long),
            "num_tokens": torch.tensor(sum(b["num_tokens"] for b in batch)),
        }
        if "features" in batch[0]:
            out["features"] = torch.stack([b["features"] for b in batch])
            return out
        width = max(len(b["input_ids"]) for b in batch)
        out["input_ids"] = torch.tensor([b["input_ids"] + [self.pad_id] * (width - len(b["input_ids"])) for b in batch])
        out["attention_mask"] = torch.tensor([[1] * len(b["input_ids"]) + [0] * (width - len(b["input_ids"])) for b in batch])
        return out


def collator(job, tokenizer):
    return Collator(tokenizer.pad_token_id)


def loss(model, batch):
    return model(**batch).loss


def evaluate(model, sequences: list[dict], collate, batch_size: int, rank: int, world: int, device, reduce_sum,
             lockstep: bool = False):
    """Loss, accuracy and macro-F1 (overall and per task) over `sequences`, exact across workers.

    `lockstep` (DeepSpeed ZeRO-3: every forward gathers parameters collectively): all workers
    run the same number of forwards; a worker whose shard ran out repeats one uncounted batch.
    """
    return evaluate_classes(lambda batch: model(**batch).logits, {n: model.tasks[n] for n in model.task_names}, model,
                            sequences, collate, batch_size,
                            rank, world, device, reduce_sum, lockstep, per_task=True)


def evaluate_classes(forward, classes: dict[str, list], model, sequences: list[dict], collate, batch_size: int,
                     rank: int, world: int, device, reduce_sum, lockstep: bool = False, per_task: bool = True):
    """The metrics of `evaluate`, for any model whose `forward(batch)` gives logits per task
    name (`classes`: task -> class names, in task-id order)."""
    import torch
    import torch.nn.functional as F

    tasks = list(classes)
    n_max = max(len(v) for v in classes.values())
    # per task: [loss sum, rows, correct] and per class [tp, fp, fn]
    totals = torch.zeros(len(tasks), 3, dtype=torch.float64, device=device)
    conf = torch.zeros(len(tasks), n_max, 3, dtype=torch.float64, device=device)
    from raylib.data import eval_batches

    was_training = model.training
    model.eval()
    with torch.no_grad():
        for rows, counted in eval_batches(sequences, batch_size, rank, world, lockstep):
            if not counted:  # lockstep padding: a forward that is not counted
                pad = collate(rows)
                pad.pop("num_tokens", None)
                pad.pop("labels", None)
                forward({k: v.to(device) for k, v in pad.items()})
                continue
            batch = collate(rows)
            batch.pop("num_tokens", None)
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            task_ids = batch["task_ids"] if "task_ids" in batch else torch.zeros_like(labels)
            logits = forward(batch)
            for t, name in enumerate(tasks):
                mask = task_ids == t
                if not mask.any():
                    continue
                lg, y = logits[name][mask].float(), labels[mask]
                pred = lg.argmax(-1)
                totals[t, 0] += F.cross_entropy(lg, y, reduction="sum")
                totals[t, 1] += mask.sum()
                totals[t, 2] += (pred == y).sum()
                n = len(classes[name])
                for c in range(n):
                    conf[t, c, 0] += ((pred == c) & (y == c)).sum()
                    conf[t, c, 1] += ((pred == c) & (y != c)).sum()
                    conf[t, c, 2] += ((pred != c) & (y == c)).sum()
    model.train(was_training)
    totals, conf = reduce_sum(totals), reduce_sum(conf)
    metrics: dict[str, float] = {}
    f1s = []
    for t, name in enumerate(tasks):
        rows = totals[t, 1].item()
        if rows == 0:
            continue
        n = len(classes[name])
        tp, fp, fn = conf[t, :n, 0], conf[t, :n, 1], conf[t, :n, 2]
        f1 = (2 * tp / (2 * tp + fp + fn).clamp(min=1)).mean().item()
        if per_task:
            metrics[f"eval_{name}_accuracy"] = totals[t, 2].item() / rows
            metrics[f"eval_{name}_macro_f1"] = f1
        f1s.append(f1)
    rows = max(totals[:, 1].sum().item(), 1.0)
    metrics.update({
        "eval_loss": totals[:, 0].sum().item() / rows,
        "eval_accuracy": totals[:, 2].sum().item() / rows,
        "eval_macro_f1": sum(f1s) / max(len(f1s), 1),
        "eval_rows": int(rows),
    })
    return metrics


class SequenceClassification:
    """`objective: {name: classification, labels: [...]}`: transformers'
    `AutoModelForSequenceClassification` over the labels (`model_head`: recipe.setup loads it
    with a new classifier head; PEFT methods train and save that head too, task SEQ_CLS).
    Rows as for heads, one task: `{"text": ..., "label": <class name or index>}`."""

    def __init__(self, job):
        self.labels = list(job.objective.labels)
        self.model_head = self.labels

    def prepare(self, job, tokenizer, model=None, device=None):
        return prepare(job, tokenizer)

    def collator(self, job, tokenizer):
        return _WithoutTaskIds(Collator(tokenizer.pad_token_id))

    def loss(self, model, batch):
        return model(**batch).loss

    def evaluate(self, model, sequences, collate, batch_size, rank, world, device, reduce_sum, lockstep=False):
        return evaluate_classes(lambda batch: {SINGLE_TASK: model(**batch).logits}, {SINGLE_TASK: self.labels}, model,
                                sequences, collate, batch_size, rank, world, device, reduce_sum, lockstep,
                                per_task=False)


class _WithoutTaskIds:
    """The heads collator's batches without task ids (one task; the model takes none)."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, batch):
        out = self.collate(batch)
        out.pop("task_ids")
        return out
