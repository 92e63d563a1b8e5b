"""SFT of an encoder-decoder (T5, BART: `model.family: seq2seq`): the encoder reads the
rendered instruction/input (`data.template: alpaca`), the decoder learns `output` + EOS.

One example per row (no packing: the encoder's input and the decoder's target are separate
sequences). `data.max_length` bounds each side; a longer one is dropped or truncated by
`data.too_long`, as SFT does. The loss is the model's own (transformers shifts the labels into
the decoder's inputs); eval reports the token-weighted loss and token accuracy of the targets,
which line up with the logits (no shift), exact across workers.
"""

from __future__ import annotations

IGNORE = -100


def sequences(rows: list[dict], tokenizer, data_cfg, report=None) -> list[dict]:
    """Valid rows -> {"input_ids", "labels"} (prompt ids, target ids + EOS)."""
    from raylib.data import render_prompt

    if not rows:
        return []
    f, max_len = data_cfg.fields, data_cfg.max_length
    sources = [render_prompt(data_cfg.template, r[f.instruction], r.get(f.input) or "", tokenizer) for r in rows]
    src = tokenizer(sources, add_special_tokens=True)["input_ids"]
    tgt = tokenizer([str(r[f.output]) for r in rows], add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for s, t in zip(src, tgt):
        s, t = list(s), list(t) + eos
        if len(s) > max_len or len(t) > max_len:
            if data_cfg.too_long == "drop":
                if report is not None:
                    report.too_long_dropped += 1
                continue
            s, t = s[:max_len], t[:max_len]
            if report is not None:
                report.truncated += 1
        out.append({"input_ids": s, "labels": t})
    return out


def prepare(job, tokenizer, model=None, device=None):
    import random

    from raylib.data import DataReport, Prepared, train_and_eval_rows
    from raylib.errors import DataError

    report = DataReport()
    rows, eval_rows = train_and_eval_rows(job, report)
    train = sequences(rows, tokenizer, job.data, report)
    evals = sequences(eval_rows, tokenizer, job.data)
    random.Random(job.train.seed).shuffle(train)
    report.train_examples = report.train_sequences = len(train)
    report.eval_examples = len(evals)
    report.train_tokens = sum(len(s["input_ids"]) + len(s["labels"]) for s in train)
    if not train:
        raise DataError("data.max_length", f"no training example fits in {job.data.max_length} tokens "
                        f"({report.summary()})", "raise data.max_length or set data.too_long: truncate")
    return Prepared(train, evals, report)


class Collator:
    """Right-pads the encoder inputs (attention mask) and the targets (-100)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[dict]):
        import torch

        src_w = max(len(b["input_ids"]) for b in batch)
        tgt_w = max(len(b["labels"]) for b in batch)
        return {
            "input_ids": torch.tensor([b["input_ids"] + [self.pad_id] * (src_w - len(b["input_ids"])) for b in batch]),
            "attention_mask": torch.tensor([[1] * len(b["input_ids"]) + [0] * (src_w - len(b["input_ids"]))
                                            for b in batch]),
            "labels": torch.tensor([b["labels"] + [IGNORE] * (tgt_w - len(b["labels"])) for b in batch]),
            # real and padded tokens, both sides (tokens/s, padding efficiency); popped before the forward
            "num_tokens": torch.tensor(sum(len(b["input_ids"]) + len(b["labels"]) for b in batch)),
            "num_padded": torch.tensor(len(batch) * (src_w + tgt_w)),
        }


def collator(job, tokenizer):
    return Collator(tokenizer.pad_token_id)


def loss(model, batch):
    return model(**batch, use_cache=False).loss


def evaluate(model, seqs: list[dict], collate, batch_size: int, rank: int, world: int, device, reduce_sum,
             lockstep: bool = False):
    """Token-weighted eval loss and token accuracy of the targets (see sft.evaluate for the
    sharding and `lockstep`)."""
    import torch
    import torch.nn.functional as F

    from raylib.data import eval_batches

    totals = torch.zeros(3, dtype=torch.float64, device=device)  # nll, tokens, correct
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for rows, counted in eval_batches(seqs, batch_size, rank, world, lockstep):
            batch = collate(rows)
            batch.pop("num_tokens")
            batch.pop("num_padded")
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(**batch, use_cache=False).logits.float()
            if not counted:  # lockstep padding: a forward that is not counted
                continue
            labels = batch["labels"]
            mask = labels != IGNORE
            totals[0] += F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE,
                                         reduction="sum")
            totals[1] += mask.sum()
            totals[2] += ((logits.argmax(-1) == labels) & mask).sum()
    if was_training:
        model.train()
    totals = reduce_sum(totals)
    n = max(totals[1].item(), 1.0)
    return {"eval_loss": totals[0].item() / n, "eval_token_accuracy": totals[2].item() / n,
            "eval_tokens": int(totals[1].item())}
