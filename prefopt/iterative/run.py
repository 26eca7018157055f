"""DNO / DNO-Prct: iterations of sampling, judging, pair building and one-epoch DPO against the previous
iterate.

Rosset et al. 2024, "Direct Nash Optimization: Teaching Language Models to Self-Improve with General
Preferences" (arXiv 2404.03715), Alg. 2 (the practical version). ``prefopt train RECIPE`` with an
``iterations:``
section (``iterations.count = T > 0``) runs, for t = 1..T, with pi_1 the recipe's model:

1. the prompts of iteration t (``iterations.partition``: a disjoint 1/T share, as the paper splits
UltraFeedback);
2. K = ``iterations.samples_per_prompt`` samples per prompt from pi_t (the recipe's ``generation`` section),
plus
   the row's gold answer when ``iterations.include_gold`` and the row has one (sft / pair / rated rows);
3. scores: ``reward.kind`` model / function / implicit score each candidate; ``judge`` ranks them by pairwise
   win-rate (a judge must return probabilities: anything else stops the run with exit 2);
4. the large-margin pairs (:func:`prefopt.iterative.pairs.large_margin_pairs`) plus replayed pairs of earlier
   iterations (``iterations.replay``: fractions for t-1, t-2, ...);
5. the recipe's pairwise loss (DPO: ``loss.beta`` is the paper's eta) for at most one epoch, from pi_t **with
   pi_t as the reference** (refreshed every iteration), giving pi_{t+1}.

Each iteration keeps ``iteration-<t>/samples.jsonl`` (candidates and scores), ``pairs_new.jsonl``,
``pairs.jsonl``
(what it trained on) and ``run/`` (a normal run directory with ``final/``). ``iterations.json`` records
finished
iterations: rerun with ``train.resume_from=latest`` to continue after the last finished one.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from prefopt.errors import ConfigError
from prefopt.iterative.pairs import Candidate, large_margin_pairs, repeated_ngram_share, replay
from prefopt.iterative.scoring import judge_win_rates

logger = logging.getLogger(__name__)
STATE_FILE = "iterations.json"


@dataclass
class IterationsResult:
    """What ``prefopt train`` reports (the fields the CLI summary reads, like ``TrainResult``)."""

    output_dir: Path
    final_dir: Optional[Path]
    global_step: int
    last_metrics: dict = field(default_factory=dict)
    eval_metrics: dict = field(default_factory=dict)
    iterations: list[dict] = field(default_factory=list)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    tmp.replace(path)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _load_state(out: Path, config) -> dict:
    path = out / STATE_FILE
    if not path.is_file():
        return {"completed": []}
    if config.train.resume_from is None and not config.overwrite_output_dir:
        raise ConfigError(
            f"output_dir: '{out}' already holds iterations ({STATE_FILE}); set train.resume_from=latest "
            "to continue after the last finished one, overwrite_output_dir=true to start over, or "
            "choose another output_dir"
        )
    if config.overwrite_output_dir and config.train.resume_from is None:
        return {"completed": []}
    return json.loads(path.read_text())


def _prompt_rows(config, path: Optional[str] = None, key: str = "iterations.prompts") -> list:
    """``(location, prompt, gold answer or None)`` of every valid row of ``iterations.prompts`` (or ``path``)."""
    from prefopt.data.sources import Source, load_rows, raise_for_invalid
    from prefopt.errors import DataError

    source = Source(path or config.iterations.prompts, config.data.split)
    result = load_rows(source, "auto")
    if config.data.on_invalid == "error":
        raise_for_invalid(result)
    if not result.rows:
        raise DataError(f"{key}: no usable rows in {source.name}")
    return [(location, row.prompt, row.completion) for location, row in result.rows]


def _partition(rows: list, t: int, count: int, partition: bool, seed: int) -> list:
    if not partition:
        return rows
    order = list(range(len(rows)))
    random.Random(f"dno-partition-{seed}").shuffle(order)
    share = [rows[i] for k, i in enumerate(order) if k % count == t - 1]
    if not share:
        raise ConfigError(
            f"iterations.partition: {len(rows)} prompts cannot give each of {count} iterations its own "
            "share; use fewer iterations, more prompts, or iterations.partition=false"
        )
    return share


def _generate(config, policy_path: str, prompts: list, n: int, seed: int, prompts_file: Path):
    """``n`` samples per prompt from the model at ``policy_path`` (the recipe's ``generation`` section).

    Returns the prompts' texts and chat messages as training tokenizes them, and per prompt its samples and
    whether each ended with EOS."""
    import torch

    from prefopt.config import DataConfig
    from prefopt.data import build_datasets
    from prefopt.generation import build_generator, sampling_from_config
    from prefopt.models.loading import load_frozen_causal_lm, load_tokenizer

    _write_jsonl(prompts_file, [{"prompt": prompt} for prompt in prompts])
    tokenizer = load_tokenizer(policy_path)
    data_cfg = DataConfig(
        train=str(prompts_file),
        shuffle=False,
        chat_template=config.data.chat_template,
        max_prompt_length=config.data.max_prompt_length,
        max_length=config.data.max_length,
        truncation=config.data.truncation,
    )
    bundle = build_datasets(data_cfg, tokenizer, "prompts", seed=config.seed)
    model = load_frozen_causal_lm(
        policy_path, config.model.model_copy(update={"name_or_path": policy_path}), key="model.name_or_path"
    )
    model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    generator = build_generator(config.generation, model, tokenizer)
    rollouts = generator.generate(
        list(bundle.train["prompt_input_ids"]), sampling_from_config(config.generation, n=n, seed=seed)
    )
    samples: list[list[str]] = [[] for _ in prompts]
    finished: list[list[bool]] = [[] for _ in prompts]
    for index, text, done in zip(rollouts.prompt_index.tolist(), rollouts.texts, rollouts.finished):
        samples[index].append(text)
        finished[index].append(bool(done))
    del model, generator
    return list(bundle.train["prompt_text"]), list(bundle.train["prompt_messages"]), samples, finished


def _score(config, policy_path, texts, messages, candidates, finished, locations) -> list[list[float]]:
    """One score per candidate: the reward layer's, or with ``reward.kind=judge`` each candidate's win-rate
    against the other candidates of its prompt."""
    import torch

    from prefopt.models.loading import load_tokenizer
    from prefopt.models.reward import build_reward, import_callable

    if config.reward.kind == "judge":
        return judge_win_rates(
            import_callable(config.reward.function),
            texts,
            candidates,
            locations,
            judge=f"reward.function {config.reward.function}",
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scorer = build_reward(config.reward, device=device, policy_tokenizer=load_tokenizer(policy_path))
    flat = [(i, c) for i, row in enumerate(candidates) for c in row]
    values = scorer.score(
        [texts[i] for i, _ in flat],
        [c for _, c in flat],
        prompt_messages=[messages[i] for i, _ in flat] if any(messages) else None,
        finished=torch.tensor([f for row in finished for f in row]),
    ).tolist()
    scores, k = [], 0
    for row in candidates:
        scores.append(values[k : k + len(row)])
        k += len(row)
    return scores


def _sample_and_score(config, policy_path: str, rows: list, t: int, it_dir: Path) -> list[dict]:
    """Candidates per prompt (K samples + gold) with their scores; written to ``samples.jsonl``."""
    it = config.iterations
    texts, messages, candidates, finished = _generate(
        config,
        policy_path,
        [prompt for _, prompt, _ in rows],
        it.samples_per_prompt,
        config.seed * 1000 + t,
        it_dir / "prompts.jsonl",
    )
    gold = [it.include_gold and answer is not None for _, _, answer in rows]
    for i, (_, _, answer) in enumerate(rows):
        if gold[i]:
            candidates[i].append(answer)
            finished[i].append(True)
    locations = [location for location, _, _ in rows]
    scores = _score(config, policy_path, texts, messages, candidates, finished, locations)
    samples = []
    for i, (location, prompt, _) in enumerate(rows):
        count = len(candidates[i])
        entries = []
        for j, (text, score, done) in enumerate(zip(candidates[i], scores[i], finished[i])):
            is_gold = gold[i] and j == count - 1
            entry = {"text": text, "score": float(score), "gold": is_gold, "finished": done}
            if it.repetition_negative is not None and not is_gold:
                share = repeated_ngram_share(text, it.repetition_ngram)
                entry["repeated_ngrams"] = share
                entry["auto_negative"] = share > it.repetition_negative
            entries.append(entry)
        samples.append({"prompt": prompt, "source": location, "candidates": entries})
    _write_jsonl(it_dir / "samples.jsonl", samples)
    return samples


def _select_best(config, policies: list[str], out: Path) -> tuple[int, list[dict]]:
    """Alg. 2's last line: the best of ``policies`` (pi_1..pi_{T+1}) on ``iterations.validation``.

    Every iterate answers the same validation prompts (``validation_samples`` each, one sampling seed); a scorer
    gives each iterate its mean score, a judge its mean win-rate in a round robin of the iterates' answers to
    the same prompt and slot. Returns the index of the best and one record per iterate (``validation.json``)."""
    it = config.iterations
    rows = _prompt_rows(config, it.validation, "iterations.validation")
    prompts, locations = [prompt for _, prompt, _ in rows], [location for location, _, _ in rows]
    val_dir = out / "validation"
    val_dir.mkdir(parents=True, exist_ok=True)
    answers = []  # per iterate: per prompt, its samples
    for policy in policies:
        texts, messages, samples, finished = _generate(
            config, policy, prompts, it.validation_samples, config.seed * 1000, val_dir / "prompts.jsonl"
        )
        answers.append((samples, finished))
    if config.reward.kind == "judge":
        # one tournament per (prompt, slot): candidate k is iterate k's answer
        slots = [(i, s) for i in range(len(prompts)) for s in range(it.validation_samples)]
        rates = _score(
            config,
            policies[0],
            [texts[i] for i, _ in slots],
            [messages[i] for i, _ in slots],
            [[answers[k][0][i][s] for k in range(len(policies))] for i, s in slots],
            [[answers[k][1][i][s] for k in range(len(policies))] for i, s in slots],
            [locations[i] for i, _ in slots],
        )
        means = [sum(row[k] for row in rates) / len(rates) for k in range(len(policies))]
    else:
        means = []
        for samples, finished in answers:
            scores = _score(config, policies[0], texts, messages, samples, finished, locations)
            flat = [value for row in scores for value in row]
            means.append(sum(flat) / len(flat))
    records = [
        {"iterate": k + 1, "policy": p, "validation_score": m}
        for k, (p, m) in enumerate(zip(policies, means))
    ]
    best = max(range(len(policies)), key=lambda k: (means[k], k))  # ties: the later iterate
    tmp = val_dir / "validation.json.tmp"
    tmp.write_text(json.dumps({"iterates": records, "best": records[best]}, indent=2))
    tmp.replace(val_dir / "validation.json")
    return best, records


def _pairs_from_samples(config, samples: list[dict], t: int) -> list[dict]:
    it = config.iterations
    pairs = []
    for sample in samples:
        candidates = [
            Candidate(c["text"], c["score"], c["gold"], c.get("auto_negative", False))
            for c in sample["candidates"]
        ]
        conversational = isinstance(sample["prompt"], list)
        for i, j in large_margin_pairs(
            candidates,
            min_positive=it.min_positive_score,
            gold_margin=it.gold_margin,
            student_margin=it.student_margin,
        ):
            chosen, rejected = candidates[i].text, candidates[j].text
            if conversational:
                chosen = [{"role": "assistant", "content": chosen}]
                rejected = [{"role": "assistant", "content": rejected}]
            pairs.append(
                {
                    "prompt": sample["prompt"],
                    "chosen": chosen,
                    "rejected": rejected,
                    "chosen_score": candidates[i].score,
                    "rejected_score": candidates[j].score,
                    "iteration": t,
                    "chosen_is_gold": candidates[i].is_gold,
                    "rejected_is_gold": candidates[j].is_gold,
                }
            )
    return pairs


def _train_config(config, policy_path: str, pairs_file: Path, run_dir: Path):
    update = {
        "output_dir": str(run_dir),
        "overwrite_output_dir": True,
        "model": config.model.model_copy(update={"name_or_path": policy_path}),
        # The reference is refreshed to the previous iterate: DNO's DPO is against pi_t, not the SFT model.
        "reference": config.reference.model_copy(update={"name_or_path": policy_path}),
        "data": config.data.model_copy(update={"train": str(pairs_file), "format": "auto"}),
        "train": config.train.model_copy(update={"resume_from": None}),
        "iterations": config.iterations.model_copy(update={"count": 0}),
    }
    return config.model_copy(update=update)


def train_iterations(config) -> IterationsResult:
    from prefopt.config import save_config
    from prefopt.trainer.loop import train

    it = config.iterations
    out = Path(config.output_dir)
    state = _load_state(out, config)
    rows = _prompt_rows(config)  # bad prompt rows stop the run before anything is written
    if it.select_best:
        _prompt_rows(config, it.validation, "iterations.validation")
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    policy_path, history, records, steps, last = str(config.model.name_or_path), [], [], 0, {}
    for t in range(1, it.count + 1):
        it_dir = out / f"iteration-{t}"
        done = next((r for r in state["completed"] if r["iteration"] == t), None)
        if done is not None and Path(done["policy"]).exists():
            logger.info("iteration %d: finished earlier, policy %s", t, done["policy"])
            policy_path = done["policy"]
            history.append(_read_jsonl(it_dir / "pairs_new.jsonl"))
            records.append(done)
            continue
        it_dir.mkdir(parents=True, exist_ok=True)
        share = _partition(rows, t, it.count, it.partition, config.seed)
        samples = _sample_and_score(config, policy_path, share, t, it_dir)
        new_pairs = _pairs_from_samples(config, samples, t)
        carried = replay(history, it.replay, len(new_pairs), seed=config.seed * 1000 + t)
        _write_jsonl(it_dir / "pairs_new.jsonl", new_pairs)
        _write_jsonl(it_dir / "pairs.jsonl", new_pairs + carried)
        history.append(new_pairs)
        record = {
            "iteration": t,
            "prompts": len(share),
            "pairs": len(new_pairs),
            "replayed": len(carried),
            "reference": policy_path,
        }
        if new_pairs or carried:
            result = train(_train_config(config, policy_path, it_dir / "pairs.jsonl", it_dir / "run"))
            policy_path = str(result.final_dir)
            steps += result.global_step
            last = dict(result.last_metrics)
            record.update(steps=result.global_step, loss=last.get("loss"))
        else:
            logger.warning("iteration %d: no pair qualified; the policy is carried over unchanged", t)
        record["policy"] = policy_path
        records.append(record)
        state["completed"] = [r for r in state["completed"] if r["iteration"] != t] + [record]
        tmp = out / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(out / STATE_FILE)
        logger.info(
            "iteration %d: %d prompts, %d new + %d replayed pairs -> %s",
            t,
            len(share),
            len(new_pairs),
            len(carried),
            policy_path,
        )
    if it.select_best:
        policies = [str(config.model.name_or_path)] + [r["policy"] for r in records]
        best, scores = _select_best(config, policies, out)
        policy_path = policies[best]
        logger.info(
            "validation: %s; best is iterate %d (%s)",
            ", ".join(f"pi_{r['iterate']} {r['validation_score']:.4f}" for r in scores),
            best + 1,
            policy_path,
        )
    final = out / "final"  # output_dir/final, like every run: the last iterate, or the best one on validation
    if final.is_symlink() or final.exists():
        final.unlink()
    if Path(policy_path).resolve() != final.resolve():
        final.symlink_to(Path(policy_path).resolve(), target_is_directory=True)
    return IterationsResult(out, final, steps, last, {}, records)
