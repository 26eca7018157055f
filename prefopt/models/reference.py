"""The reference policy behind one interface, in four modes (``reference.mode``).

``model``        a frozen copy loaded from ``reference.name_or_path`` (default: the policy's starting checkpoint).
``adapter``      with LoRA, the policy itself with its adapters disabled: no second copy in memory.
``precomputed``  one pass before training computes reference logps for every pair and caches them on disk, keyed by
                 a hash of the reference weights, the data and every tokenization setting; the model is then freed.
``none``         reference-free losses (SimPO, SFT, reward-model training).
``synced``       ``model`` plus ``reference.sync_steps``: TR-DPO's reference, mixed with the policy every N steps
                 (``prefopt/models/reference_sync.py``); checkpointed with the run.

Every mode returns the same numbers for the same rows, so they give the same training losses (tested).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from prefopt.models.logps import TokenLogps, completion_token_logps, sequence_totals
from prefopt.models.pair_parts import pair_tail_sums

logger = logging.getLogger(__name__)


class Reference:
    """Base: ``pair_logps(batch)`` -> (chosen [B], rejected [B]); ``token_logps(...)`` for online samples."""

    mode = "none"
    supports_online = False

    def pair_logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logps = self.token_logps(
            batch["input_ids"],
            batch["attention_mask"],
            batch["completion_mask"],
            position_ids=batch.get("position_ids"),
            attention_bias=batch.get("attention_bias"),
        )
        sums, _ = sequence_totals(logps, batch)
        half = sums.shape[0] // 2
        return sums[:half], sums[half:]

    def pair_logps_and_tails(self, batch: dict) -> tuple[torch.Tensor, ...]:
        """(chosen, rejected, chosen tail, rejected tail) ``[B]`` each, from one forward: the tails are the sums
        past the pair's shared length (LD-DPO, ``prefopt/models/pair_parts.py``)."""
        logps = self.token_logps(
            batch["input_ids"],
            batch["attention_mask"],
            batch["completion_mask"],
            position_ids=batch.get("position_ids"),
            attention_bias=batch.get("attention_bias"),
        )
        sums, _ = sequence_totals(logps, batch)
        tails = pair_tail_sums(logps, batch)
        half = sums.shape[0] // 2
        return sums[:half], sums[half:], tails[:half], tails[half:]

    def group_logps(self, batch: dict, groups: int) -> torch.Tensor:
        """``[groups, B]`` sums for a batch whose ``input_ids`` stack ``groups`` row groups of B sequences (triples,
        SRPO's revision sequences); ``pair_logps`` is the first two groups."""
        logps = self.token_logps(
            batch["input_ids"],
            batch["attention_mask"],
            batch["completion_mask"],
            position_ids=batch.get("position_ids"),
            attention_bias=batch.get("attention_bias"),
        )
        sums, _ = sequence_totals(logps, batch)
        return sums.view(groups, -1)

    def token_logps(self, input_ids, attention_mask, completion_mask, **kwargs) -> TokenLogps:
        raise NotImplementedError(f"reference mode '{self.mode}' cannot score new sequences")

    # Hooks the trainer calls for every mode; only a reference that changes during training (TR-DPO's synced one,
    # prefopt/models/reference_sync.py) does anything in them.
    def check_policy(self, policy: torch.nn.Module) -> None:
        """Called once with the unwrapped policy model before training; raise ``ConfigError`` if it cannot work."""

    def after_optimizer_step(self, global_step: int, policy: torch.nn.Module) -> None:
        """Called after every optimizer step (``global_step`` counts them) with the unwrapped policy model."""

    def save_state(self, directory: Path) -> None:
        """Write what a resume needs into a checkpoint directory (main process only)."""

    def load_state(self, directory: Path) -> None:
        """Restore :meth:`save_state`'s files from a checkpoint directory (every process)."""


class NoReference(Reference):
    mode = "none"

    def pair_logps(self, batch):  # pragma: no cover - the trainer never asks
        raise RuntimeError("this loss runs without a reference model")


class ModelReference(Reference):
    mode = "model"
    supports_online = True

    def __init__(
        self,
        model: torch.nn.Module,
        chunk_size: Optional[int],
        autocast: Callable = contextlib.nullcontext,
        share_prompt: bool | str = False,
    ):
        # ``autocast``: the policy's mixed-precision context (``accelerator.autocast``); the policy runs under it
        # (accelerate wraps the prepared forward), so the reference must too, or DPO does not start at ln 2.
        self.autocast = autocast
        # A DeepSpeed engine (ZeRO-3 frozen model) is kept alive for its parameter hooks; calls go to its module,
        # whose submodules carry the hooks that gather each layer's partitions.
        self.engine = model
        self.model = getattr(model, "module", model)
        self.chunk_size = chunk_size
        self.share_prompt = (
            share_prompt  # pair batches: each prompt through the decoder once (prefix_sharing.py)
        )

    @torch.no_grad()
    def token_logps(self, input_ids, attention_mask, completion_mask, **kwargs) -> TokenLogps:
        kwargs.setdefault("share_prompt", self.share_prompt)
        with self.autocast():
            return completion_token_logps(
                self.model, input_ids, attention_mask, completion_mask, chunk_size=self.chunk_size, **kwargs
            )


class AdapterReference(Reference):
    """The LoRA policy with adapters switched off for the duration of the forward."""

    mode = "adapter"
    supports_online = True

    def __init__(
        self,
        get_peft_model: Callable[[], torch.nn.Module],
        chunk_size: Optional[int],
        autocast: Callable = contextlib.nullcontext,
        share_prompt: bool | str = False,
        get_sharded_root: Optional[Callable[[], Optional[torch.nn.Module]]] = None,
    ):
        # FSDP2: the prepared policy (the FSDP root). Its forward is the logps forward of the same model; the PEFT
        # model inside it is not a root, and calling it directly leaves the root's groups sharded and lets an
        # inner layer claim to be FSDP's root (prefopt/generation/fsdp.py).
        self._get_sharded_root = get_sharded_root
        self._get_peft_model = (
            get_peft_model  # unwrapped lazily: accelerate may rewrap the policy after setup
        )
        self.chunk_size = chunk_size
        self.autocast = autocast  # the unwrapped model runs outside accelerate's autocast wrapper
        self.share_prompt = (
            share_prompt  # pair batches: each prompt through the decoder once (prefix_sharing.py)
        )

    @torch.no_grad()
    def token_logps(self, input_ids, attention_mask, completion_mask, **kwargs) -> TokenLogps:
        kwargs.setdefault("share_prompt", self.share_prompt)
        peft_model = self._get_peft_model()
        root = self._get_sharded_root() if self._get_sharded_root is not None else None
        if root is not None:
            with peft_model.disable_adapter(), self.autocast():
                return root(input_ids, attention_mask, completion_mask, **kwargs)
        with peft_model.disable_adapter(), self.autocast():
            return completion_token_logps(
                peft_model, input_ids, attention_mask, completion_mask, chunk_size=self.chunk_size, **kwargs
            )


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

    def pair_logps_and_tails(self, batch):
        table = self.tables[self.split]
        if "chosen_tail" not in table:  # the trainer asks for tails only when it precomputed them
            raise RuntimeError("the precomputed reference table has no LD-DPO tails")
        index = batch["index"].to("cpu")
        device = batch["input_ids"].device
        return tuple(
            table[key][index].to(device) for key in ("chosen", "rejected", "chosen_tail", "rejected_tail")
        )

    def group_logps(self, batch, groups):
        table = self.tables[self.split]
        if groups == 2:
            return torch.stack(self.pair_logps(batch))
        index = batch["index"].to("cpu")
        return table["groups"][index].T.to(batch["input_ids"].device)


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
    tails: bool = False,
) -> dict[str, torch.Tensor]:
    """Compute (or load) reference pair logps for every row of ``dataset``; every rank ends with the full table.

    Ranks split the rows (rank r takes rows r, r+W, ...), then gather. Rank 0 writes the cache atomically.
    ``tails``: also the LD-DPO tails of each pair (``chosen_tail``/``rejected_tail``; the cache key must say so).
    """
    if cache_file.is_file():
        logger.info("reference logps loaded from cache %s", cache_file)
        return load_file(str(cache_file))
    total = len(dataset)
    own = list(range(accelerator.process_index, total, accelerator.num_processes))
    # SRPO caches all six sequences of a pair, triples all three, unpaired rows their one completion
    groups = getattr(collator, "groups", 2)
    rows_cached = 4 if tails else groups  # pairs with tails: chosen, rejected, chosen tail, rejected tail
    values = torch.zeros(rows_cached, total, dtype=torch.float64)
    # Every rank runs the same number of forwards (a rank with fewer rows repeats its first batch and drops the
    # result): a ZeRO-3 reference gathers each layer's partitions collectively, and one rank short would hang all.
    per_rank = math.ceil(total / accelerator.num_processes)
    for start in range(0, per_rank, batch_size):
        rows = own[start : start + batch_size]
        batch = collator([dataset[i] for i in (rows or own[:batch_size] or [0])])
        batch = {k: (v.to(accelerator.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        if tails:
            computed = torch.stack(reference.pair_logps_and_tails(batch)).double().cpu()
        elif groups == 2:
            computed = torch.stack(reference.pair_logps(batch)).double().cpu()
        else:
            computed = reference.group_logps(batch, groups).double().cpu()
        if not rows:
            continue
        values[:, rows] = computed
        if progress is not None:
            progress(len(rows))
    if accelerator.num_processes > 1:
        # Each row was computed by exactly one rank and is zero elsewhere: a sum-reduce assembles the table.
        values = accelerator.reduce(values.to(accelerator.device), reduction="sum").cpu()
    table = {"chosen": values[0].float()}  # unpaired rows (groups == 1): the row's own completion
    if rows_cached >= 2:
        table["rejected"] = values[1].float()
    if tails:
        table.update(chosen_tail=values[2].float(), rejected_tail=values[3].float())
    elif groups != 2:
        table["groups"] = values.T.float().contiguous()  # [N, groups]
    if accelerator.is_main_process:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        save_file(table, str(tmp))
        tmp.replace(cache_file)
    accelerator.wait_for_everyone()
    return table
