"""The revision prompt of self-improving methods (SRPO): the original prompt, an answer, and a request to
improve it.

One model plays two roles in SRPO: it answers a prompt ``x``, and, given ``x`` and an answer ``y``, writes a
better
answer ``y'``. The second role sees the prompt built here. Plain-text rows use ``data.revision_template`` with
the
placeholders ``{prompt}`` and ``{answer}`` (replaced literally, so braces in the data are safe);
conversational rows
append the answer as an assistant turn and ``data.revision_instruction`` as a user turn, then apply the chat
template with the generation prompt. Training (``revision_pairs`` data) and the revision loop at evaluation
(``prefopt.evaluate``) render the same prompt, so what the model learns to revise is what it is asked to
revise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

# The plain default repeats the prompt after the instruction, so a plain LM continues with an answer of the
# same form.
DEFAULT_REVISION_TEMPLATE = "{prompt}{answer}\n\nA better answer:\n{prompt}"
DEFAULT_REVISION_INSTRUCTION = (
    "Revise your answer above to make it better. Reply with the improved answer only."
)


@dataclass(frozen=True)
class RevisionTemplate:
    template: str = DEFAULT_REVISION_TEMPLATE
    instruction: str = DEFAULT_REVISION_INSTRUCTION

    @classmethod
    def from_config(cls, data_cfg) -> RevisionTemplate:
        return cls(
            getattr(data_cfg, "revision_template", DEFAULT_REVISION_TEMPLATE),
            getattr(data_cfg, "revision_instruction", DEFAULT_REVISION_INSTRUCTION),
        )

    def render(
        self,
        prompt: str,
        prompt_messages: str,
        answer: str,
        tokenizer=None,
        chat_template: Optional[str] = None,
    ) -> str:
        """The revision prompt for ``answer`` to the prompt (``prompt_messages``: JSON messages or "")."""
        if not prompt_messages:
            return self.template.replace("{prompt}", prompt).replace("{answer}", answer)
        messages = json.loads(prompt_messages) + [
            {"role": "assistant", "content": answer},
            {"role": "user", "content": self.instruction},
        ]
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, chat_template=chat_template
        )
        if not isinstance(text, str):
            raise TypeError(f"chat template rendering returned {type(text).__name__}, not a string")
        return text


def check_template(template: str) -> str:
    """A plain revision template must place both the answer and the prompt (a config error otherwise)."""
    missing = [name for name in ("{prompt}", "{answer}") if name not in template]
    if missing:
        raise ValueError(f"data.revision_template must contain {' and '.join(missing)} (got {template!r})")
    return template
