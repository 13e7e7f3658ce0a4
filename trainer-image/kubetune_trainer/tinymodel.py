"""A tiny Llama-style model kit, for the quick start and the tests: nothing comes from a hub.

`build_tiny_model(out)` writes an ordinary Hugging Face folder (config, safetensors weights with
random values, a byte-level BPE tokenizer trained on the fly, a chat template, a generation
config) that `AutoModelForCausalLM` / `AutoTokenizer` load like any downloaded model.
"""

from __future__ import annotations

import random
from pathlib import Path

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
MAX_CONTEXT = 512

# A ChatML-like template: roles as special tokens, each turn closed by <|end|>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
# The same, refusing system messages the way some real templates (Mistral, Gemma) do.
NO_SYSTEM_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}"
    "{% endif %}" + CHAT_TEMPLATE
)

_WORDS = (
    "the a model learns from data each token predicts next word small large cluster node gpu "
    "train eval loss rate step batch epoch checkpoint resume register answer question user "
    "assistant system hello world kubernetes operator job pod service python tensor weight "
    "red green blue one two three four five six seven eight nine ten yes no why how what"
).split()


def _corpus(lines: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    text = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 16))) for _ in range(lines)]
    return text + ["0 1 2 3 4 5 6 7 8 9 . , ? ! : ; ' \" ( ) { } [ ] - + = / \\ \n"]


def build_tokenizer(vocab_size: int = 512, chat_template: str = CHAT_TEMPLATE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD, *CHAT_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no <unk>
        show_progress=False,
    )
    core.train_from_iterator(_corpus(), trainer=trainer)
    bos_id = core.token_to_id(BOS)
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=CHAT_TOKENS,
        chat_template=chat_template,
        model_max_length=MAX_CONTEXT,
    )


def build_tiny_model(
    out: str | Path,
    *,
    hidden_size: int = 64,
    layers: int = 2,
    max_context: int = MAX_CONTEXT,
    chat_template: str = CHAT_TEMPLATE,
    seed: int = 0,
) -> Path:
    """Write a random-weight Llama model and its tokenizer to `out`; return the folder."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out)
    tokenizer = build_tokenizer(chat_template=chat_template)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_context,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
