"""The record rules of SPEC §4, one table row per rule, with the exact message."""

from __future__ import annotations

import pytest

from kubetune_trainer.config import TaskType
from kubetune_trainer.data.records import Location, Problem, Record, Unreadable
from kubetune_trainer.data.rules import Conversation, PromptResponse, Text, validate

IFT, CHAT, CPT = TaskType.INSTRUCTION_FINETUNE, TaskType.CHAT_COMPLETION, TaskType.CONTINUED_PRETRAIN
HERE = Location("data.jsonl", 3)


def rule(task, value) -> str:
    result = validate(task, Record(HERE, value))
    assert isinstance(result, Problem), f"expected a problem, got {result}"
    assert result.location == HERE
    return result.rule


def turn(role, content="text"):
    return {"role": role, "content": content}


def test_prompt_response_and_prompt_completion_are_accepted():
    assert validate(IFT, Record(HERE, {"prompt": "p", "response": "r"})) == PromptResponse("p", "r")
    assert validate(IFT, Record(HERE, {"prompt": "p", "completion": "c", "id": 1})) == PromptResponse("p", "c")


@pytest.mark.parametrize("value, message", [
    (["a"], "record must be a JSON object, got a JSON array (JSONL holds one object per line: "
            "jq -c '.[]' FILE.json > FILE.jsonl)"),
    ({"response": "r"}, "missing key 'prompt' (it has 'response')"),
    ({"prompt": "p", "respones": "r"}, "missing key 'response' (or 'completion') (it has 'prompt', 'respones')"),
    ({"prompt": "p", "response": "r", "completion": "c"}, "has both 'response' and 'completion' (give one)"),
    ({"prompt": 3, "response": "r"}, "'prompt' must be a string, got int"),
    ({"prompt": "p", "completion": None}, "'completion' must be a string, got null"),
    ({"prompt": " ", "response": "r"}, "'prompt' is empty"),
    ({"prompt": "p", "response": ""}, "'response' is empty"),
])
def test_prompt_response_rules(value, message):
    assert rule(IFT, value) == message


def test_conversations_with_and_without_system_are_accepted():
    plain = [turn("user"), turn("assistant"), turn("user"), turn("assistant")]
    for messages in (plain, [turn("system"), *plain]):
        result = validate(CHAT, Record(HERE, {"messages": [{**m, "name": "x"} for m in messages]}))
        assert result == Conversation(tuple(messages))  # extra keys dropped


@pytest.mark.parametrize("value, message", [
    ("hi", "record must be a JSON object, got str"),
    ({"conversation": []}, "missing key 'messages' (it has 'conversation')"),
    ({"messages": "hi"}, "'messages' must be a list, got str"),
    ({"messages": []}, "'messages' is empty"),
    ({"messages": ["hi", turn("assistant")]}, "message 1 must be an object with 'role' and 'content', got str"),
    ({"messages": [{"role": "user"}, turn("assistant")]}, "message 1: missing key 'content'"),
    ({"messages": [{"content": "x"}, turn("assistant")]}, "message 1: missing key 'role'"),
    ({"messages": [turn("user"), turn("bot")]}, "message 2: unknown role 'bot' (expected system, user or assistant)"),
    ({"messages": [turn("user", ""), turn("assistant")]}, "message 1: content is empty"),
    ({"messages": [turn("user"), turn("assistant", ["x"])]}, "message 2: content must be a string, got list"),
    ({"messages": [turn("user"), turn("system"), turn("assistant")]},
     "message 2: 'system' is allowed only as the first message"),
    ({"messages": [turn("system"), turn("system"), turn("assistant")]},
     "message 2: 'system' is allowed only as the first message"),
    ({"messages": [turn("assistant")]}, "message 1: the first turn must be 'user', got 'assistant'"),
    ({"messages": [turn("system"), turn("assistant")]}, "message 2: the first turn must be 'user', got 'assistant'"),
    ({"messages": [turn("user"), turn("user"), turn("assistant")]}, "messages 1 and 2 both have role 'user'"),
    ({"messages": [turn("user"), turn("assistant"), turn("assistant")]},
     "messages 2 and 3 both have role 'assistant'"),
    ({"messages": [turn("user"), turn("assistant"), turn("user")]}, "the last message must be 'assistant', got 'user'"),
    ({"messages": [turn("system")]}, "the last message must be 'assistant', got 'system'"),
])
def test_chat_rules(value, message):
    assert rule(CHAT, value) == message


def test_text_rules():
    assert validate(CPT, Record(HERE, "some text")) == Text("some text")
    assert validate(CPT, Record(HERE, {"text": "a row"})) == Text("a row")
    assert rule(CPT, " \n") == "text is empty"
    assert rule(CPT, {"body": "x"}) == "missing key 'text' (it has 'body')"
    assert rule(CPT, {"text": 5}) == "text must be a string, got int"


def test_unreadable_records_report_their_own_rule():
    assert rule(IFT, Unreadable("invalid JSON: Expecting value (column 1)")) == "invalid JSON: Expecting value (column 1)"


def test_problem_prints_file_line_rule():
    assert str(Problem(HERE, "missing key 'prompt'")) == "data.jsonl:3: missing key 'prompt'"
    assert str(Problem(Location("a/b.txt"), "text is empty")) == "a/b.txt: text is empty"
