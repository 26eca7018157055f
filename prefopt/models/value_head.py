"""The PPO critic used by RTO: a transformer backbone with a scalar value head, one value per token.

``load_critic(reward_model_path, policy_path=..., dtype=...)`` initialises backbone *and* head from a one-label
sequence-classification reward model (RTO: "critic initialised from the reward model"; the reward head becomes the
value head, so at step 0 the value at a sequence's last token is the reward model's score). Without a reward model
the backbone is the policy's (its lm head dropped) and the head starts at zero. A directory written by
:meth:`ValueModel.save` loads back as it was.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from prefopt.errors import ConfigError

CRITIC_WEIGHTS = "critic.safetensors"
CRITIC_META = "critic.json"


def _hidden_size(config) -> int:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text_config.hidden_size)


def _gathered(parameters: list):
    """Full tensors for the block: a reward model loaded under ZeRO-3's ``zero.Init`` holds empty partitions
    (``ds_id`` marks them; ``deepspeed.zero.GatheredParameters`` gathers them), anything else is used as it is."""
    partitioned = [p for p in parameters if p is not None and hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


class ValueModel(nn.Module):
    """``forward(input_ids, attention_mask) -> values [B, T]`` (float32). The head runs in fp32 on the backbone's
    last hidden states, whatever the backbone's dtype."""

    def __init__(self, backbone: nn.Module, head: nn.Linear | None = None):
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        self.value_head = nn.Linear(_hidden_size(backbone.config), 1, bias=True, dtype=torch.float32)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        if head is not None:
            if head.out_features != 1:
                raise ValueError(f"value head must have one output, got {head.out_features}")
            with torch.no_grad(), _gathered([head.weight, head.bias]):
                self.value_head.weight.copy_(head.weight.float())
                if head.bias is not None:
                    self.value_head.bias.copy_(head.bias.float())

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        outputs = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
        hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
        return self.value_head(hidden.float()).squeeze(-1)

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.backbone.gradient_checkpointing_enable(**kwargs)

    def save(self, directory) -> Path:
        """``config.json`` of the backbone, ``critic.safetensors`` (backbone + head), ``critic.json``."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.backbone.config.save_pretrained(out)
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        save_file(state, str(out / CRITIC_WEIGHTS), metadata={"format": "pt"})
        (out / CRITIC_META).write_text(json.dumps({"kind": "prefopt-value-model", "weights": CRITIC_WEIGHTS}))
        return out


def _backbone_of(model: nn.Module) -> nn.Module:
    prefix = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, prefix, None) if prefix else None
    if backbone is None:
        raise ConfigError(f"ppo.critic: cannot find the transformer body of {type(model).__name__}")
    return backbone


def _reward_head_of(model: nn.Module) -> nn.Linear:
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear) and head.out_features == 1:
            return head
    raise ConfigError(
        f"ppo.critic: {type(model).__name__} has no one-output linear reward head (score/classifier)"
    )


def load_critic(
    path_or_none: str | None, *, policy_path: str, dtype="float32", trust_remote_code: bool = False
) -> ValueModel:
    """A critic from a saved critic directory, a reward model (backbone and head), or the policy (zero head)."""
    from transformers import AutoConfig, AutoModel

    from prefopt.models.loading import resolve_dtype

    torch_dtype = resolve_dtype(dtype) if isinstance(dtype, str) else dtype
    if path_or_none is not None and (Path(path_or_none) / CRITIC_WEIGHTS).exists():
        from safetensors.torch import load_file

        config = AutoConfig.from_pretrained(path_or_none, trust_remote_code=trust_remote_code)
        backbone = AutoModel.from_config(config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        critic = ValueModel(backbone)
        critic.load_state_dict(load_file(str(Path(path_or_none) / CRITIC_WEIGHTS)))
        return critic
    if path_or_none is not None:
        from prefopt.models.reward import load_reward_model

        reward_model = load_reward_model(
            path_or_none,
            dtype=dtype if isinstance(dtype, str) else "float32",
            trust_remote_code=trust_remote_code,
            key="ppo.critic",
        )
        reward_model.to(torch_dtype)
        critic = ValueModel(_backbone_of(reward_model), head=_reward_head_of(reward_model))
    else:
        try:
            backbone = AutoModel.from_pretrained(
                policy_path, dtype=torch_dtype, trust_remote_code=trust_remote_code, use_safetensors=True
            )
        except OSError as error:
            raise ConfigError(
                f"model.name_or_path: cannot load the critic's backbone from '{policy_path}': {error}"
            ) from None
        critic = ValueModel(backbone)
    from prefopt.models.loading import disable_dropout

    disable_dropout(critic)
    critic.train().requires_grad_(True)
    return critic
