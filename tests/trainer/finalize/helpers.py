"""Helpers of the finalize tests (importable, unlike conftest.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

# Run in a fresh interpreter in isolated mode (-I: no PYTHONPATH, no cwd on sys.path), so only
# `transformers` reads the folder: what a user of the converted model would do.
LOAD_AND_GENERATE = """
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

folder = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(folder)
tokenizer = AutoTokenizer.from_pretrained(folder)
prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hello model"}],
                                       add_generation_prompt=True, return_tensors="pt")
output = model.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)
print(json.dumps({
    "new_tokens": output.shape[1] - prompt.shape[1],
    "text": tokenizer.decode(output[0]),
    "kubetune_imported": any(name.startswith("kubetune") for name in sys.modules),
    "eos_token_id": model.generation_config.eos_token_id,
}))
"""


def load_and_generate(folder: Path) -> dict:
    done = subprocess.run([sys.executable, "-I", "-c", LOAD_AND_GENERATE, str(folder)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def make_config(work_dir: Path, model_dir: Path, **overrides):
    from kubetune_trainer.config import RunConfig

    fields = dict(run_name="tiny-run", run_uid="0b7c8a52-5c1e-4a7e-9d2e-000000000001",
                  namespace="team-a", model=str(model_dir), train_data_path="/data/train.jsonl",
                  work_dir=str(work_dir), experiment_path="/Users/team-a/tiny-run",
                  register_to="main.finetunes.tiny")
    return RunConfig(**{**fields, **overrides})
