"""What the ``ppo`` step needs beyond a policy: the critic, the frozen DPO policy (RTO), and the lineage checks."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from prefopt.config import Config
from prefopt.errors import ConfigError
from prefopt.models.loading import load_frozen_causal_lm, load_tokenizer
from prefopt.models.logps import completion_token_logps

logger = logging.getLogger(__name__)


def critic_source(config: Config):
    """``ppo.critic``, else the reward model (RTO initialises the critic from it), else None (policy backbone)."""
    if config.ppo.critic:
        return config.ppo.critic
    if config.reward.kind == "model":
        return config.reward.name_or_path
    return None


def check_critic_tokenizer(config: Config, tokenizer) -> None:
    """The critic reads the policy's token ids, so its source must share the policy's tokenizer (exit 2 if not)."""
    source = critic_source(config)
    if source is None or Path(source).resolve() == Path(config.model.name_or_path).resolve():
        return
    key = "ppo.critic" if config.ppo.critic else "reward.name_or_path"
    try:
        other = load_tokenizer(source, key=key, trust_remote_code=config.reward.trust_remote_code)
    except ConfigError:
        from prefopt.models.value_head import CRITIC_WEIGHTS

        if (Path(source) / CRITIC_WEIGHTS).is_file():  # a saved prefopt critic carries no tokenizer
            logger.warning(
                "ppo.critic: cannot verify that the critic '%s' shares the policy's tokenizer (no "
                "tokenizer files beside it); it reads the policy's token ids",
                source,
            )
            return
        raise
    if other.get_vocab() != tokenizer.get_vocab() or other.eos_token_id != tokenizer.eos_token_id:
        raise ConfigError(
            f"{key}: the critic is initialised from '{source}', whose tokenizer differs from the policy "
            f"'{config.model.name_or_path}', but it reads the policy's token ids; set ppo.critic to a model "
            f"with the policy's tokenizer (e.g. ppo.critic={config.model.name_or_path}: a fresh value head)"
        )


def build_critic(config: Config) -> torch.nn.Module:
    from prefopt.models.loading import resolve_dtype
    from prefopt.models.value_head import load_critic

    return load_critic(
        critic_source(config), policy_path=config.model.name_or_path, dtype=resolve_dtype(config.model.dtype)
    )


def _run_config(model_path: str) -> dict | None:
    """The prefopt config.yaml of the run that produced ``model_path`` (``<run>/final``), if there is one."""
    path = Path(model_path)
    for candidate in (path / "config.yaml", path.parent / "config.yaml"):
        if candidate.is_file():
            try:
                return yaml.safe_load(candidate.read_text())
            except yaml.YAMLError:
                return None
    return None


def check_rto_lineage(config: Config, tokenizer) -> None:
    """The DPO policy, the reference and the policy must share a tokenizer (error otherwise); the DPO policy
    should be trained from the same SFT model that is the PPO reference (warning when it is not, or unknown)."""
    dpo_path = config.ppo.dpo_policy or config.ppo.dpo_adapter
    if dpo_path is None:
        return
    reference_path = config.reference.name_or_path or config.model.name_or_path
    vocab = tokenizer.get_vocab()
    for key, path in (("ppo.dpo_policy", config.ppo.dpo_policy), ("reference.name_or_path", reference_path)):
        if path is None:
            continue
        other = load_tokenizer(path, key=key)
        if other.get_vocab() != vocab or other.eos_token_id != tokenizer.eos_token_id:
            raise ConfigError(
                f"{key}: '{path}' has a different tokenizer from the policy "
                f"'{config.model.name_or_path}'; RTO's token rewards need one shared tokenizer"
            )
    run = _run_config(dpo_path)
    if run is None:
        logger.warning(
            "RTO: cannot verify that the DPO policy '%s' was trained from the reference '%s' "
            "(no prefopt config.yaml beside it); the token reward assumes it was",
            dpo_path,
            reference_path,
        )
        return
    dpo_base = (run.get("model") or {}).get("name_or_path")
    if dpo_base is None or Path(str(dpo_base)).resolve() != Path(reference_path).resolve():
        logger.warning(
            "RTO: the DPO policy '%s' was trained from '%s', but the PPO reference is '%s'; the token "
            "reward log(pi_dpo/pi_ref) is only meaningful when they are the same SFT model",
            dpo_path,
            dpo_base,
            reference_path,
        )


def dpo_scorer(config: Config, policy_module, accelerator) -> Callable:
    """A no-grad function returning the DPO policy's per-token logps ``[N, L-1]`` for RTO's token reward
    (``ppo.dpo_adapter`` on the LoRA policy, or the frozen model ``ppo.dpo_policy``; the config checks that one of
    them is set when the loss needs ``"dpo_policy"``)."""
    chunk = config.train.logps_chunk_size
    if config.ppo.dpo_adapter:
        peft_model = policy_module.model
        if not hasattr(peft_model, "load_adapter"):
            raise ConfigError("ppo.dpo_adapter needs a LoRA policy (model.peft) to host the second adapter")
        peft_model.load_adapter(config.ppo.dpo_adapter, adapter_name="dpo", is_trainable=False)

        @torch.no_grad()
        def adapter_logps(input_ids, attention_mask, completion_mask):
            live = (
                accelerator.unwrap_model(policy_module).model
                if hasattr(policy_module, "model")
                else peft_model
            )
            live.set_adapter("dpo")
            try:
                with accelerator.autocast():  # as the reference runs: the token reward compares the two
                    return completion_token_logps(
                        live, input_ids, attention_mask, completion_mask, chunk_size=chunk
                    ).token_logps
            finally:
                live.set_adapter("default")  # also restores requires_grad on the trained adapter

        return adapter_logps
    if config.ppo.dpo_policy:
        from prefopt.trainer.distributed import frozen_module, prepare_frozen

        # ZeRO-3: loaded under zero.Init (empty partitions), so it gets its own engine, like the reference (FSDP2:
        # sharded like it); the engine stays referenced here for its hooks, the calls go to its module. Under the
        # policy's autocast, as the reference runs: the token reward compares the two.
        engine = prepare_frozen(
            accelerator,
            load_frozen_causal_lm(config.ppo.dpo_policy, config.model, key="ppo.dpo_policy"),
            "the DPO policy",
        )
        model = frozen_module(engine)

        @torch.no_grad()
        def model_logps(input_ids, attention_mask, completion_mask):
            with accelerator.autocast():
                return completion_token_logps(
                    model, input_ids, attention_mask, completion_mask, chunk_size=chunk
                ).token_logps

        model_logps.engine = engine
        return model_logps
    raise ConfigError(
        "ppo.dpo_policy: the loss needs the stage-1 DPO model; set ppo.dpo_policy (or ppo.dpo_adapter)"
    )
