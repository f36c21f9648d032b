"""Shared-prompt forwards (`models.forward`) equal one full forward per sequence, in values and gradients."""

import pytest
import torch

from alignkit.models.forward import prefill_positions, prefix_forward, unique_prompts
from alignkit.models.tiny import tiny_llama


def test_unique_prompts_hand_case():
    ids = torch.tensor([[0, 5, 6], [7, 8, 9], [0, 5, 6], [7, 8, 9], [0, 0, 6]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 1, 1], [1, 1, 1], [0, 1, 1]])
    first, index = unique_prompts(ids, mask)
    assert torch.equal(ids[first][index], ids) and torch.equal(mask[first][index], mask)
    assert len(first) == 3 and index[0] == index[2] and index[1] == index[3] and len(set(index.tolist())) == 3
    assert sorted(first.tolist()) == [0, 1, 4]  # the first occurrence of each


def test_same_ids_different_mask_are_different_prompts():
    ids = torch.tensor([[0, 0, 6], [0, 0, 6]])
    first, index = unique_prompts(ids, torch.tensor([[0, 1, 1], [1, 1, 1]]))  # a real token equal to the pad id
    assert len(first) == 2 and index[0] != index[1]


def _full_logits(model, prompt_ids, prompt_mask, ids, mask):
    """The reference computation: each (prompt, continuation) as one left-padded sequence."""
    full_ids = torch.cat([prompt_ids, ids], dim=1)
    full_mask = torch.cat([prompt_mask, mask], dim=1).long()
    a = ids.shape[1]
    out = model(input_ids=full_ids, attention_mask=full_mask, position_ids=prefill_positions(full_mask),
                output_hidden_states=True)
    return out.logits[:, -(a + 1) : -1], out.hidden_states[-1][:, -(a + 1) : -1]


@pytest.mark.parametrize("a", [1, 5])
def test_prefix_forward_equals_full_sequences_and_gradients(a):
    torch.manual_seed(0)
    model = tiny_llama()
    prompts = torch.randint(3, 200, (2, 6))
    prompt_mask = torch.ones(2, 6, dtype=torch.long)
    prompts[1, :2], prompt_mask[1, :2] = 0, 0  # left padding
    index = torch.tensor([0, 0, 1, 1, 1])  # a group of 2 and a group of 3
    ids = torch.randint(3, 200, (5, a))
    mask = torch.ones(5, a, dtype=torch.bool)
    mask[2, a - 1 :] = False  # a right-padded (finished) continuation
    weights = torch.randn(5, a, model.config.vocab_size)

    logits, states = prefix_forward(model, prompts, prompt_mask, index, ids, mask, hidden=True)
    (logits * weights * mask.unsqueeze(-1)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    want_logits, want_states = _full_logits(model, prompts[index], prompt_mask[index], ids, mask)
    (want_logits * weights * mask.unsqueeze(-1)).sum().backward()

    real = mask.unsqueeze(-1)
    assert logits.shape == want_logits.shape and states.shape == want_states.shape
    assert ((logits - want_logits).abs() * real).max() < 1e-4
    assert ((states - want_states).abs() * real).max() < 1e-4
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-4, rtol=1e-3)


def test_rollout_forward_shares_group_prompts():
    """GRPO rows (groups of 4 responses to 2 prompts, shuffled) score as if each were its own sequence."""
    from alignkit.models.tiny import tiny_tokenizer
    from alignkit.rollout.generate import SamplingConfig
    from alignkit.rollout.rollout import collect_rollout, response_logps, stack_rows
    from alignkit.rewards.base import CallableReward

    torch.manual_seed(0)
    tok, policy = tiny_tokenizer(), tiny_llama()
    rows = [{"prompt": "review one"}, {"prompt": "a much longer review prompt"}]
    reward = CallableReward(lambda prompts, completions: [0.0] * len(completions))
    r = collect_rollout(policy, tok, rows, reward, SamplingConfig(max_new_tokens=6), group_size=4,
                        reference=tiny_llama(), chat_template=False)
    order = [5, 0, 7, 2, 1, 6, 3, 4]
    batch = stack_rows([r.rows()[i] for i in order])
    assert (response_logps(policy, batch) - r.old_logps[order]).abs().max() < 1e-4
    # rescore (what bf16 training asks for): old_logps are exactly the teacher-forced forward's
    torch.manual_seed(0)
    again = collect_rollout(policy, tok, rows, reward, SamplingConfig(max_new_tokens=6), group_size=4,
                            reference=tiny_llama(), chat_template=False, rescore=True)
    assert torch.equal(again.response_ids, r.response_ids)
    assert torch.equal(again.old_logps, response_logps(policy, stack_rows(again.rows())))
    assert not torch.equal(again.old_logps, r.old_logps)  # the sampler's differ, if only by rounding
