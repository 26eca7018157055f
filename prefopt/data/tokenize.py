"""Tokenization with an exact prompt/completion boundary, truncation, and the data fingerprint.

The prompt text and each completion text are tokenized **separately** and their ids concatenated, so no BPE merge
crosses the boundary and the completion starts where the prompt ends (docs/losses.md). Every completion
ends with the EOS token (with a ChatML template EOS is ``<|im_end|>``, the end of the assistant turn); a trailing EOS
string in the text is not doubled.

Truncation: the prompt first, to ``max_prompt_length`` (``keep_end`` keeps its end, ``keep_start`` its start); then
each completion to what is left of ``max_length`` (keeping its start). A row whose completion would be cut to nothing
is dropped. Every truncation and drop is flagged per row so the report can count them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

from prefopt.errors import DataError

# Bump when the tokenization below changes what it produces: it is part of every fingerprint (and cache key).
TOKENIZATION_VERSION = "1"

COMPLETIONS = {
    "pairs": ("chosen", "rejected"),
    "sft": ("completion",),
    "prompts": (),
    "scored_pairs": ("chosen", "rejected"),
    "triples": ("chosen", "rejected", "gold"),
    "revision_pairs": ("chosen", "rejected"),
    "reset_prompts": ("completion",),
    "unpaired": ("completion",),
}


def resolve_chat_template(tokenizer, override: Optional[str]) -> Optional[str]:
    """``data.chat_template`` (a Jinja string or a path to a template file) else the tokenizer's own template."""
    if override:
        if "{" not in override and os.path.isfile(os.path.expanduser(override)):
            with open(os.path.expanduser(override), encoding="utf-8") as handle:
                return handle.read()
        return override
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    return template or None


def tokenizer_fingerprint(tokenizer, chat_template: Optional[str]) -> str:
    """Hash of what decides the ids: the full tokenizer definition (vocab, merges, normalizer, post-processor),
    special tokens and the chat template in use."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
    specials = {
        name: str(getattr(tokenizer, name, None))
        for name in ("bos_token", "eos_token", "pad_token", "unk_token")
    }
    digest.update(
        json.dumps(
            {
                "class": type(tokenizer).__name__,
                "specials": specials,
                "added": sorted((str(k), str(v)) for k, v in tokenizer.get_added_vocab().items()),
                "chat_template": chat_template or "",
            },
            sort_keys=True,
        ).encode()
    )
    return digest.hexdigest()


def data_fingerprint(parts: dict[str, Any]) -> str:
    payload = json.dumps({"tokenization_version": TOKENIZATION_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass
class Fitted:
    prompt_ids: list[int]
    completion_ids: list[list[int]]
    prompt_truncated: bool
    completion_truncated: list[bool]
    dropped: Optional[str]  # the completion that would have been cut to nothing


def fit_lengths(
    prompt_ids: Sequence[int],
    completion_ids: Sequence[Sequence[int]],
    max_length: int,
    max_prompt_length: int,
    truncation: str = "keep_end",
    names: Sequence[str] = (),
) -> Fitted:
    """Truncate the prompt to ``max_prompt_length``, then each completion to what is left of ``max_length``."""
    prompt = list(prompt_ids)
    prompt_truncated = len(prompt) > max_prompt_length
    if prompt_truncated:
        prompt = (
            prompt[len(prompt) - max_prompt_length :]
            if truncation == "keep_end"
            else prompt[:max_prompt_length]
        )
    budget = max_length - len(prompt)
    completions, flags, dropped = [], [], None
    for i, ids in enumerate(completion_ids):
        cut = len(ids) > budget
        completions.append(list(ids[: max(budget, 0)]) if cut else list(ids))
        flags.append(cut)
        if not completions[-1] and dropped is None:
            dropped = names[i] if i < len(names) else f"completion {i}"
    return Fitted(prompt, completions, prompt_truncated, flags, dropped)


class ExampleTokenizer:
    """Batched ``datasets.map`` function turning normalised examples into model inputs (picklable for num_proc).

    Input columns: ``prompt`` (plain string, "" for conversational rows), ``prompt_messages`` (JSON, "" for plain
    rows), ``<name>_text`` for each completion of the kind, ``_source`` (file and line). Output: the model columns
    plus flag columns ``_prompt_truncated``, ``_<name>_truncated``, ``_dropped`` and ``_error`` (reason strings or "").
    """

    def __init__(
        self,
        tokenizer,
        kind: str,
        max_length: int,
        max_prompt_length: int,
        truncation: str = "keep_end",
        chat_template: Optional[str] = None,
        revision=None,
    ):
        if tokenizer.eos_token_id is None or tokenizer.eos_token is None:
            raise DataError("the tokenizer has no EOS token; every completion ends with one (set eos_token)")
        if max_length < 1 or max_prompt_length < 1:
            raise DataError(
                f"data.max_length ({max_length}) and data.max_prompt_length ({max_prompt_length}) must "
                "be positive"
            )
        self.tokenizer = tokenizer
        self.kind = kind
        self.names = COMPLETIONS[kind]
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.truncation = truncation
        self.chat_template = chat_template
        self.eos_token = str(tokenizer.eos_token)
        self.eos_token_id = int(tokenizer.eos_token_id)
        self.revision = revision  # RevisionTemplate for "revision_pairs"

    # -- pieces, also used by data_tools stats ------------------------------------------------------------------
    def render_prompt(self, prompt: str, prompt_messages: str) -> str:
        """The prompt string exactly as fed to the model (chat template with the generation prompt for messages)."""
        if not prompt_messages:
            return prompt
        if self.chat_template is None:
            raise DataError(
                "conversational rows need a chat template and the tokenizer has none; set "
                "data.chat_template (a Jinja template string or a path to a template file)"
            )
        text = self.tokenizer.apply_chat_template(
            json.loads(prompt_messages),
            tokenize=False,
            add_generation_prompt=True,
            chat_template=self.chat_template,
        )
        if not isinstance(text, str):
            raise TypeError(f"chat template rendering returned {type(text).__name__}, not a string")
        return text

    def encode_prompts(self, texts: list[str], templated: list[bool]) -> list[list[int]]:
        # A chat template writes its own special tokens (BOS...) into the text; plain prompts get the tokenizer's.
        out: list[list[int]] = [[] for _ in texts]
        for flag in (True, False):
            positions = [i for i, t in enumerate(templated) if t == flag and texts[i]]
            if positions:
                ids = self.tokenizer([texts[i] for i in positions], add_special_tokens=not flag)["input_ids"]
                for i, row_ids in zip(positions, ids):
                    out[i] = list(row_ids)
        return out

    def strip_eos(self, text: str) -> str:
        return text[: -len(self.eos_token)] if self.eos_token and text.endswith(self.eos_token) else text

    def encode_completions(self, texts: list[str]) -> list[list[int]]:
        """Completion tokens only, each ending with EOS (texts must already have a trailing EOS string removed)."""
        ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
        return [list(row) + [self.eos_token_id] for row in ids]

    # -- the map function ----------------------------------------------------------------------------------------
    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        size = len(batch["prompt"])
        errors = [""] * size
        prompt_texts = []
        for i in range(size):
            try:
                prompt_texts.append(self.render_prompt(batch["prompt"][i], batch["prompt_messages"][i]))
            except DataError:
                raise
            except Exception as error:  # noqa: BLE001 - a template may reject a row (e.g. roles must alternate)
                errors[i] = f'{batch["_source"][i]}: field "prompt": the chat template failed: {error}'
                prompt_texts.append("")
        prompt_ids = self.encode_prompts(prompt_texts, [bool(m) for m in batch["prompt_messages"]])
        texts = {name: [self.strip_eos(t) for t in batch[f"{name}_text"]] for name in self.names}
        ids = {name: self.encode_completions(texts[name]) for name in self.names}
        out: dict[str, list] = {
            "prompt_input_ids": [],
            "prompt_text": prompt_texts,
            "prompt_messages": list(batch["prompt_messages"]),
            "_prompt_truncated": [],
            "_dropped": [],
            "_error": errors,
            "_source": list(batch["_source"]),
        }
        for name in self.names:
            out[f"{name}_input_ids"], out[f"{name}_text"], out[f"_{name}_truncated"] = [], texts[name], []
        for i in range(size):
            fitted = fit_lengths(
                prompt_ids[i],
                [ids[name][i] for name in self.names],
                self.max_length,
                self.max_prompt_length,
                self.truncation,
                self.names,
            )
            out["prompt_input_ids"].append(fitted.prompt_ids)
            out["_prompt_truncated"].append(fitted.prompt_truncated)
            for name, completion, cut in zip(self.names, fitted.completion_ids, fitted.completion_truncated):
                out[f"{name}_input_ids"].append(completion)
                out[f"_{name}_truncated"].append(cut)
            reason = ""
            if fitted.dropped is not None and not errors[i]:
                reason = (
                    f"{batch['_source'][i]}: the prompt takes {len(fitted.prompt_ids)} of "
                    f"data.max_length={self.max_length} tokens, leaving no room for the {fitted.dropped} "
                    "completion"
                )
            out["_dropped"].append(reason)
        if self.kind == "revision_pairs":
            self._add_revision_prompts(batch, texts, out)
        return out

    def _add_revision_prompts(
        self, batch: dict[str, list], texts: dict[str, list[str]], out: dict[str, list]
    ) -> None:
        """``revise_<name>_prompt_input_ids``: the prompt asking to revise completion <name> (SRPO), truncated from
        the start to what the longer completion leaves of ``max_length``."""
        size = len(batch["prompt"])
        for name in self.names:
            rendered, ok = [], []
            for i in range(size):
                try:
                    rendered.append(
                        self.revision.render(
                            batch["prompt"][i],
                            batch["prompt_messages"][i],
                            texts[name][i],
                            self.tokenizer,
                            self.chat_template,
                        )
                    )
                    ok.append(True)
                except Exception as error:  # noqa: BLE001 - a chat template may reject the extra turns
                    if not out["_error"][i]:
                        out["_error"][i] = (
                            f'{batch["_source"][i]}: field "prompt": the chat template failed on the '
                            f"revision prompt: {error}"
                        )
                    rendered.append("")
                    ok.append(False)
            ids = self.encode_prompts(rendered, [bool(m) for m in batch["prompt_messages"]])
            column = []
            for i in range(size):
                budget = self.max_length - max(len(out[f"{n}_input_ids"][i]) for n in self.names)
                row = ids[i][max(len(ids[i]) - budget, 0) :] if budget > 0 else []
                if ok[i] and not row and not out["_dropped"][i]:
                    out["_dropped"][i] = (
                        f"{batch['_source'][i]}: data.max_length={self.max_length} leaves no room "
                        f"for the revision prompt of the {name} completion"
                    )
                column.append(row)
            out[f"revise_{name}_prompt_input_ids"] = column


def flag_columns(kind: str) -> list[str]:
    return [
        "_prompt_truncated",
        *(f"_{name}_truncated" for name in COMPLETIONS[kind]),
        "_dropped",
        "_error",
        "_source",
    ]
