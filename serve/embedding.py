"""/v1/embeddings' computation, shared by the engines: decoder LMs have no pooled output, so a
text's vector is the mean of the base model's last hidden layer over its tokens (padding
masked), L2-normalised. Mean pooling needs no extra weights and is the usual choice."""

from __future__ import annotations


def mean_pooled(model, tokenizer, texts: list[str], **forward_kwargs) -> tuple[list[list[float]], int]:
    """(one vector per text, input tokens used)."""
    import torch

    enc = tokenizer(texts, return_tensors="pt", padding=True).to(next(model.parameters()).device)
    with torch.no_grad():
        out = model(**enc, output_hidden_states=True, **forward_kwargs)
    hidden = out.hidden_states[-1].float()
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    vectors = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)
    return vectors.tolist(), int(enc["attention_mask"].sum())
