"""Per-completion scores for losses that need them (CoPG), from the reward layer, before training.

When the loss's step is ``scored_pairs`` and the recipe has a ``reward`` section, every pair of ``data.train``
/
``data.eval`` that carries no ``chosen_score`` / ``rejected_score`` is scored once by the reward layer (a
reward
model, a reward function or an implicit reward; scores the row already has are kept) and written to
``<output_dir>/../.prefopt_cache/scored-<hash>.jsonl``, keyed by the data bytes, the reward section and the
row
options; later runs reuse it. The run then reads that file instead. Rank 0 scores; the others wait and reuse
it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)
SCORE_FORMAT_VERSION = "1"


def _cache_key(config, source) -> str:
    from prefopt.models.loading import model_identity

    reward = config.reward.model_dump(mode="json")
    if config.reward.name_or_path:
        reward["identity"] = model_identity(config.reward.name_or_path)
    payload = json.dumps(
        {
            "v": SCORE_FORMAT_VERSION,
            "data": source.content_hash(),
            "reward": reward,
            "format": config.data.format,
            "rated_pairs": config.data.rated_pairs,
            "rated_min_gap": config.data.rated_min_gap,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def _score_file(config, source, cache_file: Path, batch_size: int = 256) -> None:
    from prefopt.data.formats import NormalizeOptions
    from prefopt.data.sources import load_rows, raise_for_invalid

    result = load_rows(
        source, config.data.format, NormalizeOptions(config.data.rated_pairs, config.data.rated_min_gap)
    )
    if config.data.on_invalid == "error":
        raise_for_invalid(result)
    rows, todo = [], []  # todo: (row index, side, prompt text, messages json, completion)
    for location, normal in result.rows:
        conversational = isinstance(normal.prompt, list)
        for pair in normal.pairs:
            row = {
                "prompt": normal.prompt,
                "chosen": pair.chosen,
                "rejected": pair.rejected,
                "chosen_score": pair.chosen_score,
                "rejected_score": pair.rejected_score,
                "source": location,
            }
            if conversational:
                row["chosen"] = [{"role": "assistant", "content": pair.chosen}]
                row["rejected"] = [{"role": "assistant", "content": pair.rejected}]
            if pair.chosen_score is None:
                for side, text in (("chosen", pair.chosen), ("rejected", pair.rejected)):
                    todo.append(
                        (
                            len(rows),
                            side,
                            "" if conversational else normal.prompt,
                            json.dumps(normal.prompt) if conversational else "",
                            text,
                        )
                    )
            rows.append(row)
    # The scorer is built only when a row lacks scores: pairs that carry theirs (a DNO iteration's, scored by
    # a pairwise judge) need no scorer, whatever reward.kind is.
    scorer = _scorer(config) if todo else None
    for start in range(0, len(todo), batch_size):
        block = todo[start : start + batch_size]
        messages = [m for _, _, _, m, _ in block]
        values = scorer.score(
            [p for _, _, p, _, _ in block],
            [c for *_, c in block],
            prompt_messages=messages if any(messages) else None,
        ).tolist()
        for (index, side, *_), value in zip(block, values):
            rows[index][f"{side}_score"] = float(value)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    tmp.replace(cache_file)
    logger.info(
        "scored %d completions of %s with reward.kind=%s -> %s",
        len(todo),
        source.name,
        config.reward.kind,
        cache_file,
    )


def _scorer(config):
    import torch

    from prefopt.models.loading import load_tokenizer
    from prefopt.models.reward import build_reward

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scorer = build_reward(
        config.reward,
        device=device,
        policy_tokenizer=load_tokenizer(config.model.name_or_path, revision=config.model.revision),
    )
    if not hasattr(scorer, "score"):
        from prefopt.errors import ConfigError

        raise ConfigError(
            "reward.kind: scoring pairs for this loss needs a scorer (model, function or implicit), "
            "not a pairwise judge"
        )
    return scorer


def with_scored_pairs(config):
    """``config`` reading reward-scored copies of its pair files (unchanged when ``reward.kind`` is none)."""
    from accelerate import PartialState

    from prefopt.data.sources import Source

    if config.reward.kind == "none":
        return config
    cache_dir = Path(config.reference.cache_dir or Path(config.output_dir).parent / ".prefopt_cache")
    update = {}
    state = PartialState()
    sources = {"train": Source(config.data.train, config.data.split)}
    if config.data.eval:
        sources["eval"] = Source(config.data.eval, config.data.eval_split or config.data.split)
    elif config.data.eval_split:
        sources["eval"] = Source(config.data.train, config.data.eval_split)
    for key, source in sources.items():
        cache_file = cache_dir / f"scored-{_cache_key(config, source)}.jsonl"
        with state.main_process_first():
            if state.is_main_process and not cache_file.is_file():
                _score_file(config, source, cache_file)
        update[key] = str(cache_file)
    update.update(format="auto", eval_split=None)
    return config.model_copy(update={"data": config.data.model_copy(update=update)})
