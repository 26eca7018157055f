"""Build a tiny Llama-architecture causal LM and a locally trained BPE tokenizer, entirely offline.

The result is an ordinary Hugging Face checkpoint directory (``config.json``, ``model.safetensors``,
``tokenizer.json``, a chat template) that loads back through ``AutoModelForCausalLM.from_pretrained(path)`` and
``AutoTokenizer.from_pretrained(path)`` with ``HF_HUB_OFFLINE=1``. Tests, the demo and the benchmarks use it so
that nothing needs the Hub.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from pathlib import Path
from typing import Optional

# A ChatML-style template: every message is "<|im_start|>role\ncontent<|im_end|>\n"; the generation prompt opens
# an assistant turn. The assistant turn ends with <|im_end|>, which is also the EOS token, so a completion's
# last token is the end of its turn.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_BUILTIN_CORPUS = """\
The quick brown fox jumps over the lazy dog. A review of the film: the acting was wonderful and the story was
moving, although the ending felt rushed. I would recommend it to anyone who enjoys a thoughtful drama.
Question: what is two plus three? Answer: five. Question: name a colour of the sky. Answer: blue.
The movie was boring, the plot was weak and the characters were dull. Terrible pacing and awful dialogue.
An excellent, brilliant, delightful and charming performance; a superb, beautiful and memorable picture.
Please summarise the following text in one sentence. The assistant answers helpfully and honestly.
user assistant system hello thanks please sorry yes no maybe good bad great poor fine nice
"""


def _default_corpus() -> list[str]:
    lines = [line for line in _BUILTIN_CORPUS.splitlines() if line.strip()]
    try:  # the synthetic gold task's vocabulary, when data_tools is importable, keeps its words whole tokens
        from data_tools.synth import corpus_lines

        lines.extend(corpus_lines())
    except Exception:  # noqa: BLE001 - the builtin corpus alone is enough for a working tokenizer
        pass
    return lines


def train_tiny_tokenizer(corpus: Optional[Iterable[str]] = None, vocab_size: int = 1024):
    """Train a byte-level BPE tokenizer on ``corpus`` and wrap it as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    lines = list(corpus) if corpus is not None else _default_corpus()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeat the corpus so that merges have counts to work with even for a handful of lines.
    tokenizer.train_from_iterator(itertools.chain.from_iterable([lines] * 4), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        bos_token="<|endoftext|>",
        unk_token=None,
    )
    wrapped.chat_template = TINY_CHAT_TEMPLATE
    wrapped.padding_side = "right"
    return wrapped


def tiny_llama_config(
    tokenizer,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 256,
    max_position_embeddings: int = 1024,
    **extra,
):
    """The ``LlamaConfig`` of the tiny models (causal LM and reward model), sized to ``tokenizer``."""
    from transformers import LlamaConfig

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=pad_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        **extra,
    )


def build_tiny_model(
    out_dir: str | Path,
    *,
    corpus: Optional[Iterable[str]] = None,
    vocab_size: int = 1024,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 256,
    max_position_embeddings: int = 1024,
    seed: int = 0,
    tokenizer=None,
) -> Path:
    """Create and save a tiny ``LlamaForCausalLM`` plus tokenizer at ``out_dir``; returns the path.

    ``tokenizer``: reuse an existing tokenizer (e.g. the benchmarks' larger vocabularies) instead of training one.
    """
    import torch
    from transformers import LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        tokenizer = train_tiny_tokenizer(corpus, vocab_size=vocab_size)
    config = tiny_llama_config(
        tokenizer,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def build_tiny_reward_model(
    out_dir,
    tokenizer_dir,
    *,
    init_from: str | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 256,
    seed: int = 0,
) -> Path:
    """Save a tiny ``LlamaForSequenceClassification`` (one label, ``pad_token_id`` set) plus the tokenizer of
    ``tokenizer_dir`` at ``out_dir``. ``init_from``: start the backbone from that causal LM (the usual RM recipe:
    RM = SFT model + fresh head) instead of random weights."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(seed)
    if init_from is not None:
        model = AutoModelForSequenceClassification.from_pretrained(
            init_from, num_labels=1, pad_token_id=pad_id
        )
    else:
        config = tiny_llama_config(
            tokenizer,
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_heads=num_heads,
            intermediate_size=intermediate_size,
            num_labels=1,
        )
        model = AutoModelForSequenceClassification.from_config(config)
    model.config.pad_token_id = pad_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
