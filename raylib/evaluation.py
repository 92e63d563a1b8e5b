"""Generation-based evaluation shared by training, RL, serve and CEM code.

- `prompts_for(rows, template, tokenizer)`: the inference prompt of each row;
- `generate(model, tokenizer, prompts, ...)`: batched (left-padded) generation, greedy by
  default, returning the completion text cut at the template's end marker;
- `final_answer(text)`: the answer part of a completion;
- `exact_match(model, tokenizer, rows, ...)`: greedy generate + compare with `output`.
"""

from __future__ import annotations

from typing import Sequence

END_MARKERS = ("### End", "\n\n###", "</s>")


def prompts_for(rows: Sequence[dict], template: str = "alpaca", tokenizer=None) -> list[str]:
    from raylib.data import render_prompt

    return [render_prompt(template, r["instruction"], r.get("input") or "", tokenizer) for r in rows]


def final_answer(text: str) -> str:
    """The completion up to the first end marker, stripped."""
    for marker in END_MARKERS:
        i = text.find(marker)
        if i >= 0:
            text = text[:i]
    return text.strip()


def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 16, batch_size: int = 16,
             do_sample: bool = False, temperature: float = 1.0, num_return_sequences: int = 1,
             return_ids: bool = False):
    """Completions for `prompts` (num_return_sequences per prompt, prompt-major order).

    With `return_ids`, returns (texts, [(prompt_ids, completion_ids)]) with unpadded ids
    (completion cut after the first EOS, which is kept) for scoring log-probs.
    """
    import torch

    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    texts, pairs = [], []
    try:
        with torch.no_grad():
            for i in range(0, len(prompts), batch_size):
                chunk = list(prompts[i : i + batch_size])
                enc = tokenizer(chunk, return_tensors="pt", padding=True).to(next(model.parameters()).device)
                out = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=do_sample,
                    temperature=temperature if do_sample else None, top_p=None, top_k=None,
                    num_return_sequences=num_return_sequences, pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id, use_cache=True,
                )
                # a decoder-only model's output starts with the prompt; an encoder-decoder's with
                # the decoder's start token
                width = 1 if getattr(model.config, "is_encoder_decoder", False) else enc["input_ids"].shape[1]
                for j, seq in enumerate(out):
                    comp = seq[width:].tolist()
                    if tokenizer.eos_token_id in comp:
                        comp = comp[: comp.index(tokenizer.eos_token_id) + 1]
                    texts.append(final_answer(tokenizer.decode(comp, skip_special_tokens=True)))
                    if return_ids:
                        row = j // num_return_sequences
                        mask = enc["attention_mask"][row].bool()
                        pairs.append((enc["input_ids"][row][mask].tolist(), comp))
    finally:
        tokenizer.padding_side = side
        if was_training:
            model.train()
    return (texts, pairs) if return_ids else texts


def exact_match(model, tokenizer, rows: Sequence[dict], template: str = "alpaca", max_new_tokens: int = 16,
                batch_size: int = 32) -> float:
    """Share of rows whose greedy answer equals `output` exactly (after stripping)."""
    if not rows:
        return 0.0
    answers = generate(model, tokenizer, prompts_for(rows, template, tokenizer), max_new_tokens, batch_size)
    return sum(a == str(r["output"]).strip() for a, r in zip(answers, rows)) / len(rows)
