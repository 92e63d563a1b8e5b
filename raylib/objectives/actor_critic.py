"""PPO's actor-critic module: the policy LM with a scalar value head (objectives/rl.py).

Its own module because it subclasses torch.nn.Module: rl.py stays importable without torch
(the job schema is validated before anything heavy loads).
"""

from __future__ import annotations

import torch


class ActorCritic(torch.nn.Module):
    """The policy LM and a value head on its last hidden state (a shared backbone, as TRL's
    former AutoModelForCausalLMWithValueHead): forward -> (logits, values), one module so one
    optimizer and one DDP wrapper cover both. The head is training state, not part of the
    expert: checkpoints keep it in train_state/value_head.pt."""

    def __init__(self, policy, hidden_size: int):
        super().__init__()
        self.policy = policy
        self.value_head = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.normal_(self.value_head.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        torch.nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask):
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
        width = input_ids.size(1)  # prompt learning prepends virtual positions: keep the real ones
        return out.logits[:, -width:], self.value_head(out.hidden_states[-1][:, -width:].float()).squeeze(-1)
