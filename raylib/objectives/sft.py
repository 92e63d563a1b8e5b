"""SFT: next-token cross-entropy on the (unmasked) label tokens, and its evaluation."""

from __future__ import annotations

import math


def prepare(job, tokenizer, model=None, device=None):
    """Templated, tokenized (packed) sequences: raylib.data.prepare."""
    from raylib import data

    return data.prepare(job, tokenizer)


def collator(job, tokenizer):
    from raylib import data

    return data.Collator(tokenizer.pad_token_id, packed=job.data.packing)


def loss(model, batch):
    """Mean next-token loss over label tokens of one micro-batch."""
    return model(**batch, use_cache=False).loss


def evaluate(model, sequences: list[dict], collator, batch_size: int, rank: int, world: int, device, reduce_sum,
             lockstep: bool = False):
    """Token-weighted eval loss and token accuracy over `sequences`, exact across workers.

    Each worker scores the shard `sequences[rank::world]`; sums are all-reduced, so no
    sequence is counted twice (unlike an evenly padded distributed loader). `lockstep`
    (DeepSpeed ZeRO-3, where every forward is a collective that gathers parameters): all
    workers run the same number of forwards; a worker whose shard ran out scores a batch
    again and does not count it.
    """
    import torch
    import torch.nn.functional as F

    shard = sequences[rank::world]
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # nll, tokens, correct
    was_training = model.training
    model.eval()
    n_batches = math.ceil(len(shard) / batch_size)
    if lockstep:
        n_batches = math.ceil(math.ceil(len(sequences) / world) / batch_size)
    with torch.no_grad():
        for b in range(n_batches):
            i = b * batch_size
            if i >= len(shard):  # lockstep padding: a forward that is not counted
                if shard:
                    model(**{k: v.to(device) for k, v in collator(shard[:1]).items() if k not in ("num_tokens", "labels")})
                else:
                    model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device))
                continue
            batch = collator(shard[i : i + batch_size])
            batch.pop("num_tokens", None)
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            logits = model(**batch, use_cache=False).logits
            # prompt/p-tuning prepend virtual-token positions to the logits: keep the real ones
            logits = logits[:, -labels.size(1):][:, :-1].float()
            target = labels[:, 1:]
            mask = target != -100
            nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=-100, reduction="sum")
            totals[0] += nll
            totals[1] += mask.sum()
            totals[2] += ((logits.argmax(-1) == target) & mask).sum()
    if was_training:
        model.train()
    totals = reduce_sum(totals)
    n = max(totals[1].item(), 1.0)
    return {"eval_loss": totals[0].item() / n, "eval_token_accuracy": totals[2].item() / n, "eval_tokens": int(totals[1].item())}
