"""Training losses the tests name through `objective.loss: custom_losses:NAME`."""

import torch.nn.functional as F


def shifted_ce_plus_ten(output, batch):
    """Next-token cross-entropy on the trained tokens, plus 10: the run's reported loss then
    shows which loss trained."""
    logits = output.logits[:, :-1].float()
    target = batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=-100) + 10.0


def focal(output, batch, gamma: float = 2.0):
    """Focal loss over each row's own task head (classification)."""
    total = 0.0
    for i, logits in enumerate(output.logits.values()):
        mask = batch["task_ids"] == i
        if mask.any():
            logp = F.log_softmax(logits[mask].float(), -1).gather(-1, batch["labels"][mask, None]).squeeze(-1)
            total = total + (-(1 - logp.exp()) ** gamma * logp).sum()
    return total / batch["labels"].numel()


def three_args(output, batch, extra):
    return 0.0


NOT_CALLABLE = 3


_calls = 0


def crash_once_at_call_3(output, batch):
    """Next-token cross-entropy that raises in its third call while the marker file the
    resume tests create exists (deleted by the raise: the rerun passes)."""
    import os
    import tempfile

    global _calls
    _calls += 1
    marker = os.path.join(tempfile.gettempdir(), "raylib-test-crash-once")
    if _calls == 3 and os.path.exists(marker):
        try:
            os.remove(marker)
        except FileNotFoundError:
            pass
        raise RuntimeError("injected crash in step 3")
    return shifted_ce_plus_ten(output, batch) - 10.0
