"""Evaluation metrics: perplexity and token accuracy (teacher forcing on the response tokens),
exact match, BLEU (sacrebleu, corpus level) and ROUGE-1/2/L F1 (rouge-score), all offline;
and the steady step time every training loop reports."""

from __future__ import annotations

import math
import statistics
from typing import Sequence


def perplexity(nll_sum: float, tokens: int) -> float:
    return math.exp(nll_sum / tokens) if tokens else float("nan")


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    if not references:
        return float("nan")
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(references)


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (0-100) with sacrebleu's default 13a tokenizer and exponential smoothing."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (0-1) over rows; tokens are lower-cased alphanumerics (rouge-score's
    default tokenizer, no stemming so numbers and code keep their form)."""
    from rouge_score import rouge_scorer

    kinds = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=False)
    totals = dict.fromkeys(kinds, 0.0)
    for p, r in zip(predictions, references):
        scores = scorer.score(r, p)
        for k in kinds:
            totals[k] += scores[k].fmeasure
    n = max(len(references), 1)
    return {k: v / n for k, v in totals.items()}


def text_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    return {"exact_match": exact_match(predictions, references), "bleu": bleu(predictions, references),
            **rouge(predictions, references)}


def steady_step_time(step_times: list[float]) -> float:
    """Median step time without the warm-up steps (allocator, first-call overheads)."""
    steady = step_times[3:] if len(step_times) > 6 else step_times
    return statistics.median(steady) if steady else 0.0
