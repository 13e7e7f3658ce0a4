"""Tokenization and loss masks with the tiny model's real tokenizer and chat template."""

from __future__ import annotations

import copy

import pytest

from kubetune_trainer.data.encoding import TemplateRefused, encode_one, truncate
from kubetune_trainer.data.rules import Conversation, PromptResponse, Text


def decode(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def learned_runs(tokenizer, sample) -> list[str]:
    """The text of each maximal run of learned tokens."""
    runs, current = [], []
    for token, learned in zip(sample.input_ids, sample.loss_mask):
        if learned:
            current.append(token)
        elif current:
            runs, current = runs + [decode(tokenizer, current)], []
    return runs + ([decode(tokenizer, current)] if current else [])


def conversation(*pairs, system=None):
    messages = [{"role": "system", "content": system}] if system else []
    for user, assistant in pairs:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return Conversation(tuple(messages))


def test_prompt_response_learns_the_response_and_eos_only(tokenizer):
    sample = encode_one(tokenizer, PromptResponse("### Q: one plus one?\n### A:", " two"))
    assert sample.input_ids[0] == tokenizer.bos_token_id and sample.input_ids[-1] == tokenizer.eos_token_id
    assert learned_runs(tokenizer, sample) == [" two</s>"]
    assert decode(tokenizer, sample.input_ids[~sample.loss_mask]) == "<s>### Q: one plus one?\n### A:"


def test_chat_learns_each_assistant_turn_with_its_end_token(tokenizer):
    example = conversation(("hi there", "hello, how can I help?"), ("one plus one?", "two."), system="Be brief.")
    sample = encode_one(tokenizer, example)
    assert learned_runs(tokenizer, sample) == ["hello, how can I help?<|end|>\n", "two.<|end|>\n"]
    full = tokenizer.apply_chat_template(list(example.messages), tokenize=False)
    assert decode(tokenizer, sample.input_ids) == full
    assert sample.input_ids.tolist().count(tokenizer.bos_token_id) == 1  # the template's, not twice


def test_chat_spans_are_found_when_prefixes_render_differently(tokenizer):
    # A template whose output depends on the conversation length: prefixes are not prefixes, so
    # the spans come from the contents, found in order ("yes" inside "say yes" is not a turn);
    # the byte-level token " yes" carries the space before the content.
    odd = copy.deepcopy(tokenizer)
    odd.chat_template = ("{{ messages | length }} turns\n{% for m in messages %}"
                         "[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    sample = encode_one(odd, conversation(("say yes", "yes"), ("say yes again", "yes again")))
    assert learned_runs(odd, sample) == [" yes", " yes again"]


def test_a_template_refusing_system_messages_is_a_refusal_not_a_crash(no_system_tokenizer):
    with pytest.raises(TemplateRefused, match="chat template refused the conversation: System role not supported"):
        encode_one(no_system_tokenizer, conversation(("hi", "hello"), system="Be brief."))
    assert encode_one(no_system_tokenizer, conversation(("hi", "hello"))).loss_mask.any()


def test_text_is_learned_entirely_between_bos_and_eos(tokenizer):
    sample = encode_one(tokenizer, Text("a model learns from data"))
    assert sample.loss_mask.all()
    assert decode(tokenizer, sample.input_ids) == "<s>a model learns from data</s>"


def test_truncation_keeps_the_start_and_says_so(tokenizer):
    sample = encode_one(tokenizer, Text("one two three four five six seven eight nine ten"))
    cut, truncated = truncate(sample, 4)
    assert truncated and cut.input_ids.tolist() == sample.input_ids[:4].tolist() and len(cut.loss_mask) == 4
    same, truncated = truncate(sample, len(sample))
    assert not truncated and same is sample
