"""Row formats: detection, validation and normalisation into one internal shape.

Every supported row format becomes a :class:`NormalRow`: a prompt (a plain string, or a list of ``{role, content}``
messages for conversational data), the preference pairs the row yields (``chosen`` / ``rejected`` completion strings;
for conversational data the final assistant message's content), and one completion for SFT use.

Formats (``data.format``):

``pairs``           ``{"prompt": str, "chosen": str, "rejected": str}``; plain strings, no chat template. Optional
                    scalar rewards per completion ``chosen_score`` / ``rejected_score`` (also ``score_chosen`` /
                    ``score_rejected``, UltraFeedback-binarized's names), read by losses that need them (CoPG).
``triples``         ``{"prompt": str, "gold": str, "chosen": str, "rejected": str}``: a gold (best) completion
                    besides the pair (TPO; ``reference`` is accepted for ``gold``, the TPO code's name).
``conversational``  prompt/chosen/rejected as message lists; the prompt may be implicit (no ``prompt``: chosen and
                    rejected are whole conversations, the prompt is their longest common message prefix).
``hh``              Anthropic HH: chosen/rejected strings of ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` turns.
``rated``           ``{"prompt"|"instruction", "completions": [{"text"|"response"|..., "score"|"rating"|...}]}``.
``prompts``         ``{"prompt": str | messages}``.
``sft``             ``{"prompt", "completion"}`` (strings or messages) or ``{"messages": [...]}``.
``unpaired``        ``{"prompt", "completion", "label": true|false}`` (strings or messages, as ``sft``): one completion
                    judged desirable (``true``) or undesirable (``false``) on its own, KTO's data. Pair rows give
                    unpaired rows too: chosen with ``true``, rejected with ``false``.

Problems raise :class:`RowError` whose message names the field and the problem; the caller prefixes the file and
line/row.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

FORMATS = ("pairs", "conversational", "hh", "rated", "triples", "prompts", "sft", "unpaired")
PAIR_FORMATS = ("pairs", "conversational", "hh", "rated", "triples")
KIND_FORMATS = {
    "pairs": PAIR_FORMATS,
    "scored_pairs": PAIR_FORMATS,  # every pair must carry two scores; checked per row (prefopt.data._examples)
    "triples": ("triples", "rated"),
    "revision_pairs": PAIR_FORMATS,
    "reset_prompts": ("sft",) + PAIR_FORMATS,  # DR-PO resets to prefixes of the row's completion
    "sft": ("sft",) + PAIR_FORMATS,
    "unpaired": ("unpaired",) + PAIR_FORMATS,  # a pair gives a desirable and an undesirable row
    "prompts": FORMATS,
}
RATED_TEXT_KEYS = ("text", "response", "completion", "content", "messages")
RATED_SCORE_KEYS = ("score", "rating", "fine-grained_score", "overall_score")
PAIR_SCORE_KEYS = {
    "chosen": ("chosen_score", "score_chosen"),
    "rejected": ("rejected_score", "score_rejected"),
}
GOLD_KEYS = ("gold", "reference")

Messages = list[dict[str, str]]
Prompt = Union[str, Messages]


class RowError(ValueError):
    """One row's problem. ``code`` groups problems for statistics (missing, empty, type, identical, format, ...)."""

    def __init__(self, message: str, code: str = "invalid", field: Optional[str] = None):
        super().__init__(message)
        self.code = code
        self.field = field


@dataclass
class Pair:
    chosen: str
    rejected: str
    gap: Optional[float] = None  # score gap for pairs made from rated rows
    chosen_score: Optional[float] = None  # scalar reward of each completion, when the row gives one
    rejected_score: Optional[float] = None
    gold: Optional[str] = None  # the triple's gold completion (triples rows; rated rows: the best one)


@dataclass
class NormalRow:
    prompt: Prompt
    pairs: list[Pair] = field(default_factory=list)
    completion: Optional[str] = (
        None  # the SFT completion (pair rows: chosen; rated rows: the best-scored one)
    )
    rated: bool = False
    rated_skipped_identical: int = 0  # rated pairs left out because both texts were the same
    triple: Optional[Pair] = (
        None  # rated rows: gold = best, chosen = second, rejected = worst (>= 3 completions)
    )
    label: Optional[bool] = None  # unpaired rows: is ``completion`` desirable?

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


@dataclass(frozen=True)
class NormalizeOptions:
    rated_pairs: str = "best_worst"  # or "all"
    rated_min_gap: float = 0.0


DEFAULT_OPTIONS = NormalizeOptions()

# ---------------------------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------------------------


def detect_format(row: Any) -> str:
    """The format a row looks like, from its keys and value types."""
    if not isinstance(row, dict):
        raise RowError(f"expected an object (mapping of fields), got {_type_name(row)}", "type")
    keys = set(row)
    if "completions" in keys:
        return "rated"
    if (
        ("chosen" in keys or "rejected" in keys)
        and any(k in keys for k in GOLD_KEYS)
        and "prompt" in keys
        and not isinstance(row.get("prompt"), list)
    ):
        return "triples"
    if "chosen" in keys or "rejected" in keys:
        sample = row.get("chosen", row.get("rejected"))
        if "prompt" not in keys:
            return "conversational" if isinstance(sample, list) else "hh"
        if isinstance(row.get("prompt"), list) or isinstance(sample, list):
            return "conversational"
        return "pairs"
    if "label" in keys and ("completion" in keys or "messages" in keys):
        return "unpaired"
    if "completion" in keys or "messages" in keys:
        return "sft"
    if "prompt" in keys:
        return "prompts"
    shown = ", ".join(f'"{k}"' for k in sorted(map(str, keys))[:8]) or "none"
    raise RowError(
        f"row matches no known format (fields: {shown}); expected prompt/chosen/rejected (pairs, conversational), "
        "chosen/rejected (hh or implicit-prompt conversational), prompt/completions (rated), prompt/completion or "
        "messages (sft), prompt/completion/label (unpaired), or prompt (prompts)",
        "format",
    )


def check_kind(fmt: str, kind: str, source: str) -> None:
    """Raise ``ValueError`` when rows of ``fmt`` cannot make ``kind`` examples."""
    if fmt not in KIND_FORMATS[kind]:
        need = {
            "pairs": "preference pairs",
            "sft": "completions",
            "prompts": "prompts",
            "scored_pairs": "scored preference pairs",
            "triples": "gold/chosen/rejected triples",
            "revision_pairs": "preference pairs",
            "reset_prompts": "completions to reset to",
            "unpaired": 'completions labelled desirable or undesirable (a "label" field)',
        }[kind]
        raise ValueError(
            f"{source}: data format '{fmt}' has no {need}, but this run needs '{kind}' data "
            f"(formats that give it: {', '.join(KIND_FORMATS[kind])})"
        )


# ---------------------------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------------------------


def normalize_row(row: Any, fmt: str, options: NormalizeOptions = DEFAULT_OPTIONS) -> NormalRow:
    if not isinstance(row, dict):
        raise RowError(f"expected an object (mapping of fields), got {_type_name(row)}", "type")
    if fmt == "pairs":
        return _normalize_pairs(row)
    if fmt == "triples":
        return _normalize_triples(row)
    if fmt == "conversational":
        return _normalize_conversational(row)
    if fmt == "hh":
        return _normalize_hh(row)
    if fmt == "rated":
        return _normalize_rated(row, options)
    if fmt == "prompts":
        return NormalRow(prompt=_prompt(row, "prompt"))
    if fmt == "sft":
        return _normalize_sft(row)
    if fmt == "unpaired":
        return _normalize_unpaired(row)
    raise RowError(f"unknown data format '{fmt}'; valid: auto, {', '.join(FORMATS)}", "format")


def _normalize_pairs(row: dict) -> NormalRow:
    prompt = _string(row, "prompt", hint="for message lists use data.format=conversational")
    chosen = _string(row, "chosen", hint="for message lists use data.format=conversational")
    rejected = _string(row, "rejected", hint="for message lists use data.format=conversational")
    _check_distinct(chosen, rejected)
    return NormalRow(prompt=prompt, pairs=[Pair(chosen, rejected, **_pair_scores(row))], completion=chosen)


def _normalize_triples(row: dict) -> NormalRow:
    prompt = _string(row, "prompt", hint="triples rows take plain strings")
    key = next((k for k in GOLD_KEYS if k in row), None)
    if key is None:
        raise RowError(
            'field "gold" is missing (the best completion of a gold/chosen/rejected triple; '
            '"reference" is accepted too)',
            "missing",
            "gold",
        )
    gold = _string(row, key)
    chosen = _string(row, "chosen")
    rejected = _string(row, "rejected")
    _check_distinct(chosen, rejected)
    pair = Pair(chosen, rejected, gold=gold, **_pair_scores(row))
    return NormalRow(prompt=prompt, pairs=[pair], completion=gold)


def _pair_scores(row: dict) -> dict[str, Optional[float]]:
    """The optional ``chosen_score`` / ``rejected_score`` of a pair row (both or neither, finite numbers)."""
    scores: dict[str, Optional[float]] = {}
    for side, keys in PAIR_SCORE_KEYS.items():
        key = next((k for k in keys if row.get(k) is not None), None)
        value = None if key is None else row[key]
        if key is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
        ):
            raise RowError(f'field "{key}": expected a finite number, got {value!r}', "type", key)
        scores[f"{side}_score"] = None if value is None else float(value)
    if (scores["chosen_score"] is None) != (scores["rejected_score"] is None):
        missing = "chosen_score" if scores["chosen_score"] is None else "rejected_score"
        raise RowError(
            f'field "{missing}" is missing (give a score for both completions or for neither)',
            "missing",
            missing,
        )
    return scores


def _normalize_conversational(row: dict) -> NormalRow:
    chosen = _messages(_require(row, "chosen"), "chosen")
    rejected = _messages(_require(row, "rejected"), "rejected")
    prompt: Messages = []
    if "prompt" in row:
        value = _require(row, "prompt")
        prompt = (
            [{"role": "user", "content": _string(row, "prompt")}]
            if isinstance(value, str)
            else _messages(value, "prompt")
        )
    return _with_scores(_split_conversations(prompt, chosen, rejected, implicit="prompt" not in row), row)


def _normalize_hh(row: dict) -> NormalRow:
    chosen = _hh_messages(_string(row, "chosen"), "chosen")
    rejected = _hh_messages(_string(row, "rejected"), "rejected")
    return _split_conversations([], chosen, rejected, implicit=True)


def _split_conversations(prompt: Messages, chosen: Messages, rejected: Messages, implicit: bool) -> NormalRow:
    """prompt + shared prefix of chosen/rejected is the prompt; what remains must be one assistant reply each."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == len(chosen) == len(rejected):
        raise RowError('fields "chosen" and "rejected" are identical', "identical", "chosen")
    prompt = prompt + chosen[:shared]
    replies = []
    for name, rest in (("chosen", chosen[shared:]), ("rejected", rejected[shared:])):
        if len(rest) != 1:
            problem = (
                "has no reply after the prompt it shares with the other completion"
                if not rest
                else (
                    'and "rejected" differ before their final message (expected one assistant reply after the shared '
                    "prompt)"
                    if name == "chosen"
                    else 'and "chosen" differ before their final message'
                )
            )
            raise RowError(f'field "{name}" {problem}', "structure", name)
        if rest[0]["role"] != "assistant":
            raise RowError(
                f'field "{name}": the final message has role "{rest[0]["role"]}", expected "assistant"',
                "structure",
                name,
            )
        if not rest[0]["content"].strip():
            raise RowError(f'field "{name}": the final assistant message is empty', "empty", name)
        replies.append(rest[0]["content"])
    if not prompt:
        where = (
            "chosen and rejected share no messages before their replies"
            if implicit
            else "it is an empty list"
        )
        raise RowError(f'field "prompt" is empty ({where})', "empty", "prompt")
    _check_alternation(prompt, "chosen" if implicit else "prompt")
    _check_distinct(replies[0], replies[1])
    return NormalRow(prompt=prompt, pairs=[Pair(replies[0], replies[1])], completion=replies[0])


def _with_scores(result: NormalRow, row: dict) -> NormalRow:
    for pair in result.pairs:
        for key, value in _pair_scores(row).items():
            setattr(pair, key, value)
    return result


_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")


def _hh_messages(text: str, name: str) -> Messages:
    matches = list(_HH_TURN.finditer(text))
    if not matches or not any(m.group(1) == "Assistant" for m in matches):
        raise RowError(
            f'field "{name}": no "\\n\\nAssistant:" turn found (Anthropic HH format)', "structure", name
        )
    if text[: matches[0].start()].strip():
        raise RowError(
            f'field "{name}": text before the first "Human:" turn (Anthropic HH format)', "structure", name
        )
    messages = []
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        role = "user" if match.group(1) == "Human" else "assistant"
        messages.append({"role": role, "content": text[match.end() : end].strip()})
    return messages


def _normalize_rated(row: dict, options: NormalizeOptions) -> NormalRow:
    key = "prompt" if "prompt" in row or "instruction" not in row else "instruction"
    prompt = _prompt(row, key)
    completions = _require(row, "completions")
    if not isinstance(completions, list):
        raise RowError(
            f'field "completions": expected a list, got {_type_name(completions)}', "type", "completions"
        )
    if len(completions) < 2:
        raise RowError(
            f'field "completions": needs at least 2 rated completions, got {len(completions)}',
            "structure",
            "completions",
        )
    texts, scores = [], []
    for i, item in enumerate(completions):
        where = f"completions[{i}]"
        if not isinstance(item, dict):
            raise RowError(f'field "{where}": expected an object, got {_type_name(item)}', "type", where)
        text_key = next((k for k in RATED_TEXT_KEYS if k in item), None)
        if text_key is None:
            raise RowError(
                f'field "{where}.text" is missing (one of {_quoted(RATED_TEXT_KEYS)})', "missing", where
            )
        value = item[text_key]
        if isinstance(value, list):
            messages = _messages(value, f"{where}.{text_key}")
            if messages[-1]["role"] != "assistant":
                raise RowError(
                    f'field "{where}.{text_key}": the final message must have role "assistant"',
                    "structure",
                    where,
                )
            value = messages[-1]["content"]
        texts.append(_string({text_key: value}, text_key, label=f"{where}.{text_key}"))
        score_key = next((k for k in RATED_SCORE_KEYS if k in item and item[k] is not None), None)
        if score_key is None:
            raise RowError(
                f'field "{where}.score" is missing (one of {_quoted(RATED_SCORE_KEYS)})', "missing", where
            )
        score = item[score_key]
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise RowError(
                f'field "{where}.{score_key}": expected a finite number, got {score!r}', "type", where
            )
        scores.append(float(score))
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))  # first of the best
    result = NormalRow(prompt=prompt, completion=texts[best], rated=True)
    if options.rated_pairs == "best_worst":
        worst = min(range(len(scores)), key=lambda i: (scores[i], -i))  # last of the worst
        candidates = [(best, worst)]
    else:
        candidates = [
            (i, j) if scores[i] >= scores[j] else (j, i)
            for i in range(len(scores))
            for j in range(i + 1, len(scores))
        ]
    for hi, lo in candidates:
        gap = scores[hi] - scores[lo]
        if gap <= options.rated_min_gap or gap <= 0:
            continue
        if texts[hi] == texts[lo]:
            result.rated_skipped_identical += 1
            continue
        result.pairs.append(Pair(texts[hi], texts[lo], gap, scores[hi], scores[lo]))
    result.triple = _rated_triple(texts, scores)
    return result


def _rated_triple(texts: list[str], scores: list[float]) -> Optional[Pair]:
    """gold = best, chosen = second best, rejected = worst (TPO's use of UltraFeedback); None when the row has
    fewer than 3 completions, or the second and the worst tie or have the same text."""
    if len(texts) < 3:
        return None
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))  # best first; ties keep row order
    best, second, worst = order[0], order[1], order[-1]
    if scores[second] <= scores[worst] or texts[second] == texts[worst]:
        return None
    return Pair(
        texts[second],
        texts[worst],
        scores[second] - scores[worst],
        scores[second],
        scores[worst],
        gold=texts[best],
    )


def _normalize_sft(row: dict) -> NormalRow:
    if "completion" not in row and "messages" in row:
        messages = _messages(_require(row, "messages"), "messages")
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise RowError(
                'field "messages": expected a prompt followed by a final "assistant" message',
                "structure",
                "messages",
            )
        prompt, reply = messages[:-1], messages[-1]["content"]
    else:
        prompt = _prompt(row, "prompt")
        value = _require(row, "completion")
        if isinstance(value, list):
            messages = _messages(value, "completion")
            if messages[-1]["role"] != "assistant":
                raise RowError(
                    'field "completion": the final message must have role "assistant"',
                    "structure",
                    "completion",
                )
            if len(messages) > 1:
                if not isinstance(prompt, list):
                    raise RowError(
                        'field "completion": several messages need a message-list "prompt"',
                        "structure",
                        "completion",
                    )
                prompt = prompt + messages[:-1]
            reply = messages[-1]["content"]
        else:
            reply = _string(row, "completion")
    if not reply.strip():
        raise RowError('field "completion" is empty', "empty", "completion")
    if isinstance(prompt, list):
        _check_alternation(prompt, "messages" if "completion" not in row else "prompt")
    return NormalRow(prompt=prompt, completion=reply)


def _normalize_unpaired(row: dict) -> NormalRow:
    """An sft row plus its ``label``: ``true`` for a desirable completion, ``false`` for an undesirable one."""
    value = _require(row, "label")
    # JSON booleans only: a 0/1 or "yes" may be a score or a rating with another meaning; say so, do not guess.
    if not isinstance(value, bool):
        raise RowError(
            f'field "label": expected true (desirable) or false (undesirable), got {value!r} '
            f"({_type_name(value)})",
            "type",
            "label",
        )
    result = _normalize_sft(row)
    result.label = value
    return result


# ---------------------------------------------------------------------------------------------------------------
# Field checks
# ---------------------------------------------------------------------------------------------------------------


def _require(row: dict, name: str) -> Any:
    if name not in row:
        raise RowError(f'field "{name}" is missing', "missing", name)
    if row[name] is None:
        raise RowError(f'field "{name}" is empty (null)', "empty", name)
    return row[name]


def _string(row: dict, name: str, hint: str = "", label: Optional[str] = None) -> str:
    label = label or name
    value = _require(row, name)
    if not isinstance(value, str):
        extra = f"; {hint}" if hint and isinstance(value, list) else ""
        raise RowError(f'field "{label}": expected a string, got {_type_name(value)}{extra}', "type", label)
    if not value.strip():
        raise RowError(f'field "{label}" is empty', "empty", label)
    return value


def _prompt(row: dict, name: str) -> Prompt:
    value = _require(row, name)
    if isinstance(value, list):
        return _messages(value, name)
    if not isinstance(value, str):
        raise RowError(
            f'field "{name}": expected a string or a list of messages, got {_type_name(value)}', "type", name
        )
    return _string(row, name)


def _messages(value: Any, name: str) -> Messages:
    if not isinstance(value, list):
        raise RowError(f'field "{name}": expected a list of messages, got {_type_name(value)}', "type", name)
    if not value:
        raise RowError(f'field "{name}" is empty (no messages)', "empty", name)
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise RowError(
                f'field "{name}" message {i + 1}: expected an object with "role" and "content", got '
                f"{_type_name(message)}",
                "type",
                name,
            )
        for key in ("role", "content"):
            if key not in message or message[key] is None:
                raise RowError(f'field "{name}" message {i + 1}: "{key}" is missing', "missing", name)
        role, content = message["role"], message["content"]
        if not isinstance(role, str) or not role.strip():
            raise RowError(
                f'field "{name}" message {i + 1}: "role" must be a non-empty string, got {role!r}',
                "type",
                name,
            )
        if isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" for p in content
        ):
            content = "".join(str(p.get("text", "")) for p in content)  # text-only multimodal parts
        if not isinstance(content, str):
            raise RowError(
                f'field "{name}" message {i + 1}: "content" must be a string, got {_type_name(content)}',
                "type",
                name,
            )
        messages.append({"role": role, "content": content})
    return messages


_ALTERNATING = ("user", "assistant")


def _check_alternation(prompt: Messages, name: str) -> None:
    """The prompt before an assistant reply: an optional first system message, then user and assistant turns
    alternating and ending with a user turn. Chat templates render other orders silently wrong (or raise)."""
    previous = None
    for i, message in enumerate(prompt):
        role = message["role"]
        if role == "system":
            if i != 0:
                raise RowError(
                    f'field "{name}" message {i + 1}: a "system" message is only allowed first',
                    "structure",
                    name,
                )
            continue
        if role in _ALTERNATING and role == previous:
            raise RowError(
                f'field "{name}" message {i + 1}: role "{role}" follows another "{role}" message; '
                "user and assistant turns must alternate",
                "structure",
                name,
            )
        if previous is None and role == "assistant":
            raise RowError(
                f'field "{name}" message {i + 1}: the conversation starts with an "assistant" turn; '
                'it must start with "user" (after an optional "system" message)',
                "structure",
                name,
            )
        previous = role
    if previous == "assistant":
        raise RowError(
            f'field "{name}": the prompt ends with an "assistant" turn, so the reply would be a second '
            'assistant turn in a row; the last prompt message must be "user"',
            "structure",
            name,
        )


def _check_distinct(chosen: str, rejected: str) -> None:
    if chosen == rejected:
        raise RowError('fields "chosen" and "rejected" are identical', "identical", "chosen")


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {
        dict: "object",
        list: "list",
        str: "string",
        bool: "boolean",
        int: "integer",
        float: "number",
    }.get(type(value), type(value).__name__)


def _quoted(names: tuple[str, ...]) -> str:
    return ", ".join(f'"{n}"' for n in names)
