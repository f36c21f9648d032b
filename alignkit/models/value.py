"""Policy + value function for PPO: a scalar head on the policy's trunk, or a separate critic trunk.

`ActorCritic` is one module, so the engine's optimiser, clipping and checkpoints cover the policy
(or its LoRA adapter), the critic and the value head together. The value head is a Linear(H, 1)
initialised to zero (lm-human-preferences; "The N implementation details of RLHF with PPO"): the
first values are 0, so early advantages are the plain returns and no random critic noise enters.
"""

from __future__ import annotations

import torch
from torch import nn

from alignkit.rollout.rollout import forward_response


def hidden_size(model) -> int:
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    return config.hidden_size


class ActorCritic(nn.Module):
    """`policy` (a causal LM, maybe PEFT) and V(s_t) from `critic` (a trunk such as `AutoModel`, maybe
    PEFT) or, when `critic` is None, from the policy's own last hidden states (one shared forward)."""

    def __init__(self, policy, critic=None):
        super().__init__()
        self.policy, self.critic = policy, critic
        self.value_head = nn.Linear(hidden_size(critic if critic is not None else policy), 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def critic_values(self, batch: dict) -> torch.Tensor:
        """V(s_t) (B, A) from the separate critic: the state before each response token."""
        p, a = batch["prompt_ids"].shape[1], batch["response_ids"].shape[1]
        ids = torch.cat([batch["prompt_ids"], batch["response_ids"]], dim=1)
        mask = torch.cat([batch["prompt_mask"], batch["response_mask"]], dim=1).long()
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        states = self.critic(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
        return self.value_head(states[:, p - 1 : p + a - 1].to(self.value_head.weight.dtype)).squeeze(-1)

    def forward(self, batch: dict, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Response logits (B, A, V) and values (B, A)."""
        shared = self.critic is None
        logits, states = forward_response(self.policy, batch, temperature, hidden=shared)
        if shared:
            return logits, self.value_head(states.to(self.value_head.weight.dtype)).squeeze(-1)
        return logits, self.critic_values(batch)

    @torch.no_grad()
    def values(self, batch: dict) -> torch.Tensor:
        """Values alone (for the rollout); the shared head needs the policy forward anyway."""
        if self.critic is not None:
            return self.critic_values(batch)
        return self.forward(batch)[1]
