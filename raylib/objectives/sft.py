"""SFT: next-token cross-entropy on the (unmasked) label tokens, and its evaluation."""

from __future__ import annotations


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


def evaluate(model, sequences, collator, batch_size: int, rank: int, world: int, device, reduce_sum,
             lockstep: bool = False):
    """Token-weighted eval loss and token accuracy over `sequences` (a list, or a Ray Data
    stream), exact across workers: each sequence is scored by one rank (`data.eval_batches`,
    which also keeps ranks in lockstep under ZeRO-3) and the sums are all-reduced."""
    import torch
    import torch.nn.functional as F

    from raylib.data import eval_batches

    totals = torch.zeros(3, dtype=torch.float64, device=device)  # nll, tokens, correct
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for rows, counted in eval_batches(sequences, batch_size, rank, world, lockstep):
            if not counted:  # lockstep padding: a forward that is not counted
                if rows:
                    model(**{k: v.to(device) for k, v in collator(rows).items() if k not in ("num_tokens", "labels")})
                else:
                    model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device))
                continue
            batch = collator(rows)
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
