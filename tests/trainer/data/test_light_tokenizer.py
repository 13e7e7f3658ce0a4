"""Data preparation reads a plain tokenizer folder without transformers, to the same samples."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from kubetune_trainer.data import light_tokenizer
from kubetune_trainer.data.encoding import chat_renderer, encode_batch
from kubetune_trainer.data.modelinfo import load_tokenizer, model_max_context
from kubetune_trainer.data.rules import Conversation, PromptResponse, Text

EXAMPLES = {
    "ift": [PromptResponse("### Q: one plus one?\n### A:", " two"), PromptResponse("Say  <s> twice", "<|end|> é ✓")],
    "chat": [Conversation(({"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"},
                           {"role": "assistant", "content": "four</s>"})),
             Conversation(({"role": "user", "content": "x"}, {"role": "assistant", "content": " y "}))],
    "cpt": [Text("A document.\n\nWith   spaces and <pad> in it."), Text("ü")],
}


def copy_model(source, target, **config_changes):
    shutil.copytree(source, target)
    path = target / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.update(config_changes)
    path.write_text(json.dumps(config))
    return target


def test_a_plain_folder_loads_without_importing_transformers_or_torch(tiny_model_dir):
    code = ("import sys; from kubetune_trainer.data.modelinfo import load_tokenizer as load; "
            f"t = load({str(tiny_model_dir)!r}); "
            "print(type(t).__name__, 'transformers' in sys.modules, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["LightTokenizer", "False", "False"]


@pytest.mark.parametrize("task", sorted(EXAMPLES))
def test_it_gives_the_samples_the_transformers_tokenizer_gives(tiny_model_dir, tokenizer, task):
    light = load_tokenizer(str(tiny_model_dir))
    assert isinstance(light, light_tokenizer.LightTokenizer)
    ours, theirs = encode_batch(light, EXAMPLES[task]), encode_batch(tokenizer, EXAMPLES[task])
    assert np.array_equal(ours.ids, theirs.ids) and np.array_equal(ours.lengths, theirs.lengths)
    assert np.array_equal(ours.mask, theirs.mask) and ours.refusals == theirs.refusals
    assert int(ours.mask.sum()) > 0


def test_special_tokens_chat_template_and_context_are_the_transformers_ones(tiny_model_dir, tokenizer):
    light = load_tokenizer(str(tiny_model_dir))
    assert (light.bos_token_id, light.eos_token_id, light.pad_token_id) == \
        (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert light.special_tokens_map == tokenizer.special_tokens_map
    assert light.model_max_length == tokenizer.model_max_length
    assert model_max_context(str(tiny_model_dir), light) == model_max_context(str(tiny_model_dir), tokenizer)
    messages = list(EXAMPLES["chat"][0].messages)
    for prompt in (False, True):
        assert chat_renderer(light)(messages, prompt) == \
            tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)


def test_a_template_in_the_config_with_generation_markers_renders_as_in_transformers(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] | tojson }}"
                "{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}{% endfor %}{{ eos_token }}")
    folder = copy_model(tiny_model_dir, tmp_path / "model", chat_template=template)
    (folder / "chat_template.jinja").unlink()
    light = light_tokenizer.load(folder)
    assert light is not None and light.chat_template == template
    messages = list(EXAMPLES["chat"][1].messages)
    reference = AutoTokenizer.from_pretrained(folder)
    assert chat_renderer(light)(messages, False) == reference.apply_chat_template(messages, tokenize=False)


@pytest.mark.parametrize("change", [
    {"tokenizer_class": "LlamaTokenizer"},  # its fast class rebuilds the post-processor
    {"additional_special_tokens": ["<|system|>", "<|brand-new|>"]},  # transformers would add it
    {"add_prefix_space": True},  # transformers would rebuild the pre-tokenizer
])
def test_other_layouts_are_left_to_transformers(tiny_model_dir, tmp_path, change):
    folder = copy_model(tiny_model_dir, tmp_path / "model", **change)
    assert light_tokenizer.load(folder) is None
    assert not isinstance(load_tokenizer(str(folder)), light_tokenizer.LightTokenizer)


def test_custom_tokenizer_code_is_left_to_transformers(tiny_model_dir, tmp_path):
    folder = copy_model(tiny_model_dir, tmp_path / "model", auto_map={"AutoTokenizer": ["x.Tok", None]})
    assert light_tokenizer.load(folder) is None
