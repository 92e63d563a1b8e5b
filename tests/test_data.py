"""Data pipeline: templates, prompt masking, bad rows, and packing that keeps examples apart."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import job_dict, run_cli, write_job

from raylib import data
from raylib.config import validate_job
from raylib.errors import DataError
from raylib.models import load_model, load_tokenizer


def _job(tmp_path, train, **data_cfg):
    return validate_job({
        "model": {"path": "unused"},
        "data": {"train": train, **data_cfg},
        "method": {"name": "lora"},
        "output": {"dir": str(tmp_path / "out")},
    })


@pytest.fixture(scope="module")
def tok(tiny_model):
    return load_tokenizer(validate_job({"model": {"path": tiny_model}, "data": {"train": "x"}, "method": {"name": "lora"}, "output": {"dir": "o"}}).model)


def test_alpaca_template_matches_the_seed_format():
    text = data.ALPACA.prompt("Reverse the word.", "lamp") + "pmal" + data.ALPACA.end
    assert text == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nReverse the word.\n\n### Input:\nlamp\n\n### Output:\npmal\n\n### End"
    )
    assert "### Input" not in data.ALPACA.prompt("What is 1 + 1?")


def test_prompt_is_masked_and_response_ends_with_eos(tok, tmp_path):
    job = _job(tmp_path, "x", packing=False)
    (ex,) = data.tokenize_rows([{"instruction": "What is 1 + 2?", "input": "", "output": "3"}], tok, job.data)
    assert ex.prompt_ids[0] == tok.bos_token_id and ex.response_ids[-1] == tok.eos_token_id
    (seq,) = data.to_sequences([ex], job.data, None, seed=0)
    n_prompt = len(ex.prompt_ids)
    assert all(l == data.IGNORE for l in seq["labels"][:n_prompt])
    assert seq["labels"][n_prompt:] == ex.response_ids
    job_all = _job(tmp_path, "x", packing=False, train_on_prompt=True)
    (seq_all,) = data.to_sequences([ex], job_all.data, None, seed=0)
    assert seq_all["labels"][1:] == (ex.prompt_ids + ex.response_ids)[1:]


def test_bad_rows_are_counted_by_reason(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "a"}, {"instruction": "", "output": "b"},
            {"instruction": "a", "output": ["b"]}, {"instruction": "What is 2 + 2?", "output": 4}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    report = data.preflight(_job(tmp_path, str(path)))
    assert report.rows == 5 and report.bad_total == 3  # a numeric answer is text
    assert report.bad == {"missing 'output'": 1, "empty 'instruction'": 1, "'output' is not text": 1}


@pytest.mark.parametrize("content, message", [("", "is empty"), ('{"text": "hello"}\n', "no usable rows")])
def test_empty_dataset_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        data.preflight(_job(tmp_path, str(path)))


def test_csv_and_parquet_sources(tmp_path):
    import pandas as pd

    frame = pd.DataFrame([{"instruction": "What is 2 + 2?", "input": "", "output": "4"}] * 3)
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet")
    for name in ("d.csv", "d.parquet"):
        assert data.preflight(_job(tmp_path, str(tmp_path / name))).rows == 3
    with pytest.raises(DataError, match="unsupported file type .txt"):
        (tmp_path / "d.txt").write_text("x")
        data.preflight(_job(tmp_path, str(tmp_path / "d.txt")))


def _rows(n: int) -> list[str]:
    return [json.dumps({"instruction": f"What is {i} + 1?", "input": "", "output": str(i + 1)}) for i in range(n)]


def _corrupt(tmp_path, kind: str) -> str:
    """A 40-row source whose row 21 is broken the way a cut-off download or an unquoted comma breaks it."""
    lines = _rows(40)
    if kind == "jsonl":
        lines[20] = lines[20][:30]  # cut off inside the instruction: {"instruction": "What is 20 + 
        text = "\n".join(lines) + "\n"
    elif kind == "json":  # one document: "[" is line 1, row 21 is line 22
        lines[20] = lines[20][:30]
        text = "[\n" + ",\n".join(lines) + "\n]\n"
    else:
        csv_rows = ["instruction,input,output"] + [f"What is {i} + 1?,,{i + 1}" for i in range(40)]
        csv_rows[21] = "What is 20, plus 1?,,21"  # an unquoted comma: 4 fields, line 22 of the file
        text = "\n".join(csv_rows) + "\n"
    path = tmp_path / f"corrupt.{kind}"
    path.write_text(text)
    return str(path)


# The CLI runs with RAY_ADDRESS at a closed port: had it tried to reach Ray, it would fail
# with a connection error instead of the data error asserted (as in test_config.py).
NO_RAY = {"RAY_ADDRESS": "127.0.0.1:1"}


@pytest.mark.parametrize("command, kind, where", [("validate", "jsonl", "line 21: invalid JSON (Unterminated string"),
                                                  ("train", "csv", "line 22: 4 fields, the header has 3")])
def test_cli_names_the_corrupt_line(tiny_model, tmp_path, command, kind, where):
    """Before: `error: data.train: cannot read ...: DatasetGenerationError: An error occurred
    while generating the dataset`, after an ERROR log line from datasets."""
    source = _corrupt(tmp_path, kind)
    job = job_dict(tiny_model, {"train": source, "eval": None}, str(tmp_path / "out"))
    proc = run_cli(command, write_job(tmp_path / "job.yaml", job), env=NO_RAY, timeout=180)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith(f"error: data.train: {source!r} {where}"), lines
    assert "(fix: " in lines[0]


def test_corrupt_sources_name_their_line(tmp_path):
    cases = [
        (_corrupt(tmp_path, "json"), "line 22: invalid JSON (Invalid control character at column 32)"),
        (_corrupt(tmp_path, "jsonl"), "line 21: invalid JSON (Unterminated string starting at column 17)"),
    ]
    lines = _rows(8)
    lines[5] = "[1, 2]"
    (tmp_path / "array.jsonl").write_text("\n".join(lines))
    cases.append((str(tmp_path / "array.jsonl"), "line 6: a JSON array, not an object"))
    quote = tmp_path / "quote.csv"
    quote.write_text("instruction,input,output\nWhat is 1 + 1?,,2\n\"What is 2 + 2?,,4\nWhat is 3 + 3?,,6\n")
    cases.append((str(quote), "line 3: a quoted field opened on this line is never closed"))
    for source, where in cases:
        with pytest.raises(DataError) as err:
            data.preflight(_job(tmp_path, source))
        assert str(err.value).startswith(f"data.train: {source!r} {where}"), str(err.value)
    # a source that reads fine is untouched by the scan: blank lines and CRLF are valid JSON Lines
    ok = tmp_path / "ok.jsonl"
    ok.write_bytes(("\r\n".join(_rows(3)) + "\r\n\r\n").encode())
    assert data.preflight(_job(tmp_path, str(ok))).rows == 3


def test_chat_template_masks_the_user_turn(tok, tmp_path):
    job = _job(tmp_path, "x", template="chat", packing=False)
    row = {"messages": [{"role": "user", "content": "Reverse the word. lamp"}, {"role": "assistant", "content": "pmal"}]}
    (ex,) = data.tokenize_rows([row], tok, job.data)
    assert tok.decode(ex.response_ids).strip().startswith("pmal") and ex.response_ids[-1] == tok.eos_token_id
    assert "<|assistant|>" in tok.decode(ex.prompt_ids)


CONVERSATION = [("Reverse the word. lamp", "pmal"), ("Uppercase the word. river", "RIVER"), ("What is 2 + 3?", "5")]


def _trained_text(tok, ex: data.Example, job) -> list[str]:
    """The decoded runs of trained tokens of an example, in order."""
    ids, labels = ex.prompt_ids + ex.response_ids, ex.labels(job.data.train_on_prompt)
    runs, cur = [], []
    for t, lab in zip(ids, labels):
        if lab == data.IGNORE:
            if cur:
                runs.append(tok.decode(cur).strip())
            cur = []
        else:
            cur.append(t)
    return runs + ([tok.decode(cur).strip()] if cur else [])


@pytest.mark.parametrize("shape", ["messages", "sharegpt", "turns"])
def test_every_assistant_turn_of_a_conversation_trains(shape, tok, tmp_path):
    """Multi-turn rows in all three shapes (chat messages, ShareGPT, seed 004's turns) give the
    same example: every assistant answer trains, no user turn does."""
    job = _job(tmp_path, "x", template="chat", packing=False)
    if shape == "messages":
        row = {"messages": [m for u, a in CONVERSATION for m in ({"role": "user", "content": u},
                                                                  {"role": "assistant", "content": a})]}
    elif shape == "sharegpt":
        row = {"conversations": [t for u, a in CONVERSATION for t in ({"from": "human", "value": u},
                                                                      {"from": "gpt", "value": a})]}
    else:
        row = {"conversations": [{"input": u, "output": a} for u, a in CONVERSATION]}
    assert data.row_format(row, job.data) == shape
    (ex,) = data.tokenize_rows(data.valid_rows([row], job.data, data.DataReport()), tok, job.data)
    trained = _trained_text(tok, ex, job)
    assert [t.split(tok.eos_token)[0].strip() for t in trained] == ["pmal", "RIVER", "5"], trained
    assert not any("Reverse" in t or "Uppercase" in t or "What is" in t for t in trained)
    # packed sequences keep the per-turn labels
    (seq,) = data.to_sequences([ex], job.data.model_copy(update={"packing": True}), None, seed=0)
    assert seq["labels"][len(ex.prompt_ids):] == ex.labels(False)[len(ex.prompt_ids):]


def test_bad_conversations_are_counted_and_need_the_chat_template(tmp_path):
    job = _job(tmp_path, "x", template="chat")
    rows = [{"conversations": [{"from": "narrator", "value": "hi"}, {"from": "gpt", "value": "x"}]},
            {"conversations": [{"input": "a", "output": ""}]},
            {"conversations": [{"from": "human", "value": "a"}]},
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    report = data.DataReport()
    assert len(data.valid_rows(rows, job.data, report)) == 1
    assert set(report.bad) == {"a ShareGPT turn of 'conversations' has an unknown 'from' or no text 'value'",
                               "a turn of 'conversations' lacks text 'input' and 'output'",
                               "last message is not a non-empty assistant turn"}
    from raylib.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        _job(tmp_path, "x", template="alpaca", format="sharegpt")
    assert err.value.field == "data.format" and "template: chat" in str(err.value)


def test_multi_turn_sft_trains_every_turn(tiny_model, tmp_path):
    """A real run on two-turn conversations (ShareGPT rows, packed): eval loss over both
    assistant turns drops."""
    from raylib.synthetic import make_rows, write_jsonl
    from raylib.train_loop import PlainSession, run

    rows = make_rows(400, seed=5)
    convs = [{"conversations": [{"from": "human", "value": f"{a['instruction']} {a['input']}".strip()},
                                {"from": "gpt", "value": a["output"]},
                                {"from": "human", "value": f"{b['instruction']} {b['input']}".strip()},
                                {"from": "gpt", "value": b["output"]}]} for a, b in zip(rows[::2], rows[1::2])]
    paths = {"train": write_jsonl(convs[:180], str(tmp_path / "train.jsonl")),
             "eval": write_jsonl(convs[180:], str(tmp_path / "eval.jsonl"))}
    raw = job_dict(tiny_model, paths, str(tmp_path / "o"), train={"max_steps": 12, "checkpoint_every": 0})
    raw["data"].update(template="chat", format="sharegpt")
    job = validate_job(raw)
    session = PlainSession(str(tmp_path / "ck"))
    run(job, session)
    final = session.reports[-1]
    assert final["eval_loss"] < final["eval_loss_before"] - 0.5, final
    assert final["data_bad_rows"] == 0 and final["packing_efficiency"] > 0.9


def test_ffd_packing_respects_capacity_and_is_efficient():
    items = [([1] * n, [1] * n) for n in [30, 45, 12, 60, 25, 8, 33, 50, 41, 19] * 20]
    bins = data.pack_ffd(items, 128)
    assert sorted(len(i[0]) for b in bins for i in b) == sorted(len(i[0]) for i in items)
    assert all(sum(len(i[0]) for i in b) <= 128 for b in bins)
    used = sum(len(i[0]) for i in items) / (len(bins) * 128)
    assert used > 0.95


def test_packed_examples_do_not_attend_to_each_other(tiny_model, tok, tmp_path):
    job = _job(tmp_path, "x", packing=True)
    rows = [{"instruction": "What is 1 + 2?", "input": "", "output": "3"},
            {"instruction": "Reverse the word.", "input": "lamp", "output": "pmal"},
            {"instruction": "Which is larger: 3 or 9?", "input": "", "output": "9"}]
    examples = data.tokenize_rows(rows, tok, job.data)
    (seq,) = data.to_sequences(examples, job.data, None, seed=0)
    batch = data.Collator(tok.pad_token_id, packed=True)([seq])
    model = load_model(_job(tmp_path, "x").model.model_copy(update={"path": tiny_model}))
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        offset = 0
        for length in [len(s) for s in _segments(seq["position_ids"])]:
            ids = torch.tensor([seq["input_ids"][offset: offset + length]])
            alone = model(input_ids=ids, use_cache=False).logits[0]
            torch.testing.assert_close(packed[offset: offset + length], alone, atol=1e-4, rtol=1e-4)
            offset += length
    assert offset == len(seq["input_ids"])
    # the first token of every packed example is never a target (nothing precedes it)
    starts = [i for i, p in enumerate(seq["position_ids"]) if p == 0]
    assert len(starts) == 3 and all(seq["labels"][i] == data.IGNORE for i in starts)


def _segments(position_ids):
    seg = []
    for p in position_ids:
        if p == 0 and seg:
            yield seg
            seg = []
        seg.append(p)
    yield seg


def test_too_long_examples_are_dropped_or_truncated(tok, tmp_path):
    rows = [{"instruction": "Repeat.", "input": "", "output": "word " * 50},  # long response
            {"instruction": "word " * 50, "input": "", "output": "x"},  # long prompt: truncation leaves no target
            {"instruction": "What is 1 + 1?", "input": "", "output": "2"}]
    for mode, kept, dropped in [("drop", 1, 2), ("truncate", 2, 1)]:
        job = _job(tmp_path, "x", max_length=48, too_long=mode, packing=False)
        report = data.DataReport()
        seqs = data.to_sequences(data.tokenize_rows(rows, tok, job.data), job.data, report, seed=0)
        assert len(seqs) == kept and all(len(s["input_ids"]) <= 48 for s in seqs)
        assert report.too_long_dropped == dropped


def test_held_out_synthetic_split_never_trains_on_a_test_prompt(tmp_path):
    """The SVF quality benchmark's test split: no eval prompt is a training prompt, in any
    domain (strings has 52 prompts, so disjoint seeds alone would repeat them all)."""
    from raylib.synthetic import DOMAINS, write_dataset

    for domain in DOMAINS:
        paths = write_dataset(str(tmp_path / domain), n_train=400, n_eval=100, domains=[domain], held_out=True)
        prompts = {name: {(r["instruction"], r["input"]) for r in map(json.loads, open(path))} for name, path in paths.items()}
        assert prompts["eval"] and prompts["train"] and not prompts["eval"] & prompts["train"], domain
    # without held_out, the strings eval set is all training prompts
    paths = write_dataset(str(tmp_path / "plain"), n_train=400, n_eval=100, domains=["strings"])
    prompts = {name: {(r["instruction"], r["input"]) for r in map(json.loads, open(path))} for name, path in paths.items()}
    assert prompts["eval"] <= prompts["train"]
