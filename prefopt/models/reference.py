"""The reference policy behind one interface, in four modes (``reference.mode``).

``model``        a frozen copy loaded from ``reference.name_or_path`` (default: the policy's starting checkpoint).
``adapter``      with LoRA, the policy itself with its adapters disabled: no second copy in memory.
``precomputed``  one pass before training computes reference logps for every pair and caches them on disk, keyed by
                 a hash of the reference weights, the data and every tokenization setting; the model is then freed.
``none``         reference-free losses (SimPO, SFT, reward-model training).

Every mode returns the same numbers for the same rows, so they give the same training losses (tested).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load_file, save_file

from prefopt.models.logps import TokenLogps, completion_token_logps, sequence_totals

logger = logging.getLogger(__name__)


class Reference:
    """Base: ``pair_logps(batch)`` -> (chosen [B], rejected [B]); ``token_logps(...)`` for online samples."""

    mode = "none"
    supports_online = False

    def pair_logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logps = self.token_logps(batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                                 position_ids=batch.get("position_ids"), attention_bias=batch.get("attention_bias"))
        sums, _ = sequence_totals(logps, batch)
        half = sums.shape[0] // 2
        return sums[:half], sums[half:]

    def token_logps(self, input_ids, attention_mask, completion_mask, **kwargs) -> TokenLogps:
        raise NotImplementedError(f"reference mode '{self.mode}' cannot score new sequences")


class NoReference(Reference):
    mode = "none"

    def pair_logps(self, batch):  # pragma: no cover - the trainer never asks
        raise RuntimeError("this loss runs without a reference model")


class ModelReference(Reference):
    mode = "model"
    supports_online = True

    def __init__(self, model: torch.nn.Module, chunk_size: Optional[int], share_prompt: bool = False):
        self.model = model
        self.chunk_size = chunk_size
        self.share_prompt = share_prompt  # pair batches: each prompt through the decoder once (prefix_sharing.py)

    @torch.no_grad()
    def token_logps(self, input_ids, attention_mask, completion_mask, **kwargs) -> TokenLogps:
        kwargs.setdefault("share_prompt", self.share_prompt)
        return completion_token_logps(self.model, input_ids, attention_mask, completion_mask,
                                      chunk_size=self.chunk_size, **kwargs)


class AdapterReference(Reference):
    """The LoRA policy with adapters switched off for the duration of the forward."""

    mode = "adapter"
    supports_online = True

    def __init__(self, get_peft_model: Callable[[], torch.nn.Module], chunk_size: Optional[int],
                 share_prompt: bool = False):
        self._get_peft_model = get_peft_model  # unwrapped lazily: accelerate may rewrap the policy after setup
        self.chunk_size = chunk_size
        self.share_prompt = share_prompt

    @torch.no_grad()
    def token_logps(self, input_ids, attention_mask, completion_mask, **kwargs) -> TokenLogps:
        kwargs.setdefault("share_prompt", self.share_prompt)
        peft_model = self._get_peft_model()
        with peft_model.disable_adapter():
            return completion_token_logps(peft_model, input_ids, attention_mask, completion_mask,
                                          chunk_size=self.chunk_size, **kwargs)


class PrecomputedReference(Reference):
    """Looks reference logps up by dataset row ``index``; one table per split."""

    mode = "precomputed"

    def __init__(self, tables: dict[str, dict[str, torch.Tensor]]):
        self.tables = tables  # split -> {"chosen": [N], "rejected": [N]}
        self.split = "train"

    @contextlib.contextmanager
    def use_split(self, split: str):
        previous, self.split = self.split, split
        try:
            yield self
        finally:
            self.split = previous

    def pair_logps(self, batch):
        table = self.tables[self.split]
        index = batch["index"].to("cpu")
        device = batch["input_ids"].device
        return table["chosen"][index].to(device), table["rejected"][index].to(device)


def cache_key(reference_identity: str, data_fingerprint: str, dtype: str, chunk: Optional[int]) -> str:
    text = "|".join([reference_identity, data_fingerprint, dtype, "v1"])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def precompute_table(
    reference: Reference,
    dataset,
    collator,
    *,
    cache_file: Path,
    accelerator,
    batch_size: int,
    progress: Optional[Callable[[int], None]] = None,
) -> dict[str, torch.Tensor]:
    """Compute (or load) reference pair logps for every row of ``dataset``; every rank ends with the full table.

    Ranks split the rows (rank r takes rows r, r+W, ...), then gather. Rank 0 writes the cache atomically.
    """
    if cache_file.is_file():
        logger.info("reference logps loaded from cache %s", cache_file)
        return load_file(str(cache_file))
    total = len(dataset)
    own = list(range(accelerator.process_index, total, accelerator.num_processes))
    chosen = torch.zeros(total, dtype=torch.float64)
    rejected = torch.zeros(total, dtype=torch.float64)
    for start in range(0, len(own), batch_size):
        rows = own[start:start + batch_size]
        batch = collator([dataset[i] for i in rows])
        batch = {k: (v.to(accelerator.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        c, r = reference.pair_logps(batch)
        chosen[rows] = c.double().cpu()
        rejected[rows] = r.double().cpu()
        if progress is not None:
            progress(len(rows))
    if accelerator.num_processes > 1:
        # Each row was computed by exactly one rank and is zero elsewhere: a sum-reduce assembles the table.
        stacked = torch.stack([chosen, rejected]).to(accelerator.device)
        stacked = accelerator.reduce(stacked, reduction="sum").cpu()
        chosen, rejected = stacked[0], stacked[1]
    table = {"chosen": chosen.float(), "rejected": rejected.float()}
    if accelerator.is_main_process:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        save_file(table, str(tmp))
        tmp.replace(cache_file)
    accelerator.wait_for_everyone()
    return table
