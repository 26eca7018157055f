"""The PPO critic: initialised from a reward model it reproduces the RM score at the last token; from the
policy it starts at zero; it trains and saves/loads."""

from __future__ import annotations

import pytest
import torch

from prefopt.errors import ConfigError
from prefopt.models.reward import ModelReward
from prefopt.models.tiny import build_tiny_reward_model
from prefopt.models.value_head import ValueModel, load_critic


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from prefopt.models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("critic")
    policy = build_tiny_model(root / "policy")
    reward_model = build_tiny_reward_model(root / "rm", policy, init_from=str(policy), seed=3)
    return {"policy": policy, "rm": reward_model, "root": root}


def _batch(tokenizer, texts):
    rows = [tokenizer(text)["input_ids"] for text in texts]
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    return input_ids, attention_mask, [len(row) for row in rows]


def test_critic_from_reward_model_reproduces_rm_score_at_last_token(dirs):
    reward = ModelReward(str(dirs["rm"]), device="cpu")
    critic = load_critic(str(dirs["rm"]), policy_path=str(dirs["policy"]), dtype="float32")
    assert isinstance(critic, ValueModel) and critic.training
    input_ids, attention_mask, lengths = _batch(
        reward.tokenizer, ["hello world", "The quick brown fox jumps over"]
    )
    with torch.no_grad():
        values = critic(input_ids, attention_mask)
        rm_scores = reward.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
    assert values.shape == input_ids.shape and values.dtype == torch.float32
    last = values[torch.arange(len(lengths)), torch.tensor(lengths) - 1]
    torch.testing.assert_close(last, rm_scores, rtol=1e-5, atol=1e-6)
    assert rm_scores.abs().min() > 0  # a non-trivial head was copied


def test_critic_from_policy_has_policy_backbone_and_zero_head(dirs):
    from transformers import AutoModelForCausalLM

    critic = load_critic(None, policy_path=str(dirs["policy"]))
    policy = AutoModelForCausalLM.from_pretrained(dirs["policy"])
    for name, tensor in policy.model.state_dict().items():
        assert torch.equal(critic.backbone.state_dict()[name], tensor), name
    values = critic(torch.tensor([[5, 6, 7]]))
    assert torch.all(values == 0)
    values.sum().backward()
    assert critic.value_head.weight.grad is not None and critic.value_head.weight.grad.abs().sum() > 0


def test_critic_trains_end_to_end_and_round_trips(dirs):
    critic = load_critic(str(dirs["rm"]), policy_path=str(dirs["policy"]))
    input_ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    optimizer = torch.optim.SGD(critic.parameters(), lr=0.1)
    loss = (critic(input_ids) - 1.0).pow(2).mean()
    loss.backward()
    assert critic.backbone.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    optimizer.step()
    out = critic.save(dirs["root"] / "saved-critic")
    reloaded = load_critic(str(out), policy_path=str(dirs["policy"]))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids), critic(input_ids))


def test_critic_needs_a_reward_model_not_a_causal_lm(dirs):
    with pytest.raises(ConfigError, match="ppo.critic"):
        load_critic(str(dirs["policy"]), policy_path=str(dirs["policy"]))
