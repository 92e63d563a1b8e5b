"""Data: sources -> rows -> prompt/response token ids -> packed training sequences.

- Sources: JSONL/JSON/CSV/parquet files, a `datasets.save_to_disk` directory, or
  `hf:<dataset id>[:split]` (HF `datasets`, works where a hub is reachable).
- Templates: `alpaca` (the seeds' `### Instruction / ### Input / ### Output / ### End`),
  `chat` (the tokenizer's chat template over a conversation — `messages`, ShareGPT
  `conversations` or {input, output} turns, every assistant turn trained — or
  instruction/output as one user/assistant turn) and `plain` (a `text` column, every token
  trained).
- Labels are masked (-100) on the prompt unless `data.train_on_prompt`.
- Packing puts whole examples into sequences of at most `max_length` tokens
  (first-fit-decreasing). Each example keeps its own position ids, and transformers builds a
  block-diagonal causal mask from them, so packed examples never attend to each other.
- Bad rows (missing fields, empty text) are counted by reason and reported; a source with
  no usable rows is a DataError before any Ray resources are spent. So is a file `datasets`
  cannot parse, and for JSON/JSONL/CSV the error names the first line that breaks it.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import math
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from raylib.errors import DataError

IGNORE = -100


# --------------------------------------------------------------------------- templates


@dataclass(frozen=True)
class AlpacaTemplate:
    """The instruction template from the seeds (Alpaca/Dolly style)."""

    blurb: str = (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request."
    )
    end: str = "\n\n### End"

    def prompt(self, instruction: str, input: str = "") -> str:
        parts = [self.blurb, f"### Instruction:\n{instruction}"]
        if input:
            parts.append(f"### Input:\n{input}")
        parts.append("### Output:\n")
        return "\n\n".join(parts)


ALPACA = AlpacaTemplate()


def render_prompt(template: str, instruction: str, input: str = "", tokenizer=None) -> str:
    """The prompt text a model trained with `template` expects at inference time."""
    if template == "alpaca":
        return ALPACA.prompt(instruction, input)
    if template == "chat":
        content = f"{instruction}\n\n{input}" if input else instruction
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    return f"{instruction}\n{input}".strip() + "\n"


# --------------------------------------------------------------------------- sources


def load_rows(source: str, field_name: str = "data.train"):
    """A `datasets.Dataset` of raw rows from a file, a saved dataset dir, or `hf:` id."""
    import datasets

    datasets.disable_progress_bars()
    try:
        if source.startswith("hf:"):
            name, _, split = source[3:].partition(":")
            return datasets.load_dataset(name, split=split or "train")
        if os.path.isdir(source):
            ds = datasets.load_from_disk(source)
            return ds["train"] if isinstance(ds, datasets.DatasetDict) else ds
        if "://" in source:
            raise DataError(field_name, f"{source!r} is a URI, which Ray Data reads on the cluster",
                            "set data.loader: ray (sft), or copy the file to a local path")
        if not os.path.isfile(source):
            raise DataError(field_name, f"{source!r} does not exist", "give a path to a JSONL/CSV/parquet file or hf:<id>")
        if os.path.getsize(source) == 0:
            raise DataError(field_name, f"{source!r} is empty", "point it at a file with at least one row")
        ext = source.rsplit(".", 1)[-1].lower()
        builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}.get(ext)
        if builder is None:
            raise DataError(field_name, f"unsupported file type .{ext}", "use .jsonl, .json, .csv or .parquet")
        with _quiet_builder_errors():
            return datasets.load_dataset(builder, data_files=source, split="train")
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types for unreadable data
        located = _locate_problem(source, field_name) if os.path.isfile(source) else None
        if located is not None:
            raise located from exc
        cause = _root_cause(exc)  # DatasetGenerationError only says "An error occurred while generating the dataset"
        problem = f"cannot read {source!r}: {type(cause).__name__}: {cause}".replace("\n", " ").strip()
        raise DataError(field_name, problem) from exc


def sample_rows(source: str, n: int) -> list[dict]:
    """The first `n` rows of a local JSON/JSONL/CSV/parquet file, read without loading the
    rest ([] for anything else: directories, URIs, saved or hub datasets)."""
    import datasets

    builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}.get(source.rsplit(".", 1)[-1].lower())
    if builder is None or not os.path.isfile(source):
        return []
    datasets.disable_progress_bars()
    try:
        with _quiet_builder_errors():
            return list(datasets.load_dataset(builder, data_files=source, split="train", streaming=True).take(n))
    except Exception:  # the full read (load_rows) names the broken line
        load_rows(source)
        raise


@contextlib.contextmanager
def _quiet_builder_errors():
    """datasets' json and csv builders log an ERROR line before they raise. The DataError we
    raise instead says more (the file and line), and the CLI prints an error as one line."""
    loggers = [logging.getLogger(f"datasets.packaged_modules.{m}.{m}") for m in ("json", "csv")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _root_cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def _locate_problem(path: str, field_name: str) -> DataError | None:
    """After `datasets` failed to read a JSON/JSONL/CSV file: the first line that breaks it, as
    a DataError naming the file and line (None when no such line is found, e.g. the failure
    is not a syntax error). One plain pass over the file, paid only when reading failed."""
    ext = path.rsplit(".", 1)[-1].lower()
    if ext in ("json", "jsonl"):
        return _json_problem(path, field_name, lines=ext == "jsonl" or _first_line_is_an_object(path))
    if ext == "csv":
        return _csv_problem(path, field_name)
    return None


_JSON_KINDS = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


def _json_message(exc: json.JSONDecodeError) -> str:
    """json's message without its own line/column for the one-line parse ("line 1 column 30")."""
    return f"{exc.msg.removesuffix(' at')} at column {exc.colno}"


def _first_line_is_an_object(path: str) -> bool:
    """A .json file `datasets` reads either as JSON Lines or as one document: JSON Lines when
    its first non-blank line is a complete JSON object on its own."""
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    return isinstance(json.loads(raw), dict)
                except ValueError:
                    return False
    return False


def _json_problem(path: str, field_name: str, lines: bool) -> DataError | None:
    # undecodable bytes are replaced, not reported: the JSON Lines reader tolerates them, and
    # in a document pandas' own UnicodeDecodeError (the fallback message) says where they are
    with open(path, "rb") as f:
        if not lines:  # one document: json's own line and column
            try:
                json.loads(f.read().decode("utf-8", errors="replace"))
            except json.JSONDecodeError as exc:
                return DataError(field_name, f"{path!r} line {exc.lineno}: invalid JSON ({_json_message(exc)})",
                                 "repair the JSON at that position")
            return None
        fix = "each line of a JSON Lines file is one complete JSON object: repair or delete that line"
        for n, raw in enumerate(f, 1):
            text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            if not text.strip():  # blank lines are skipped by the reader too
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                return DataError(field_name, f"{path!r} line {n}: invalid JSON ({_json_message(exc)})", fix)
            if not isinstance(value, dict):
                kind = _JSON_KINDS.get(type(value), type(value).__name__)
                return DataError(field_name, f"{path!r} line {n}: a JSON {kind}, not an object", fix)
    return None


def _csv_problem(path: str, field_name: str) -> DataError | None:
    """The two ways pandas' CSV parser fails on a row: more fields than the header, and a
    quoted field never closed (which swallows the rest of the file). Line numbers count the
    header as line 1, like an editor."""
    import csv

    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f, strict=True)
        header, start = None, 1
        try:
            for record in reader:
                if header is None:
                    header = record or None
                elif len(record) > len(header):
                    return DataError(field_name, f"{path!r} line {start}: {len(record)} fields, the header has "
                                     f"{len(header)}", 'put a field that contains a comma in double quotes ("a, b")')
                start = reader.line_num + 1
        except csv.Error as exc:
            if str(exc) == "unexpected end of data":  # strict: EOF inside a quoted field
                return DataError(field_name, f"{path!r} line {start}: a quoted field opened on this line is never "
                                 "closed", 'close it with " (a quote inside a quoted field is written "")')
    return None


# --------------------------------------------------------------------------- rows -> examples


@dataclass
class Example:
    """Token ids of one example: the prompt (never trained unless data.train_on_prompt) and
    the response. `response_mask` marks which response tokens train (None: all of them): a
    multi-turn conversation's response runs from its first assistant turn to the end, and
    only the assistant turns in it train, not the user turns between them."""

    prompt_ids: list[int]
    response_ids: list[int]
    response_mask: list[bool] | None = None

    def labels(self, train_on_prompt: bool) -> list[int]:
        ids = self.prompt_ids + self.response_ids
        if train_on_prompt:
            return list(ids)
        response = (self.response_ids if self.response_mask is None
                    else [t if m else IGNORE for t, m in zip(self.response_ids, self.response_mask)])
        return [IGNORE] * len(self.prompt_ids) + response


@dataclass
class DataReport:
    """What happened to the rows: shown to the user and recorded in metrics."""

    rows: int = 0
    bad: Counter = field(default_factory=Counter)
    too_long_dropped: int = 0
    truncated: int = 0
    train_examples: int = 0
    eval_examples: int = 0
    train_sequences: int = 0
    train_tokens: int = 0
    prepare_cpu_s: float = 0.0  # CPU time spent preparing the data, over every process that did

    @property
    def bad_total(self) -> int:
        return sum(self.bad.values())

    def summary(self) -> str:
        text = f"{self.rows} rows, {self.bad_total} bad"
        if self.bad:
            text += " (" + ", ".join(f"{n}x {why}" for why, n in self.bad.most_common(3)) + ")"
        if self.too_long_dropped:
            text += f", {self.too_long_dropped} longer than max_length dropped"
        if self.truncated:
            text += f", {self.truncated} truncated"
        return text

    def as_metrics(self) -> dict[str, float]:
        return {
            "data_rows": self.rows,
            "data_bad_rows": self.bad_total,
            "data_too_long_dropped": self.too_long_dropped,
            "data_train_examples": self.train_examples,
            "data_eval_examples": self.eval_examples,
            "data_train_sequences": self.train_sequences,
            "data_prepare_cpu_s": round(self.prepare_cpu_s, 3),
        }


#: ShareGPT speaker names -> chat roles
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system"}


def row_format(row: dict, data_cfg) -> str:
    """Which shape a row has (`data.format`, or detected per row when it is `auto`)."""
    if data_cfg.format != "auto":
        return data_cfg.format
    f = data_cfg.fields
    if data_cfg.template == "chat" and row.get(f.messages) is not None:
        return "messages"
    turns = row.get(f.conversations)
    if data_cfg.template == "chat" and isinstance(turns, list) and turns and isinstance(turns[0], dict):
        return "sharegpt" if "from" in turns[0] or "value" in turns[0] else "turns"
    return "instruction"


def conversation(row: dict, data_cfg) -> tuple[list[dict] | None, str | None]:
    """A conversation row as chat messages [{role, content}], or (None, why it is bad).
    `messages` rows as they are; ShareGPT turns {from, value} by `SHAREGPT_ROLES`; seed 004's
    turns {input, output} as a user and an assistant message each. The last message must be
    a non-empty assistant turn (what the row trains)."""
    f, kind = data_cfg.fields, row_format(row, data_cfg)
    column = f.messages if kind == "messages" else f.conversations
    turns = row.get(column)
    if not isinstance(turns, list) or not turns:
        return None, f"'{column}' is not a non-empty list"
    msgs: list[dict] = []
    for turn in turns:
        if not isinstance(turn, dict):
            return None, f"a turn of '{column}' is not an object"
        if kind == "messages":
            if not isinstance(turn.get("content"), str) or turn.get("role") not in ("system", "user", "assistant", "tool"):
                return None, f"a message of '{column}' lacks role (system/user/assistant) or text content"
            msgs.append({"role": turn["role"], "content": turn["content"]})
        elif kind == "sharegpt":
            role = SHAREGPT_ROLES.get(str(turn.get("from", "")).lower())
            if role is None or not isinstance(turn.get("value"), str):
                return None, f"a ShareGPT turn of '{column}' has an unknown 'from' or no text 'value'"
            msgs.append({"role": role, "content": turn["value"]})
        else:  # turns: {input, output}
            if not all(isinstance(turn.get(k), str) and turn[k].strip() for k in ("input", "output")):
                return None, f"a turn of '{column}' lacks text 'input' and 'output'"
            msgs += [{"role": "user", "content": turn["input"]}, {"role": "assistant", "content": turn["output"]}]
    if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"]:
        return None, "last message is not a non-empty assistant turn"
    return msgs, None


def _row_problem(row: dict, data_cfg) -> str | None:
    f = data_cfg.fields
    if data_cfg.template == "plain":
        return _text_problem(row, f.text)
    if row_format(row, data_cfg) != "instruction":
        return conversation(row, data_cfg)[1]
    return _text_problem(row, f.instruction) or _text_problem(row, f.output)


def _text_problem(row: dict, name: str) -> str | None:
    if name not in row or row[name] is None:
        return f"missing '{name}'"
    if not isinstance(row[name], str):
        return f"'{name}' is not text"
    if not row[name].strip():
        return f"empty '{name}'"
    return None


def _as_text(row: dict, data_cfg) -> dict:
    """Numbers in text columns are text (CSV/parquet infer `4` as an int); missing input is ''."""
    f = data_cfg.fields
    for name in (f.instruction, f.input, f.output, f.text):
        value = row.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:  # not NaN
            row[name] = str(value)
    if row.get(f.input) is None or row.get(f.input) != row.get(f.input):
        row[f.input] = ""
    return row


def valid_rows(ds, data_cfg, report: DataReport, limit: int | None = None) -> list[dict]:
    rows = []
    for row in ds:
        if limit is not None and report.rows >= limit:
            break
        report.rows += 1
        row = _as_text(dict(row), data_cfg)
        problem = _row_problem(row, data_cfg)
        if problem:
            report.bad[problem] += 1
        else:
            rows.append(row)
    return rows


def split_rows(rows: list[dict], eval_share: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic held-out split, used when no `data.eval` source is given."""
    if eval_share <= 0 or len(rows) < 2:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(round(len(rows) * eval_share)))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def tokenize_rows(rows: list[dict], tokenizer, data_cfg) -> list[Example]:
    """Rows -> prompt/response ids. The response ends with EOS; the prompt starts with BOS."""
    f = data_cfg.fields
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if data_cfg.template == "plain":
        ids = tokenizer([r[f.text] for r in rows], add_special_tokens=True)["input_ids"]
        return [Example([], list(x) + eos) for x in ids]
    if data_cfg.template == "chat":
        return [_chat_example(r, tokenizer, data_cfg) for r in rows]
    prompts = [ALPACA.prompt(r[f.instruction], r.get(f.input) or "") for r in rows]
    responses = [r[f.output] + ALPACA.end for r in rows]
    p_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    r_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    return [Example(list(p), list(r) + eos) for p, r in zip(p_ids, r_ids)]


def _chat_example(row: dict, tokenizer, data_cfg) -> Example:
    """Every assistant turn trains: for turn i, the tokens the template adds between
    `messages[:i]` + generation prompt and `messages[:i+1]`. A template that does not render
    each of those as a prefix of the whole conversation (some strip earlier turns' reasoning)
    cannot say where the turns are: then only the last turn trains, and when even the last
    prompt is not a prefix, every token does."""
    f = data_cfg.fields
    if row_format(row, data_cfg) != "instruction":
        msgs, _ = conversation(row, data_cfg)
    else:
        user = row[f.instruction] + (f"\n\n{row[f.input]}" if row.get(f.input) else "")
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": row[f.output]}]

    def render(messages, generation_prompt=False) -> list[int]:
        return list(chat_template_ids(tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=generation_prompt)))

    full = render(msgs)
    spans = []  # (start, end) of each assistant turn in `full`
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start, upto = render(msgs[:i], True) if i else [], render(msgs[: i + 1])
        if full[: len(upto)] != upto or upto[: len(start)] != start:
            spans = None
            break
        spans.append((len(start), len(upto)))
    if not spans:
        prompt = render(msgs[:-1], True)
        if full[: len(prompt)] != prompt:  # template not prefix-stable: train on everything
            return Example([], full)
        return Example(prompt, full[len(prompt):])
    first = spans[0][0]
    mask = [False] * (len(full) - first)
    for start, end in spans:
        mask[start - first:end - first] = [True] * (end - start)
    if len(spans) == 1 and spans[0][1] == len(full):
        return Example(full[:first], full[first:])
    return Example(full[:first], full[first:], mask)


def chat_template_ids(encoded) -> list[int]:
    """apply_chat_template returns ids or a BatchEncoding depending on the version."""
    return encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded


# --------------------------------------------------------------------------- sequences


def cut_example(ex: Example, data_cfg) -> tuple[tuple[list[int], list[int]] | None, str]:
    """One example's (ids, labels) after the `max_length` cut, and what the cut did: "" (fits),
    "truncated", "dropped" (too long under `too_long: drop`, or its cut left nothing to train),
    or "untrainable" (no label token at all). Dropped and untrainable examples give None."""
    max_len = data_cfg.max_length
    ids = ex.prompt_ids + ex.response_ids
    labels = ex.labels(data_cfg.train_on_prompt)
    status = ""
    if len(ids) > max_len:
        if data_cfg.too_long == "drop":
            return None, "dropped"
        ids, labels = ids[:max_len], labels[:max_len]
        if all(l == IGNORE for l in labels):  # the cut removed the whole response
            return None, "dropped"
        status = "truncated"
    labels = list(labels)
    labels[0] = IGNORE  # nothing precedes the first token inside its own segment
    if all(l == IGNORE for l in labels):
        return None, "untrainable"
    return (ids, labels), status


def sequences_of(kept: list[tuple[list[int], list[int]]], data_cfg) -> list[dict]:
    """Cut examples -> training sequences: packed (`pack_ffd`) or one per example."""
    if not data_cfg.packing:
        return [{"input_ids": i, "labels": l} for i, l in kept]
    return [_concat(group) for group in pack_ffd(kept, data_cfg.max_length)]


def to_sequences(examples: list[Example], data_cfg, report: DataReport | None, seed: int) -> list[dict]:
    """Examples -> training sequences (packed or one per example), with labels and positions,
    in a seeded random order."""
    kept: list[tuple[list[int], list[int]]] = []
    for ex in examples:
        pair, status = cut_example(ex, data_cfg)
        if report is not None and status == "dropped":
            report.too_long_dropped += 1
        elif report is not None and status == "truncated":
            report.truncated += 1
        if pair is not None:
            kept.append(pair)
    seqs = sequences_of(kept, data_cfg)
    random.Random(seed).shuffle(seqs)
    return seqs


def pack_ffd(items: list[tuple[list[int], list[int]]], capacity: int) -> list[list[tuple]]:
    """First-fit-decreasing bin packing of whole examples into bins of `capacity` tokens."""
    order = sorted(items, key=lambda it: len(it[0]), reverse=True)
    bins: list[list[tuple]] = []
    # free space of each bin, kept sorted with the bin index for best-fit lookup
    free: list[tuple[int, int]] = []
    for item in order:
        need = len(item[0])
        pos = bisect.bisect_left(free, (need, -1))
        if pos < len(free):
            space, idx = free.pop(pos)
            bins[idx].append(item)
            bisect.insort(free, (space - need, idx))
        else:
            bins.append([item])
            bisect.insort(free, (capacity - need, len(bins) - 1))
    return bins


def _concat(group: list[tuple[list[int], list[int]]]) -> dict:
    ids, labels, pos = [], [], []
    for i, l in group:
        ids += i
        labels += l
        pos += list(range(len(i)))
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


class Collator:
    """Pads a batch. Packed batches carry position ids and no attention mask (see module doc)."""

    def __init__(self, pad_id: int, packed: bool):
        self.pad_id, self.packed = pad_id, packed

    def __call__(self, batch: list[dict]) -> dict[str, Any]:
        import torch

        width = max(len(b["input_ids"]) for b in batch)
        out = {"input_ids": [], "labels": []}
        if self.packed:
            out["position_ids"] = []
        else:
            out["attention_mask"] = []
        for b in batch:
            n = len(b["input_ids"])
            pad = width - n
            out["input_ids"].append(b["input_ids"] + [self.pad_id] * pad)
            out["labels"].append(b["labels"] + [IGNORE] * pad)
            if self.packed:
                out["position_ids"].append(b["position_ids"] + list(range(pad)))
            else:
                out["attention_mask"].append([1] * n + [0] * pad)
        tensors = {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
        # real (non-padding) tokens, for tokens/s and packing efficiency; popped before forward
        tensors["num_tokens"] = torch.tensor(sum(len(b["input_ids"]) for b in batch))
        return tensors


def eval_batches(sequences, batch_size: int, rank: int, world: int, lockstep: bool = False):
    """The eval batches this rank scores, as (rows, counted): from a list, the shard
    `sequences[rank::world]` (each sequence scored once over the ranks; summed eval metrics are
    exact after the all-reduce); from a stream every rank reads (`ingest.EvalStream`), every
    world-th batch. `lockstep` (DeepSpeed ZeRO-3, where every forward is a collective): every
    rank runs the same number of forwards; one whose share ran out runs uncounted ones (on its
    first row, or the set's; a stream's rank with no batch at all gets no rows)."""
    if not isinstance(sequences, list):
        yield from sequences.rank_batches(batch_size, rank, world, lockstep)
        return
    shard = sequences[rank::world]
    n_batches = math.ceil(len(shard) / batch_size)
    if lockstep:
        n_batches = math.ceil(math.ceil(len(sequences) / world) / batch_size)
    for b in range(n_batches):
        i = b * batch_size
        yield (shard[i:i + batch_size], True) if i < len(shard) else ((shard or sequences)[:1], False)


# --------------------------------------------------------------------------- entry points


def preflight(job, tokenizer=None, sample: int | None = None) -> DataReport:
    """Driver-side check of instruction/chat/plain rows (sft and the RL objectives' prompts;
    `objectives.preflight` sends the other objectives to their own) before Ray starts:
    sources readable, rows usable, not empty; with the
    model's `tokenizer` (launch.preflight passes it), also that some example fits max_length.
    `sample`: only the first rows of a local file (data that Ray Data reads on the cluster)."""
    report = DataReport()
    streamed = sample is not None
    if streamed:  # the cluster reads it all (ingest.build); here a sample of a local file
        rows = valid_rows(sample_rows(job.data.train, sample), job.data, report)
        if report.rows == 0:  # a URI, a directory or a dataset: checked on the cluster
            return report
    else:
        rows = valid_rows(load_rows(job.data.train, "data.train"), job.data, report, job.data.max_rows)
    if not rows:
        reasons = ", ".join(f"{n}x {why}" for why, n in report.bad.most_common(3)) or "no rows"
        read = f"the first {report.rows} read" if streamed else f"{report.rows} read"
        raise DataError(
            "data.train",
            f"{job.data.train!r} has no usable rows ({read}: {reasons})",
            f"check data.template ({job.data.template}) and data.fields match the file's columns",
        )
    if job.data.eval and not streamed:
        eval_report = DataReport()
        if not valid_rows(load_rows(job.data.eval, "data.eval"), job.data, eval_report):
            raise DataError("data.eval", f"{job.data.eval!r} has no usable rows", "fix the file or remove data.eval")
    if tokenizer is not None and job.objective.name == "sft":  # RL samples its own completions: no cut
        check_some_example_fits(job, rows, tokenizer)
    return report


def check_some_example_fits(job, rows: list[dict], tokenizer, chunk: int = 256) -> None:
    """At least one training example survives `max_length` (dropped when longer, or truncated
    to nothing trainable when its prompt alone fills it): else every worker would stop in
    `prepare` with nothing to train on. The tokenizer and the cut are the workers' own, on the
    same training rows (the eval split held out), in chunks: a usable dataset stops at its
    first fitting example; only a failing one is tokenized whole, to say how long it is."""
    data_cfg = job.data
    if not data_cfg.eval:
        rows, _ = split_rows(rows, data_cfg.eval_split, job.train.seed)
    if not rows:  # everything held out for eval: `prepare` reports that
        return
    shortest = None  # tokens the most modest example needs to be kept
    for start in range(0, len(rows), chunk):
        examples = tokenize_rows(rows[start:start + chunk], tokenizer, data_cfg)
        if to_sequences(examples, data_cfg, None, job.train.seed):
            return
        for e in examples:  # dropped whole, or (truncate) needs its prompt and one answer token
            need = len(e.prompt_ids) + (len(e.response_ids) if data_cfg.too_long == "drop" else 1)
            shortest = need if shortest is None else min(shortest, need)
    why = (f"are longer than {data_cfg.max_length} tokens" if data_cfg.too_long == "drop"
           else f"have a prompt that fills all {data_cfg.max_length} tokens, leaving no answer to train on")
    raise DataError(
        "data.max_length",
        f"no training example fits: all {len(rows)} training rows {why} (the shortest needs {shortest})",
        f"raise data.max_length to at least {shortest}"
        + (", or set data.too_long: truncate" if data_cfg.too_long == "drop" else ", or shorten the prompts"),
    )


@dataclass
class Prepared:
    train: list[dict]
    eval: list[dict]
    report: DataReport


def train_and_eval_rows(job, report: DataReport) -> tuple[list[dict], list[dict]]:
    """The valid training rows (bad ones counted in `report`) and the eval rows: data.eval's,
    or the held-out `data.eval_split` of the training rows."""
    rows = valid_rows(load_rows(job.data.train, "data.train"), job.data, report, job.data.max_rows)
    if job.data.eval:
        return rows, valid_rows(load_rows(job.data.eval, "data.eval"), job.data, DataReport())
    return split_rows(rows, job.data.eval_split, job.train.seed)


def prepare(job, tokenizer) -> Prepared:
    """The full pipeline, run inside each worker (deterministic, so every rank agrees)."""
    report = DataReport()
    rows, eval_rows = train_and_eval_rows(job, report)
    train_ex = tokenize_rows(rows, tokenizer, job.data)
    eval_ex = tokenize_rows(eval_rows, tokenizer, job.data) if eval_rows else []
    train = to_sequences(train_ex, job.data, report, job.train.seed)
    evals = to_sequences(eval_ex, job.data, None, job.train.seed)
    report.train_examples, report.eval_examples = len(train_ex) - report.too_long_dropped, len(eval_ex)
    report.train_sequences = len(train)
    report.train_tokens = sum(len(s["input_ids"]) for s in train)
    if not train:
        raise DataError(
            "data.max_length",
            f"no training example fits in {job.data.max_length} tokens ({report.summary()})",
            "raise data.max_length or set data.too_long: truncate",
        )
    return Prepared(train, evals, report)
