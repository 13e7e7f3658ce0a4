"""Examples -> token ids with a loss mask, per task type.

- prompt/response: prompt (with the tokenizer's special tokens, e.g. BOS) + response + EOS;
  loss on the response and EOS only. No template: the user bakes it into the prompt.
- chat: the model's chat template renders the conversation; loss on the assistant turns. The
  turns' character spans come from rendering prefixes of the conversation (the text added by
  turn i is render(messages[:i+1]) minus render(messages[:i], generation prompt)), so no
  `{% generation %}` markers are needed; templates that render prefixes inconsistently fall
  back to locating the contents in order. Token offsets map the spans to tokens.
- text: BOS + text + EOS, loss everywhere.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .packing import Sample
from .rules import Conversation, Example, PromptResponse, Text

Span = tuple[int, int]  # [start, end) in characters of the rendered text


class TemplateRefused(Exception):
    """The chat template cannot render this conversation; reported like a broken rule."""


def with_eos(ids: list[int], eos_id: int | None) -> list[int]:
    return ids + [eos_id] if eos_id is not None and (not ids or ids[-1] != eos_id) else ids


def sample(ids: Sequence[int], mask: Sequence[bool]) -> Sample:
    return Sample(np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=bool))


def encode_prompt_response(tokenizer: Any, example: PromptResponse) -> Sample:
    prompt = tokenizer(example.prompt)["input_ids"]
    response = with_eos(tokenizer(example.response, add_special_tokens=False)["input_ids"],
                        tokenizer.eos_token_id)
    return sample(prompt + response, [False] * len(prompt) + [True] * len(response))


def encode_text(tokenizer: Any, example: Text) -> Sample:
    ids = with_eos(tokenizer(example.text)["input_ids"], tokenizer.eos_token_id)
    return sample(ids, [True] * len(ids))


def render(tokenizer: Any, messages: Sequence[dict], generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as error:  # jinja's TemplateError, or any error the template's code raises
        raise TemplateRefused(f"the model's chat template refused the conversation: {error}") from error


def assistant_spans(tokenizer: Any, messages: Sequence[dict], full: str) -> list[Span]:
    """Character spans of the assistant turns in `full` (the rendered conversation)."""
    spans = prefix_spans(tokenizer, messages, full)
    return spans if spans is not None else content_spans(messages, full)


def prefix_spans(tokenizer: Any, messages: Sequence[dict], full: str) -> list[Span] | None:
    """Spans from prefix renders; None when the template renders prefixes inconsistently."""
    spans: list[Span] = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:index], generation_prompt=True)
        through = render(tokenizer, messages[: index + 1])
        if not (full.startswith(through) and through.startswith(before) and len(before) < len(through)):
            return None
        spans.append((len(before), len(through)))
    return spans


def content_spans(messages: Sequence[dict], full: str) -> list[Span]:
    """Fallback: find every message's content in order; the assistant ones are the spans."""
    spans: list[Span] = []
    cursor = 0
    for number, message in enumerate(messages, start=1):
        content = message["content"].strip()  # templates often trim contents
        start = full.find(content, cursor)
        if start < 0:
            raise TemplateRefused(f"the model's chat template drops the content of message {number}")
        cursor = start + len(content)
        if message["role"] == "assistant":
            spans.append((start, cursor))
    return spans


def encode_conversation(tokenizer: Any, example: Conversation) -> Sample:
    full = render(tokenizer, example.messages)
    spans = assistant_spans(tokenizer, example.messages, full)
    # The template writes the special tokens (BOS...) itself: do not add them a second time.
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    offsets = np.asarray(encoded["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    mask = np.zeros(len(offsets), dtype=bool)
    for start, end in spans:  # a token that holds any character of a turn is learned
        mask |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
    return sample(encoded["input_ids"], mask)


def encode(tokenizer: Any, example: Example) -> Sample:
    if isinstance(example, PromptResponse):
        return encode_prompt_response(tokenizer, example)
    if isinstance(example, Conversation):
        return encode_conversation(tokenizer, example)
    return encode_text(tokenizer, example)


def truncate(item: Sample, context_length: int) -> tuple[Sample, bool]:
    """Keep the first `context_length` tokens; say whether anything was cut."""
    if len(item) <= context_length:
        return item, False
    return Sample(item.input_ids[:context_length], item.loss_mask[:context_length]), True
