"""No hub at hand: a model or dataset that is no local folder fails in seconds with one line.
And random JSONL thrown at the readers and validators raises nothing but their documented rules."""

from __future__ import annotations

import json
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubetune_trainer.config import TaskType
from kubetune_trainer.data import hub
from kubetune_trainer.data.modelinfo import load_tokenizer
from kubetune_trainer.data.records import Location, Problem, Record
from kubetune_trainer.data.rules import validate
from kubetune_trainer.data.sources import jsonl_value, read_records, split_lines
from kubetune_trainer.errors import UserError


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """A hub endpoint where nothing listens, and an empty cache."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)  # "acme/no-such-model" is no folder here
    import datasets  # noqa: F401 (imported before the clock starts: the imports are not what is timed)
    from transformers import AutoConfig, AutoTokenizer  # noqa: F401

    hub.reachable.cache_clear()
    yield
    hub.reachable.cache_clear()


@pytest.mark.parametrize("offline_env, reason", [
    (None, "no hub is reachable at http://127.0.0.1:9"),
    ("1", r"the hub is off \(HF_HUB_OFFLINE=1\)"),
])
def test_a_hub_model_without_a_hub_fails_in_seconds_with_one_line(no_hub, monkeypatch, tmp_path, offline_env, reason):
    if offline_env:
        monkeypatch.setenv("HF_HUB_OFFLINE", offline_env)
    start = time.monotonic()
    with pytest.raises(UserError) as failure:
        load_tokenizer("acme/no-such-model")
    assert time.monotonic() - start < 30  # the libraries' own retries take a minute or more
    message = str(failure.value)
    assert "\n" not in message and failure.value.reason == "ModelNotFound"
    assert message.startswith(f"model acme/no-such-model: no such local folder (a relative path, looked up "
                              f"from the working directory {tmp_path}), and not in the Hugging Face cache")
    assert re.search(reason, message) and "huggingface-cli download acme/no-such-model" in message


def test_a_hub_dataset_without_a_hub_fails_in_seconds_with_one_line(no_hub):
    start = time.monotonic()
    with pytest.raises(UserError, match=r"acme/missing/train: no such local folder .* while no hub is reachable"):
        list(read_records("acme/missing/train", TaskType.INSTRUCTION_FINETUNE))
    assert time.monotonic() - start < 30


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["prompt", "response", "completion", "messages", "role", "content", "text", "x"]),
        children, max_size=4),
    max_leaves=12)
lines = st.one_of(json_values.map(lambda value: json.dumps(value).encode()), st.binary(max_size=40))


@settings(max_examples=300, deadline=None)
@given(st.lists(lines, max_size=6), st.sampled_from(list(TaskType)), st.integers(1, 64))
def test_random_jsonl_gives_records_or_rules_never_an_exception(raw_lines, task, limit):
    import io

    data = b"\n".join(raw_lines)
    for number, line in split_lines(io.BytesIO(data), limit):
        value = jsonl_value(line) if isinstance(line, bytes) else None
        checked = validate(task, Record(Location("f.jsonl", number), value))
        assert isinstance(checked, Problem) or checked is not None
        if isinstance(checked, Problem):
            assert checked.rule and str(checked).startswith(f"f.jsonl:{number}: ")
