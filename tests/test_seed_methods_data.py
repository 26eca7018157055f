"""Data for CoPG (scored pairs), TPO (triples) and SRPO (revision sequences): formats, bad rows (exit 2 naming
the
file, row and field), collation, and the precomputed reference of SRPO's six sequences."""

from __future__ import annotations

import json

import pytest
import torch

from prefopt.cli import main
from prefopt.config import DataConfig
from prefopt.data import build_datasets, detect_format
from prefopt.data.collate import REVISION_GROUPS, RevisionPairCollator, ScoredPairCollator, TripleCollator
from prefopt.data.revision import RevisionTemplate
from prefopt.errors import DataError

TRIPLE = {
    "prompt": "Notes on the film:",
    "gold": " great and lovely.",
    "chosen": " fine.",
    "rejected": " awful.",
}


def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _build(tmp_path, tokenizer, rows, kind, **cfg):
    return build_datasets(
        DataConfig(train=str(_write(tmp_path / "data.jsonl", rows)), **cfg), tokenizer, kind, seed=0
    )


def test_triple_rows_and_rated_best_second_worst(tmp_path, tiny_tokenizer):
    assert detect_format(TRIPLE) == "triples"
    assert (
        detect_format({**{k: v for k, v in TRIPLE.items() if k != "gold"}, "reference": " great."})
        == "triples"
    )
    bundle = _build(tmp_path, tiny_tokenizer, [TRIPLE], "triples", shuffle=False)
    assert bundle.train[0]["gold_text"] == " great and lovely."
    rated = {
        "prompt": "q",
        "completions": [
            {"text": " ok.", "score": 2},
            {"text": " best.", "score": 9},
            {"text": " bad.", "score": 1},
            {"text": " good.", "score": 5},
        ],
    }
    bundle = _build(tmp_path, tiny_tokenizer, [rated], "triples")
    row = bundle.train[0]
    assert (row["gold_text"], row["chosen_text"], row["rejected_text"]) == (" best.", " good.", " bad.")
    batch = TripleCollator(tiny_tokenizer.pad_token_id)([row, row])
    assert batch["input_ids"].shape[0] == 6
    gold_len = len(row["gold_input_ids"])
    assert int(batch["completion_mask"][4].sum()) == gold_len  # rows 4..5 are prompt + gold


def test_scores_ride_along_from_pairs_and_rated_rows(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "p", "chosen": " a.", "rejected": " b.", "score_chosen": 3.5, "score_rejected": 1}]
    bundle = _build(tmp_path, tiny_tokenizer, rows, "scored_pairs")
    batch = ScoredPairCollator(tiny_tokenizer.pad_token_id)([bundle.train[0]])
    assert batch["chosen_score"].tolist() == [3.5] and batch["rejected_score"].tolist() == [1.0]
    rated = {"prompt": "q", "completions": [{"text": " x.", "score": 0.25}, {"text": " y.", "score": -0.5}]}
    bundle = _build(tmp_path, tiny_tokenizer, [rated], "scored_pairs")
    assert (bundle.train[0]["chosen_score"], bundle.train[0]["rejected_score"]) == (0.25, -0.5)


def test_scored_pair_errors_name_file_line_and_field(tmp_path, tiny_tokenizer):
    good = {"prompt": "p", "chosen": " a.", "rejected": " b.", "chosen_score": 1.0, "rejected_score": 0.0}
    with pytest.raises(
        DataError, match=r'data\.jsonl line 2: field "chosen_score" is missing: this loss needs'
    ):
        _build(
            tmp_path,
            tiny_tokenizer,
            [good, {"prompt": "q", "chosen": " c.", "rejected": " d."}],
            "scored_pairs",
        )
    with pytest.raises(
        DataError, match=r'data\.jsonl line 2: field "rejected_score" is missing \(give a score'
    ):
        _build(tmp_path, tiny_tokenizer, [good, {**good, "rejected_score": None}], "scored_pairs")
    with pytest.raises(
        DataError, match=r'line 1: field "chosen_score": expected a finite number, got \'high\''
    ):
        _build(tmp_path, tiny_tokenizer, [{**good, "chosen_score": "high"}], "scored_pairs")


def _train(tmp_path, tiny_model_dir, recipe, rows, *overrides):
    data = _write(tmp_path / "rows.jsonl", rows)
    return main(
        [
            "train",
            f"recipes/tiny/{recipe}.yaml",
            f"model.name_or_path={tiny_model_dir}",
            f"data.train={data}",
            "data.eval=null",
            f"output_dir={tmp_path / 'out'}",
            "logging.progress=false",
            *overrides,
        ]
    )


def test_bad_input_exits_2_naming_file_row_and_field(tmp_path, tiny_model_dir, capsys):
    no_gold = {k: v for k, v in TRIPLE.items() if k != "gold"}
    assert _train(tmp_path, tiny_model_dir, "tpo", [TRIPLE, no_gold], "data.format=triples") == 2
    err = capsys.readouterr().err
    assert 'rows.jsonl line 2: field "gold" is missing' in err and "Traceback" not in err
    unscored = {"prompt": "p", "chosen": " a.", "rejected": " b."}
    assert _train(tmp_path, tiny_model_dir, "copg", [unscored]) == 2
    err = capsys.readouterr().err
    assert 'rows.jsonl line 1: field "chosen_score" is missing' in err and "Traceback" not in err


def test_revision_prompts_are_the_rendered_template(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "Notes on the film:", "chosen": " great.", "rejected": " awful."}]
    bundle = _build(
        tmp_path, tiny_tokenizer, rows, "revision_pairs", revision_template="{prompt}{answer} Again:"
    )
    row = bundle.train[0]
    template = RevisionTemplate("{prompt}{answer} Again:")
    for name, answer in (("chosen", " great."), ("rejected", " awful.")):
        text = template.render("Notes on the film:", "", answer)
        assert row[f"revise_{name}_prompt_input_ids"] == tiny_tokenizer(text)["input_ids"]
    batch = RevisionPairCollator(tiny_tokenizer.pad_token_id)([row])
    assert batch["input_ids"].shape[0] == 6
    for group, (prompt_key, completion_key) in enumerate(REVISION_GROUPS, start=2):
        start = len(row[prompt_key])
        end = start + len(row[completion_key])
        assert batch["input_ids"][group, start:end].tolist() == row[completion_key]
        assert (
            batch["completion_mask"][group, start:end].all()
            and batch["completion_mask"][group].sum() == end - start
        )
    with pytest.raises(ValueError, match=r"revision_template must contain \{answer\}"):
        DataConfig(revision_template="{prompt} please revise")


def test_conversational_revision_prompt_appends_answer_and_instruction(tiny_tokenizer):
    messages = json.dumps([{"role": "user", "content": "Notes on the film:"}])
    text = RevisionTemplate(instruction="Make it better.").render("", messages, "great.", tiny_tokenizer)
    expected = tiny_tokenizer.apply_chat_template(
        [
            {"role": "user", "content": "Notes on the film:"},
            {"role": "assistant", "content": "great."},
            {"role": "user", "content": "Make it better."},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == expected


def test_precomputed_reference_caches_all_six_srpo_sequences(tmp_path, tiny_model_dir):
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefopt.models.reference import ModelReference, PrecomputedReference, precompute_table

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [
        {"prompt": f"Notes on the film {i}:", "chosen": " great.", "rejected": " awful and dull."}
        for i in range(5)
    ]
    bundle = _build(tmp_path, tokenizer, rows, "revision_pairs", shuffle=False)
    live = ModelReference(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), None)
    collator = RevisionPairCollator(tokenizer.pad_token_id)
    table = precompute_table(
        live,
        bundle.train,
        collator,
        cache_file=tmp_path / "ref.safetensors",
        accelerator=Accelerator(cpu=True),
        batch_size=2,
    )
    assert table["groups"].shape == (5, 6)
    batch = collator([bundle.train[i] for i in (3, 1)])
    cached = PrecomputedReference({"train": table}).group_logps(batch, 6)
    assert torch.allclose(cached, live.group_logps(batch, 6), atol=1e-5)


def test_revision_loop_revises_each_answer(tmp_path, tiny_model_dir):
    from prefopt.evaluate import sample_with_revisions

    prompts = _write(
        tmp_path / "prompts.jsonl", [{"prompt": "Notes on the film:"}, {"prompt": "My review of the cafe:"}]
    )
    seen = []

    def reward(prompt, completion):
        seen.append((prompt, completion))
        return float(len(completion.split()))

    rounds = sample_with_revisions(
        str(tiny_model_dir), str(prompts), reward, revisions=2, samples_per_prompt=2, max_new_tokens=8, seed=3
    )
    assert len(rounds) == 3 and all(len(r.completions) == 4 for r in rounds)
    assert rounds[1].prompt_index == [0, 0, 1, 1] and rounds[2].prompts[2] == "My review of the cafe:"
    assert [r.rewards for r in rounds] == [[float(len(c.split())) for c in r.completions] for r in rounds]
    assert len(seen) == 12


def word_count(prompt, completion):
    return float(len(completion.split()))


def test_copg_pairs_without_scores_are_scored_by_the_reward_layer_once(tmp_path, tiny_model_dir):
    from prefopt.config import load_config
    from prefopt.trainer import train

    rows = [
        {"prompt": f"Notes on the film {i}:", "chosen": " great and lovely fun.", "rejected": " awful."}
        for i in range(8)
    ]
    data = _write(tmp_path / "rows.jsonl", rows)
    overrides = [
        f"model.name_or_path={tiny_model_dir}",
        f"data.train={data}",
        "data.eval=null",
        "logging.progress=false",
        "logging.logging_steps=1",
        "train.max_steps=1",
        "train.per_device_batch_size=4",
        "reward.kind=function",
        "reward.function=tests.test_seed_methods_data:word_count",
        "overwrite_output_dir=true",
    ]
    written = []
    for run in ("a", "b"):
        train(load_config("recipes/tiny/copg.yaml", [*overrides, f"output_dir={tmp_path / run}"]))
        first = json.loads((tmp_path / run / "metrics.jsonl").read_text().splitlines()[0])
        assert first["copg/reward_margin"] == pytest.approx(4.0 - 1.0)  # 4 words vs 1 word
        cached = list(tmp_path.glob(".prefopt_cache/scored-*.jsonl"))
        assert len(cached) == 1
        written.append(cached[0].stat().st_mtime_ns)
    assert written[0] == written[1]  # scored once; the second run read the cache
    rows = [json.loads(line) for line in cached[0].read_text().splitlines()]
    assert [(r["chosen_score"], r["rejected_score"]) for r in rows] == [(4.0, 1.0)] * 8
