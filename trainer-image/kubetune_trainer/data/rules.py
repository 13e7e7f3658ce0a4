"""The record rules of SPEC §4, per task type. Pure: a raw value in, a clean example or the
first broken rule out (one problem per record keeps the report short and readable)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

from ..config import TaskType
from .records import Problem, Record, Unreadable

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class PromptResponse:
    prompt: str
    response: str


@dataclass(frozen=True)
class Conversation:
    messages: tuple[dict[str, str], ...]  # only role and content, validated


@dataclass(frozen=True)
class Text:
    text: str


Example = Union[PromptResponse, Conversation, Text]


class Invalid(Exception):
    """One broken rule; the message is the rule as the report shows it."""


def require(condition: bool, rule: str) -> None:
    """For constant rules; a rule with details to format is raised where it breaks, so that
    the millions of records that keep it do not pay for formatting it."""
    if not condition:
        raise Invalid(rule)


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def require_text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise Invalid(f"{what} must be a string, got {type_name(value)}")
    if not value or value.isspace():  # what strip() would leave empty, without copying the text
        raise Invalid(f"{what} is empty")
    return value


def require_object(value: Any) -> dict:
    if isinstance(value, list):
        raise Invalid("record must be a JSON object, got a JSON array (JSONL holds one object per line: "
                      "jq -c '.[]' FILE.json > FILE.jsonl)")
    if not isinstance(value, dict):
        raise Invalid(f"record must be a JSON object, got {type_name(value)}")
    return value


def found_keys(row: dict) -> str:
    """The keys a row has, for a missing-key message: a misspelling shows at once."""
    names = ", ".join(repr(str(key)) for key in list(row)[:8])
    return f" (it has {names})" if names else " (it is empty)"


def prompt_response(value: Any) -> PromptResponse:
    row = require_object(value)
    if "prompt" not in row:
        raise Invalid(f"missing key 'prompt'{found_keys(row)}")
    require(not ("response" in row and "completion" in row),
            "has both 'response' and 'completion' (give one)")
    key = "response" if "response" in row else "completion"
    if key not in row:
        raise Invalid(f"missing key 'response' (or 'completion'){found_keys(row)}")
    return PromptResponse(require_text(row["prompt"], "'prompt'"),
                          require_text(row[key], "'response'" if key == "response" else "'completion'"))


def message(value: Any, number: int) -> dict[str, str]:
    if not isinstance(value, dict):
        raise Invalid(f"message {number} must be an object with 'role' and 'content', got {type_name(value)}")
    for key in ("role", "content"):
        if key not in value:
            raise Invalid(f"message {number}: missing key '{key}'")
    role = value["role"]
    if role not in ROLES:
        raise Invalid(f"message {number}: unknown role {role!r} (expected system, user or assistant)")
    return {"role": role, "content": require_text(value["content"], f"message {number}: content")}


def check_role_order(roles: list[str]) -> None:
    """System optional and first only; then user first; no two adjacent alike; assistant last.
    With two roles left, 'no two adjacent alike' is exactly user/assistant alternation."""
    for number, role in enumerate(roles[1:], start=2):
        if role == "system":
            raise Invalid(f"message {number}: 'system' is allowed only as the first message")
    turns = roles[1:] if roles[0] == "system" else roles
    if turns and turns[0] != "user":
        raise Invalid(f"message {len(roles) - len(turns) + 1}: the first turn must be 'user', got {turns[0]!r}")
    for number in range(2, len(roles) + 1):
        if roles[number - 2] == roles[number - 1]:
            raise Invalid(f"messages {number - 1} and {number} both have role {roles[number - 1]!r}")
    if roles[-1] != "assistant":
        raise Invalid(f"the last message must be 'assistant', got {roles[-1]!r}")


def conversation(value: Any) -> Conversation:
    row = require_object(value)
    if "messages" not in row:
        raise Invalid(f"missing key 'messages'{found_keys(row)}")
    messages = row["messages"]
    if not isinstance(messages, list):
        raise Invalid(f"'messages' must be a list, got {type_name(messages)}")
    require(len(messages) > 0, "'messages' is empty")
    clean = tuple([message(item, number) for number, item in enumerate(messages, start=1)])
    check_role_order([item["role"] for item in clean])
    return Conversation(clean)


def text(value: Any) -> Text:
    if isinstance(value, dict):  # a table or dataset row for continued pre-training
        if "text" not in value:
            raise Invalid(f"missing key 'text'{found_keys(value)}")
        value = value["text"]
    return Text(require_text(value, "text"))


CHECKS = {
    TaskType.INSTRUCTION_FINETUNE: prompt_response,
    TaskType.CHAT_COMPLETION: conversation,
    TaskType.CONTINUED_PRETRAIN: text,
}


def check(task: TaskType, value: Any) -> Example | str:
    """The clean example, or the first rule the value breaks."""
    if isinstance(value, Unreadable):
        return value.rule
    try:
        return CHECKS[task](value)
    except Invalid as broken:
        return str(broken)


def validate(task: TaskType, record: Record) -> Example | Problem:
    checked = check(task, record.value)
    return Problem(record.location, checked) if isinstance(checked, str) else checked
