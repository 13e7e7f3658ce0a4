"""One render of a conversation gives the text and spans a render per prefix gives."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest

from kubetune_trainer.data.encoding import ChatRenderer, chat_renderer, encode_batch, prefix_spans
from kubetune_trainer.data.one_render import spans_from_starts, walks_in_order
from kubetune_trainer.data.rules import Conversation

LOOP = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
PROMPT = "{% if add_generation_prompt %}<assistant>{% endif %}"


def environment():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment()


@pytest.mark.parametrize("source, in_order", [
    (LOOP + PROMPT, True),
    ("{% if messages[0]['role'] == 'system' %}S{% endif %}" + LOOP, True),
    ("{% for m in messages %}{{ loop.index0 }}{% if loop.first %}F{% endif %}{{ m['content'] }}{% endfor %}", True),
    ("{{ messages | length }}" + LOOP, False),
    ("{% for m in messages %}{% if loop.last %}L{% endif %}{{ m['content'] }}{% endfor %}", False),
    ("{% set messages = messages[1:] %}" + LOOP, False),
    ("{{ messages[-1]['content'] }}" + LOOP, False),
    (LOOP + LOOP, False),
    ("{% set ns = namespace(x='') %}{% for m in messages %}{% set ns.x = m['content'] %}{% endfor %}{{ ns.x }}", False),
])
def test_templates_that_write_messages_in_order_are_told_apart(source, in_order):
    assert walks_in_order(source, environment()) is in_order


def conversations(count: int, seed: int = 3) -> list[Conversation]:
    rng = random.Random(seed)
    words = ["hello", " two", "three\n", "  four", "five six", "<|end|>", "é ✓", "the model"]
    out = []
    for _ in range(count):
        messages = [{"role": "system", "content": rng.choice(words)}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 4)):
            messages.append({"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(1, 5)))})
            messages.append({"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 8)))})
        out.append(Conversation(tuple(messages)))
    return out


def test_the_tiny_template_takes_one_render_with_the_same_samples(tokenizer):
    once = chat_renderer(tokenizer)
    assert once.one_pass is not None and once.prompt == "<|assistant|>\n"
    per_prefix = ChatRenderer(once.render)
    examples = conversations(60)
    for example in examples:
        full = per_prefix(example.messages)
        assert once.rendered(example.messages) == (full, prefix_spans(once.render, example.messages, full))
    ours, theirs = encode_batch(tokenizer, examples, once), encode_batch(tokenizer, examples, per_prefix)
    assert np.array_equal(ours.ids, theirs.ids) and np.array_equal(ours.mask, theirs.mask)
    assert np.array_equal(ours.lengths, theirs.lengths) and ours.mask.sum() > 0


@pytest.mark.parametrize("template", [
    "{% for m in messages %}{% if loop.last %}!{% endif %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}",  # looks ahead: refused by the tree
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}{{ eos_token }}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}",  # writes after the loop: refused by the probes
])
def test_other_templates_render_per_prefix_and_find_the_same_spans(tokenizer, template):
    odd = copy.deepcopy(tokenizer)
    odd.chat_template = template
    renderer = chat_renderer(odd)
    assert renderer.one_pass is None
    for example in conversations(10):
        full, spans = renderer.rendered(example.messages)
        assert full == odd.apply_chat_template(list(example.messages), tokenize=False) and spans


def test_a_template_refusing_system_messages_still_takes_one_render(no_system_tokenizer):
    renderer = chat_renderer(no_system_tokenizer)
    assert renderer.one_pass is not None  # verified on the probes without a system message


def test_a_span_without_the_generation_prompt_before_it_is_not_taken():
    messages = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    full = "<user>u</s><assistant>a</s>"
    assert spans_from_starts(messages, full, [0, 11], "<assistant>") == [(22, 27)]
    assert spans_from_starts(messages, full, [0, 10], "<assistant>") is None  # not where the prompt is
    assert spans_from_starts(messages, full, [0], "<assistant>") is None  # a message not taken from the loop
    assert spans_from_starts(messages, full, [0, 16], "<assistant>") is None  # nothing after the prompt
