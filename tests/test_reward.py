"""The reward layer: function/judge callables, penalties, normalisation, reward models with their own
tokenizer, and the implicit DPO reward checked against an independent computation."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from prefopt.config import RewardConfig
from prefopt.errors import ConfigError
from prefopt.models.reward import (
    FunctionReward,
    ImplicitReward,
    ModelReward,
    ScorerJudge,
    ScoreTransform,
    build_reward,
)
from prefopt.models.tiny import build_tiny_reward_model

# A different chat template than the policy's ChatML, so re-rendering is visible in the token ids.
RM_TEMPLATE = "{% for m in messages %}{{ '### ' + m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
RM_CORPUS = [
    "### user: ### assistant: rate this reply",
    "good bad great poor fine nice awful lovely answer",
] * 4

GOLD_MODULE = '''
def score(prompt, completion):
    """Gold-task-like reward: +1 per 'good', -1 per 'bad', minus a length cost."""
    words = completion.split()
    return words.count("good") - words.count("bad") - 0.1 * len(words)

def batched_score(prompts, completions):
    return [score(p, c) for p, c in zip(prompts, completions)]
batched_score.batched = True

def prefer_shorter(prompt, a, b):
    if len(a) == len(b):
        return None
    return len(a) < len(b)

def numeric_judge(prompt, a, b):
    return 1 if "good" in a else 0

def broken(prompt, completion):
    return "not a number"
'''


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from prefopt.models.tiny import build_tiny_model, train_tiny_tokenizer

    root = tmp_path_factory.mktemp("reward")
    policy = build_tiny_model(root / "policy")
    from transformers import AutoTokenizer

    policy_tokenizer = AutoTokenizer.from_pretrained(policy)
    reference = build_tiny_model(root / "reference", tokenizer=policy_tokenizer, seed=1)
    rm_tokenizer = train_tiny_tokenizer(corpus=RM_CORPUS, vocab_size=300)
    rm_tokenizer.chat_template = RM_TEMPLATE
    rm_tokenizer.save_pretrained(root / "rm_tokenizer")
    reward_model = build_tiny_reward_model(root / "rm", root / "rm_tokenizer")
    return {"policy": policy, "reference": reference, "rm": reward_model}


@pytest.fixture()
def gold(tmp_path, monkeypatch):
    (tmp_path / "gold_reward.py").write_text(textwrap.dedent(GOLD_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "gold_reward"


# --- function, judge, penalties, normalisation --------------------------------------------------------------


def test_function_reward_plain_and_batched(gold):
    prompts, completions = ["p1", "p2", "p3"], ["good good", "bad", "good bad fine"]
    expected = torch.tensor([2 - 0.2, -1 - 0.1, 0 - 0.3])
    for name in ("score", "batched_score"):
        scorer = build_reward(RewardConfig(kind="function", function=f"{gold}:{name}"), device="cpu")
        scores = scorer.score(prompts, completions)
        assert scores.dtype == torch.float32 and scores.shape == (3,)
        torch.testing.assert_close(scores, expected)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_module_xyz:score", "cannot import module"),
        ("gold_reward:missing", "has no attribute"),
        ("gold_reward", "expected 'module:callable'"),
        (None, "expected 'module:callable'"),
    ],
)
def test_function_import_errors_name_the_key(gold, spec, message):
    with pytest.raises(ConfigError, match=rf"reward\.function: .*{message}"):
        build_reward(RewardConfig(kind="function", function=spec), device="cpu")


def test_function_returning_non_numbers_is_a_config_error(gold):
    scorer = build_reward(RewardConfig(kind="function", function=f"{gold}:broken"), device="cpu")
    with pytest.raises(ConfigError, match="must return numbers"):
        scorer.score(["p"], ["c"])


def test_judge_bool_int_and_ties(gold):
    judge = build_reward(RewardConfig(kind="judge", function=f"{gold}:prefer_shorter"), device="cpu")
    verdicts = judge.judge(["p"] * 3, ["ab", "abcd", "xy"], ["abc", "ab", "zw"])
    assert verdicts.tolist() == [1.0, 0.0, 1.0]  # a shorter, b shorter, tie -> a
    numeric = build_reward(RewardConfig(kind="judge", function=f"{gold}:numeric_judge"), device="cpu")
    assert numeric.judge(["p", "p"], ["good", "bad"], ["x", "y"]).tolist() == [1.0, 0.0]
    with pytest.raises(ConfigError, match="apply to scores"):
        build_reward(
            RewardConfig(kind="judge", function=f"{gold}:numeric_judge", normalize="batch"), device="cpu"
        )


def test_scorer_judge_orders_by_score(gold):
    judge = ScorerJudge(build_reward(RewardConfig(kind="function", function=f"{gold}:score"), device="cpu"))
    assert judge.judge(["p", "p", "p"], ["good", "bad", "x"], ["bad", "good", "y"]).tolist() == [
        1.0,
        0.0,
        1.0,
    ]


def test_missing_eos_penalty(gold):
    scorer = build_reward(
        RewardConfig(kind="function", function=f"{gold}:score", missing_eos_penalty=1.5), device="cpu"
    )
    plain = FunctionReward(lambda p, c: 1.0).score(["p"], ["c"])
    scores = scorer.score(["p", "p"], ["good", "good"], finished=torch.tensor([True, False]))
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.9 - 1.5]))
    assert plain.tolist() == [1.0]
    # without finished flags nothing is penalised
    torch.testing.assert_close(scorer.score(["p"], ["good"]), torch.tensor([0.9]))


def test_batch_and_running_normalisation():
    values = iter([torch.tensor([1.0, 2.0, 3.0, 6.0]), torch.tensor([10.0, -4.0])])

    class Fixed:
        def score(self, prompts, completions, *, prompt_messages=None, finished=None):
            return next(values)

    batch = ScoreTransform(FunctionReward(lambda p, c: float(c)), normalize="batch")
    scores = batch.score(["p"] * 4, ["1", "2", "3", "6"])
    assert abs(scores.mean().item()) < 1e-6 and abs(scores.std(unbiased=False).item() - 1) < 1e-5

    running = ScoreTransform(Fixed(), normalize="running")
    running.score([], [])
    second = running.score([], [])
    everything = torch.tensor([1.0, 2.0, 3.0, 6.0, 10.0, -4.0], dtype=torch.float64)
    assert running.running.count == 6
    assert abs(running.running.mean - everything.mean().item()) < 1e-12
    assert abs(running.running.std - everything.std(unbiased=False).item()) < 1e-12
    expected = (torch.tensor([10.0, -4.0], dtype=torch.float64) - everything.mean()) / everything.std(
        unbiased=False
    )
    torch.testing.assert_close(second, expected.float())
    state = running.running.state_dict()
    fresh = ScoreTransform(Fixed(), normalize="running")
    fresh.running.load_state_dict(state)
    assert fresh.running.state_dict() == state


def test_kind_none_and_token_level_validation(gold):
    assert build_reward(RewardConfig(kind="none"), device="cpu") is None
    with pytest.raises(ConfigError, match="reward.token_level"):
        build_reward(RewardConfig(kind="function", function=f"{gold}:score", token_level=True), device="cpu")
    with pytest.raises(ConfigError, match="reward.name_or_path"):
        build_reward(RewardConfig(kind="model"), device="cpu")
    with pytest.raises(ConfigError, match="reward.policy"):
        build_reward(RewardConfig(kind="implicit"), device="cpu")


# --- reward model with its own tokenizer --------------------------------------------------------------------


def test_model_reward_retokenises_with_its_own_tokenizer(dirs):
    from transformers import AutoTokenizer

    policy_tokenizer = AutoTokenizer.from_pretrained(dirs["policy"])
    scorer = build_reward(
        RewardConfig(kind="model", name_or_path=str(dirs["rm"]), batch_size=2),
        device="cpu",
        policy_tokenizer=policy_tokenizer,
    )
    assert isinstance(scorer, ModelReward)
    seen: list[torch.Tensor] = []
    scorer.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"]), with_kwargs=True
    )
    messages = json.dumps([{"role": "user", "content": "rate this reply"}])
    policy_prompt = policy_tokenizer.apply_chat_template(
        json.loads(messages), tokenize=False, add_generation_prompt=True
    )
    prompts = [policy_prompt, "plain prompt: ", "x"]
    completions = ["good answer", "fine", "bad"]
    scores = scorer.score(prompts, completions, prompt_messages=[messages, "", ""])
    assert scores.shape == (3,) and scores.dtype == torch.float32

    rows = [row for batch in seen for row in batch.tolist()]
    first = [t for t in rows[0] if t != scorer.pad_id]
    expected_text = "### user: rate this reply\n### assistant: good answer\n"
    assert first == scorer.tokenizer(expected_text, add_special_tokens=False)["input_ids"]
    assert scorer.tokenizer.decode(first) == expected_text
    assert first != policy_tokenizer(expected_text)["input_ids"]  # different vocabulary
    second = [t for t in rows[1] if t != scorer.pad_id]
    assert scorer.tokenizer.decode(second) == "plain prompt: fine"  # no messages: prompt + completion

    # padding and batch composition do not change a score
    alone = torch.cat(
        [
            scorer.score([p], [c], prompt_messages=[m])
            for p, c, m in zip(prompts, completions, [messages, "", ""])
        ]
    )
    torch.testing.assert_close(scores, alone, rtol=1e-5, atol=1e-6)


def test_model_reward_keeps_the_end_when_truncating(dirs):
    scorer = ModelReward(str(dirs["rm"]), device="cpu", max_length=4)
    full = scorer.tokenizer("a long prompt that goes on and on" + " good answer")["input_ids"]
    assert scorer.encode("a long prompt that goes on and on", " good answer", None) == full[-4:]


def test_causal_lm_is_not_a_reward_model(dirs):
    with pytest.raises(ConfigError, match="no trained reward head"):
        ModelReward(str(dirs["policy"]), device="cpu")
    with pytest.raises(ConfigError, match="does not exist"):
        ModelReward("/no/such/reward/model", device="cpu")


# --- implicit reward ----------------------------------------------------------------------------------------


def _independent_logp(model, prompt_ids, completion_ids):
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logps = torch.log_softmax(logits, -1)
    start = len(prompt_ids)
    return torch.stack([logps[t - 1, ids[0, t]] for t in range(start, ids.shape[1])])


def test_implicit_reward_matches_independent_computation(dirs):
    cfg = RewardConfig(
        kind="implicit", policy=str(dirs["policy"]), reference=str(dirs["reference"]), beta=0.3, batch_size=2
    )
    scorer = build_reward(cfg, device="cpu")
    assert isinstance(scorer, ImplicitReward)
    prompts = ["hello world", "The quick brown fox", "Question: what is two plus three?"]
    completions = [" jumps over", " the lazy dog. A review", " five"]
    finished = torch.tensor([True, False, True])
    scores = scorer.score(prompts, completions, finished=finished)
    tokens = scorer.token_rewards(prompts, completions, finished=finished)

    tok = scorer.tokenizer
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        prompt_ids = tok(prompt)["input_ids"]
        completion_ids = tok(completion, add_special_tokens=False)["input_ids"] + (
            [tok.eos_token_id] if finished[i] else []
        )
        per_token = 0.3 * (
            _independent_logp(scorer.policy, prompt_ids, completion_ids)
            - _independent_logp(scorer.reference, prompt_ids, completion_ids)
        )
        assert abs(scores[i].item() - per_token.sum().item()) < 1e-4
        torch.testing.assert_close(tokens[i, : len(completion_ids)].double(), per_token, rtol=1e-4, atol=1e-5)
        assert torch.all(tokens[i, len(completion_ids) :] == 0)
    assert tokens.shape[1] == max(
        len(tok(c, add_special_tokens=False)["input_ids"]) + int(f)
        for c, f in zip(completions, finished.tolist())
    )
    torch.testing.assert_close(tokens.sum(1), scores, rtol=1e-5, atol=1e-5)


def test_implicit_reward_is_zero_when_policy_is_reference(dirs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy = AutoModelForCausalLM.from_pretrained(dirs["policy"])
    scorer = ImplicitReward(
        policy,
        AutoModelForCausalLM.from_pretrained(dirs["policy"]),
        AutoTokenizer.from_pretrained(dirs["policy"]),
        beta=0.1,
    )
    assert torch.all(scorer.score(["hello"], [" world"]) == 0)
    # the ids path agrees with the text path
    ids = torch.tensor([[5, 6, 7, 8, 3]])
    rewards, mask = scorer.token_rewards_ids(ids, torch.ones_like(ids), torch.tensor([[0, 0, 1, 1, 1]]))
    assert rewards.shape == (1, 4) and mask.tolist() == [[0, 1, 1, 1]]


def test_tiny_reward_model_has_pad_and_one_label(dirs):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(dirs["rm"])
    assert config.num_labels == 1 and config.pad_token_id is not None
