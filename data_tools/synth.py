"""A synthetic preference task with a programmatic gold reward ("gold-task").

It rebuilds the idea of the DPO paper's IMDB positive-sentiment task from a fixed vocabulary, small enough for a tiny
Llama (hidden 64, 2 layers, ~1k-token BPE) to learn on a CPU in a minute or two:

* prompt: a short review opening about one item, ``"<opening> the <item> <context>:"`` (8 openings x 16 items x
  10 contexts = 1280 prompts), e.g. ``"Honest thoughts on the camera after work:"``;
* completion: 2-4 short clauses (about 6-20 words) from a fixed vocabulary of positive, negative and neutral words,
  e.g. ``" the camera was lovely and it felt quite dull."``; a minority ramble (5-7 clauses) or repeat a clause.

Gold reward :func:`score` (``reward.function: data_tools.synth:score``), deterministic, in [-1, 1]::

    words    = lower-cased letter runs of the completion (special tokens such as <|im_end|> removed)
    pos, neg = number of DISTINCT positive / negative words
    balance  = (pos - neg) / (pos + neg + 1)                     # repeating a word earns nothing
    score    = 0.8 * balance
             + 0.2 if the prompt's item is mentioned              # on topic
             - 0.2 if another item is mentioned                   # off topic
             - min(0.6, 0.15 * repeats)                           # repeats: extra uses of any non-glue word
             - 0.04 * max(0, len(words) - 20)                     # rambling past 20 words
    clipped to [-1, 1]

Length is not rewarded as such: appending neutral words never raises the score (balance and topic are unchanged,
repeats and the length penalty can only grow). More *distinct* positive words do raise it with diminishing returns,
so in the behaviour data longer completions are often the preferred ones, and a policy that learns "longer is
better" runs into the penalty past 20 words: length exploitation is visible in the gold reward.

Preference labels are Bradley-Terry draws on the gold reward: P(a > b) = sigmoid((score(a) - score(b)) / T), with
T = ``DEFAULT_BT_TEMPERATURE`` = 0.1 unless ``--bt-temperature`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import statistics
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

TASK_VERSION = 1
DEFAULT_BT_TEMPERATURE = 0.1

ITEMS = (
    "hotel",
    "film",
    "novel",
    "cafe",
    "phone",
    "album",
    "game",
    "bike",
    "museum",
    "laptop",
    "concert",
    "pizza",
    "park",
    "train",
    "show",
    "camera",
)
OPENINGS = (
    "My review of the",
    "Here is what I think of the",
    "A few words about the",
    "Honest thoughts on the",
    "Quick review of the",
    "Let me tell you about the",
    "I just tried the",
    "Notes on the",
)
CONTEXTS = (
    "from last week",
    "on a rainy day",
    "with my family",
    "after work",
    "for the first time",
    "on holiday",
    "with friends",
    "this morning",
    "at the weekend",
    "after a long wait",
)

POSITIVE_ADJECTIVES = (
    "great",
    "wonderful",
    "excellent",
    "lovely",
    "amazing",
    "brilliant",
    "superb",
    "charming",
    "delightful",
    "pleasant",
    "fantastic",
    "good",
)
NEGATIVE_ADJECTIVES = (
    "awful",
    "terrible",
    "boring",
    "poor",
    "bad",
    "dull",
    "horrible",
    "weak",
    "disappointing",
    "bland",
    "noisy",
    "slow",
)
NEUTRAL_ADJECTIVES = (
    "okay",
    "fine",
    "average",
    "ordinary",
    "normal",
    "typical",
    "usual",
    "simple",
    "standard",
    "new",
)
POSITIVE_VERBS = ("loved", "enjoyed", "liked", "adored")
NEGATIVE_VERBS = ("hated", "disliked", "regretted")
NEUTRAL_VERBS = ("saw", "tried", "used", "visited", "watched")
RECOMMEND = {"pos": ("recommend",), "neg": ("avoid",), "neu": ("remember",)}
ADVERBS = ("really", "quite", "very", "rather", "truly", "fairly", "pretty", "somewhat")
ASPECTS = (
    "staff",
    "price",
    "story",
    "sound",
    "service",
    "design",
    "ending",
    "place",
    "music",
    "food",
    "view",
    "screen",
)
GLUE = ("the", "was", "it", "i", "felt", "seemed", "would", "and", "overall", "so")

POSITIVE_WORDS = frozenset(POSITIVE_ADJECTIVES + POSITIVE_VERBS + RECOMMEND["pos"])
NEGATIVE_WORDS = frozenset(NEGATIVE_ADJECTIVES + NEGATIVE_VERBS + RECOMMEND["neg"])
NEUTRAL_WORDS = tuple(NEUTRAL_ADJECTIVES + NEUTRAL_VERBS + RECOMMEND["neu"] + ADVERBS + ASPECTS + GLUE)
_ITEM_SET = frozenset(ITEMS)
_GLUE_SET = frozenset(GLUE)
_SPECIAL = re.compile(r"<\|[^|>]*\|>|</?s>")
_WORD = re.compile(r"[a-z]+")

# Clause templates: A adjective, V verb, R recommendation (sentiment-bearing); D adverb; S subject (item or aspect).
CLAUSES = (
    "the {S} was {A}",
    "the {S} seemed {D} {A}",
    "i {V} the {S}",
    "it felt {D} {A}",
    "i would {R} it",
    "{D} {A} overall",
)
CONNECTORS = (", ", " and ", ". ", ", so ")


# ---------------------------------------------------------------------------------------------------------------
# Gold reward
# ---------------------------------------------------------------------------------------------------------------


def _plain(value: Any) -> str:
    """Text of a string or of a message list (the last assistant message's content for completions)."""
    if isinstance(value, list):
        return " ".join(str(m.get("content", "")) for m in value if isinstance(m, dict))
    return str(value)


def _words(text: str) -> list[str]:
    return _WORD.findall(_SPECIAL.sub(" ", text).lower())


def prompt_item(prompt: Any) -> Optional[str]:
    return next((w for w in _words(_plain(prompt)) if w in _ITEM_SET), None)


def score_parts(prompt: Any, completion: Any) -> dict[str, float]:
    """The terms of :func:`score`, for analysis."""
    if isinstance(completion, list):
        replies = [m for m in completion if isinstance(m, dict) and m.get("role") == "assistant"]
        completion = replies[-1]["content"] if replies else _plain(completion)
    words = _words(str(completion))
    item = prompt_item(prompt)
    pos = len({w for w in words if w in POSITIVE_WORDS})
    neg = len({w for w in words if w in NEGATIVE_WORDS})
    repeats = sum(count - 1 for word, count in Counter(words).items() if word not in _GLUE_SET and count > 1)
    return {
        "balance": (pos - neg) / (pos + neg + 1),
        "on_topic": float(item is not None and item in words),
        "off_topic": float(any(w in _ITEM_SET and w != item for w in words)),
        "repeats": float(repeats),
        "words": float(len(words)),
    }


def score(prompt: Any, completion: Any) -> float:
    """Gold reward of ``completion`` for ``prompt`` (strings or message lists), in [-1, 1]. See the module doc."""
    parts = score_parts(prompt, completion)
    if parts["words"] == 0:
        return -1.0
    value = (
        0.8 * parts["balance"]
        + 0.2 * parts["on_topic"]
        - 0.2 * parts["off_topic"]
        - min(0.6, 0.15 * parts["repeats"])
        - 0.04 * max(0.0, parts["words"] - 20)
    )
    return max(-1.0, min(1.0, value))


def preference_probability(prompt: Any, a: Any, b: Any, temperature: float = DEFAULT_BT_TEMPERATURE) -> float:
    """Bradley-Terry probability that ``a`` is preferred to ``b`` under the gold reward."""
    return _sigmoid((score(prompt, a) - score(prompt, b)) / temperature)


def judge(prompt: Any, a: Any, b: Any) -> float:
    """Pairwise judge for ``reward.kind: judge``: the probability that ``a`` beats ``b`` (>= 0.5: ``a`` wins)."""
    return preference_probability(prompt, a, b)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


# ---------------------------------------------------------------------------------------------------------------
# Behaviour distribution (what the SFT data, and so the SFT model, produces)
# ---------------------------------------------------------------------------------------------------------------


def all_prompts() -> list[str]:
    return [f"{o} {i} {c}:" for o in OPENINGS for i in ITEMS for c in CONTEXTS]


def sample_completion(rng: random.Random, item: str) -> str:
    """Mixed quality on purpose: a random mood sets how often sentiment slots are positive or negative, and happier
    reviewers write a little more (so in the pairs the preferred completion is more often the longer one, a
    spurious length cue like the one real preference data has). Words are not reused within a completion except in
    the deliberately repetitive minority."""
    mood = rng.uniform(-1.0, 1.0)
    happy = (1 + mood) / 2
    steep = happy * happy * (3 - 2 * happy)
    p_pos, p_neg = 0.05 + 0.85 * steep, 0.05 + 0.85 * (1 - steep)
    used: set[str] = set()

    def pick(options: Sequence[str]) -> str:
        fresh = [o for o in options if o not in used] or list(options)
        word = rng.choice(fresh)
        used.add(word)
        return word

    def fill(slot: str) -> str:
        if slot == "S":
            r = rng.random()
            if r < 0.35 and item not in used:
                return pick((item,))
            return pick([i for i in ITEMS if i != item]) if r < 0.40 else pick(ASPECTS)
        if slot == "D":
            return pick(ADVERBS)
        r = rng.random()
        polarity = 0 if r < p_pos else 1 if r < p_pos + p_neg else 2
        table = {
            "A": (POSITIVE_ADJECTIVES, NEGATIVE_ADJECTIVES, NEUTRAL_ADJECTIVES),
            "V": (POSITIVE_VERBS, NEGATIVE_VERBS, NEUTRAL_VERBS),
            "R": (RECOMMEND["pos"], RECOMMEND["neg"], RECOMMEND["neu"]),
        }[slot]
        return pick(table[polarity])

    if rng.random() < 0.02 + 0.06 * happy:
        count = rng.randint(5, 7)  # rambling
    else:
        count = 2 + (rng.random() < 0.05 + 0.75 * happy) + (rng.random() < 0.45 * happy)
    templates = [rng.choice(CLAUSES) for _ in range(count)]
    clauses = [re.sub(r"\{(\w)\}", lambda m: fill(m.group(1)), template) for template in templates]
    if rng.random() < 0.08:
        clauses.append(rng.choice(clauses))  # a repetitive answer
    text = clauses[0]
    for clause in clauses[1:]:
        text += rng.choice(CONNECTORS) + clause
    return " " + text + "."


def corpus_lines() -> list[str]:
    """Sentences covering the task's vocabulary, for training the tiny tokenizer (keeps the words whole tokens)."""
    rng = random.Random("gold-task-corpus")
    prompts = all_prompts()
    lines = [
        " ".join(sorted(POSITIVE_WORDS)),
        " ".join(sorted(NEGATIVE_WORDS)),
        " ".join(NEUTRAL_WORDS),
        " ".join(ITEMS),
        " ".join(OPENINGS),
        " ".join(CONTEXTS),
    ]
    lines += prompts[::7]
    for _ in range(400):
        item = rng.choice(ITEMS)
        lines.append(sample_completion(rng, item).strip())
    return lines


# ---------------------------------------------------------------------------------------------------------------
# Writing the task
# ---------------------------------------------------------------------------------------------------------------


def build_task(
    seed: int,
    n_sft: int = 2000,
    n_pairs: int = 2000,
    n_eval: int = 200,
    n_heldout: int = 200,
    n_prompts: int = 1000,
    temperature: float = DEFAULT_BT_TEMPERATURE,
    conversational: bool = False,
) -> dict[str, Any]:
    """The task's files as ``{name: rows}`` plus ``task.json``'s content (no I/O)."""
    prompts = all_prompts()
    if not 0 < n_heldout < len(prompts):
        raise ValueError(
            f"--n-heldout must be between 1 and {len(prompts) - 1} (there are {len(prompts)} prompts)"
        )
    if min(n_sft, n_pairs, n_eval, n_prompts) < 1 or temperature <= 0:
        raise ValueError("--n-sft, --n-pairs, --n-eval, --n-prompts and --bt-temperature must be positive")
    random.Random(f"{seed}-split").shuffle(prompts)
    heldout, train_pool = prompts[:n_heldout], prompts[n_heldout:]
    if n_prompts > len(train_pool):
        raise ValueError(f"--n-prompts {n_prompts} is more than the {len(train_pool)} training prompts")

    def prompt_field(prompt: str):
        return [{"role": "user", "content": prompt}] if conversational else prompt

    def completion_field(text: str):
        return [{"role": "assistant", "content": text.strip()}] if conversational else text

    rng = random.Random(f"{seed}-sft")
    sft = []
    for _ in range(n_sft):
        prompt = rng.choice(train_pool)
        text = sample_completion(rng, prompt_item(prompt))
        sft.append(
            {
                "prompt": prompt_field(prompt),
                "completion": completion_field(text),
                "gold_score": round(score(prompt, text), 4),
            }
        )

    def pairs(count: int, pool: Sequence[str], stream: str) -> tuple[list[dict], dict[str, float]]:
        rng = random.Random(f"{seed}-{stream}")
        rows, agree, longer, shorter = [], 0, 0, 0
        for _ in range(count):
            prompt = rng.choice(pool)
            item = prompt_item(prompt)
            a = sample_completion(rng, item)
            b = sample_completion(rng, item)
            while b == a:
                b = sample_completion(rng, item)
            sa, sb = score(prompt, a), score(prompt, b)
            a_wins = rng.random() < _sigmoid((sa - sb) / temperature)
            (chosen, sc), (rejected, sr) = ((a, sa), (b, sb)) if a_wins else ((b, sb), (a, sa))
            agree += sc > sr
            longer += len(chosen.split()) > len(rejected.split())
            shorter += len(chosen.split()) < len(rejected.split())
            rows.append(
                {
                    "prompt": prompt_field(prompt),
                    "chosen": completion_field(chosen),
                    "rejected": completion_field(rejected),
                    "chosen_score": round(sc, 4),
                    "rejected_score": round(sr, 4),
                }
            )
        return rows, {
            "label_agrees_with_gold": round(agree / count, 4),
            "chosen_longer": round(longer / count, 4),
            "chosen_shorter": round(shorter / count, 4),
        }

    def rated(count: int, pool: Sequence[str], stream: str) -> list[dict]:
        # Three distinct completions scored by the gold reward (no label noise), as UltraFeedback's ratings are
        # used by TPO: best = gold, second = chosen, worst = rejected. Also scored pairs for CoPG.
        rng = random.Random(f"{seed}-{stream}")
        rows = []
        for _ in range(count):
            prompt = rng.choice(pool)
            texts: list[str] = []
            while (
                len(texts) < 3
            ):  # distinct texts with distinct scores: best, second and worst are well defined
                text = sample_completion(rng, prompt_item(prompt))
                if text not in texts and all(score(prompt, text) != score(prompt, t) for t in texts):
                    texts.append(text)
            rows.append(
                {
                    "prompt": prompt_field(prompt),
                    "completions": [
                        {"text": completion_field(text), "score": round(score(prompt, text), 4)}
                        for text in texts
                    ],
                }
            )
        return rows

    pairs_train, train_stats = pairs(n_pairs, train_pool, "pairs-train")
    pairs_eval, eval_stats = pairs(n_eval, heldout, "pairs-eval")
    prompts_train = random.Random(f"{seed}-prompts").sample(train_pool, n_prompts)
    sft_scores = [row["gold_score"] for row in sft]
    files = {
        "sft.jsonl": sft,
        "pairs_train.jsonl": pairs_train,
        "pairs_eval.jsonl": pairs_eval,
        "prompts_train.jsonl": [{"prompt": prompt_field(p)} for p in prompts_train],
        "rated_train.jsonl": rated(n_pairs, train_pool, "rated-train"),
        "rated_eval.jsonl": rated(n_eval, heldout, "rated-eval"),
        "prompts_heldout.jsonl": [{"prompt": prompt_field(p)} for p in heldout],
    }
    task = {
        "name": "gold-task",
        "version": TASK_VERSION,
        "seed": seed,
        "format": "conversational" if conversational else "standard",
        "reward_function": "data_tools.synth:score",
        "judge_function": "data_tools.synth:judge",
        "bt_temperature": temperature,
        "counts": {name: len(rows) for name, rows in files.items()},
        "prompts": {"total": len(prompts), "train_pool": len(train_pool), "heldout": len(heldout)},
        "stats": {
            "sft_gold_mean": round(statistics.fmean(sft_scores), 4),
            "sft_gold_std": round(statistics.pstdev(sft_scores), 4),
            "pairs_train": train_stats,
            "pairs_eval": eval_stats,
        },
    }
    return {"files": files, "task": task}


README = """# gold-task (synthetic preference task, seed {seed})

Generated by `python -m data_tools synth gold-task --out DIR --seed {seed}`; the same seed and counts give
byte-identical files. Format: {format} rows.

Prompts are short review openings about one of {n_items} items ("<opening> the <item> <context>:"); completions are
2-4 clauses from a fixed vocabulary of positive, negative and neutral words (some ramble or repeat themselves).
The gold reward is `data_tools.synth:score(prompt, completion)` in [-1, 1]:
0.8 * (pos - neg) / (pos + neg + 1) over distinct sentiment words, +0.2 for mentioning the prompt's item,
-0.2 for mentioning another item, -0.15 per repeated non-glue word (at most -0.6), -0.04 per word past 20.
Padding with neutral words never raises it; longer is not better past 20 words.

| file | rows | content |
|---|---|---|
| sft.jsonl | {sft} | prompt/completion of mixed quality (the behaviour policy), with `gold_score` |
| pairs_train.jsonl | {pairs_train} | prompt/chosen/rejected from the same distribution, with gold scores |
| pairs_eval.jsonl | {pairs_eval} | the same, on held-out prompts |
| prompts_train.jsonl | {prompts_train} | training prompts (online methods) |
| rated_train.jsonl | {rated_train} | prompt with 3 completions and their gold scores (triples: best/second/worst) |
| rated_eval.jsonl | {rated_eval} | the same, on held-out prompts |
| prompts_heldout.jsonl | {prompts_heldout} | prompts disjoint from every training prompt |

Labels: Bradley-Terry draws, P(a preferred to b) = sigmoid((score(a) - score(b)) / {temperature}); on the training
pairs the label agrees with the higher gold score {agree:.1%} of the time; the chosen completion has more words
than the rejected one in {longer:.1%} of the pairs and fewer in {shorter:.1%} (a spurious length cue: the gold reward
itself does not pay for length). Behaviour-policy gold reward: mean {mean:.3f}, std {std:.3f}.
"""


def write_task(out_dir: str | os.PathLike, seed: int, **kwargs: Any) -> dict[str, Any]:
    built = build_task(seed, **kwargs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    task, counts, stats = built["task"], built["task"]["counts"], built["task"]["stats"]
    texts = {
        name: "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        for name, rows in built["files"].items()
    }
    texts["task.json"] = json.dumps(task, indent=2) + "\n"
    texts["README.md"] = README.format(
        seed=seed,
        format=task["format"],
        n_items=len(ITEMS),
        temperature=task["bt_temperature"],
        sft=counts["sft.jsonl"],
        pairs_train=counts["pairs_train.jsonl"],
        pairs_eval=counts["pairs_eval.jsonl"],
        prompts_train=counts["prompts_train.jsonl"],
        prompts_heldout=counts["prompts_heldout.jsonl"],
        rated_train=counts["rated_train.jsonl"],
        rated_eval=counts["rated_eval.jsonl"],
        agree=stats["pairs_train"]["label_agrees_with_gold"],
        longer=stats["pairs_train"]["chosen_longer"],
        shorter=stats["pairs_train"]["chosen_shorter"],
        mean=stats["sft_gold_mean"],
        std=stats["sft_gold_std"],
    )
    for name, text in texts.items():
        tmp = out / f".{name}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8", newline="\n") as stream:
            stream.write(text)
        os.replace(tmp, out / name)
    return task


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "synth", help="generate synthetic tasks", description="Generate synthetic tasks."
    )
    tasks = parser.add_subparsers(dest="task", required=True, metavar="TASK")
    gold = tasks.add_parser(
        "gold-task",
        help="the synthetic sentiment task with a programmatic gold reward",
        description=__doc__.split("\n\n")[0] + " Gold reward: data_tools.synth:score.",
    )
    gold.add_argument("--out", required=True, help="output directory")
    gold.add_argument("--seed", type=int, default=0)
    gold.add_argument("--n-sft", type=int, default=2000, help="SFT rows (default 2000)")
    gold.add_argument("--n-pairs", type=int, default=2000, help="training pairs (default 2000)")
    gold.add_argument("--n-eval", type=int, default=200, help="eval pairs, on held-out prompts (default 200)")
    gold.add_argument("--n-heldout", type=int, default=200, help="held-out prompts (default 200)")
    gold.add_argument(
        "--n-prompts", type=int, default=1000, help="training prompts for online methods (default 1000)"
    )
    gold.add_argument(
        "--bt-temperature",
        type=float,
        default=DEFAULT_BT_TEMPERATURE,
        help=f"Bradley-Terry temperature of the labels (default {DEFAULT_BT_TEMPERATURE})",
    )
    gold.add_argument(
        "--conversational", action="store_true", help="write message lists instead of plain strings"
    )
    gold.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from prefopt.errors import DataError

    try:
        task = write_task(
            args.out,
            args.seed,
            n_sft=args.n_sft,
            n_pairs=args.n_pairs,
            n_eval=args.n_eval,
            n_heldout=args.n_heldout,
            n_prompts=args.n_prompts,
            temperature=args.bt_temperature,
            conversational=args.conversational,
        )
    except ValueError as error:
        raise DataError(f"synth gold-task: {error}") from None
    counts = ", ".join(f"{name} {n}" for name, n in task["counts"].items())
    print(f"wrote gold-task (seed {args.seed}) to {args.out}: {counts}")
    return 0
