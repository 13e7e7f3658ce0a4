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
    if not condition:
        raise Invalid(rule)


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def require_text(value: Any, what: str) -> str:
    require(isinstance(value, str), f"{what} must be a string, got {type_name(value)}")
    require(value.strip() != "", f"{what} is empty")
    return value


def require_object(value: Any) -> dict:
    if isinstance(value, list):
        raise Invalid("record must be a JSON object, got a JSON array (JSONL holds one object per line: "
                      "jq -c '.[]' FILE.json > FILE.jsonl)")
    require(isinstance(value, dict), f"record must be a JSON object, got {type_name(value)}")
    return value


def found_keys(row: dict) -> str:
    """The keys a row has, for a missing-key message: a misspelling shows at once."""
    names = ", ".join(repr(str(key)) for key in list(row)[:8])
    return f" (it has {names})" if names else " (it is empty)"


def prompt_response(value: Any) -> PromptResponse:
    row = require_object(value)
    require("prompt" in row, f"missing key 'prompt'{found_keys(row)}")
    require(not ("response" in row and "completion" in row),
            "has both 'response' and 'completion' (give one)")
    key = "response" if "response" in row else "completion"
    require(key in row, f"missing key 'response' (or 'completion'){found_keys(row)}")
    return PromptResponse(require_text(row["prompt"], "'prompt'"), require_text(row[key], f"'{key}'"))


def message(value: Any, number: int) -> dict[str, str]:
    where = f"message {number}"
    require(isinstance(value, dict), f"{where} must be an object with 'role' and 'content', "
                                     f"got {type_name(value)}")
    for key in ("role", "content"):
        require(key in value, f"{where}: missing key '{key}'")
    role = value["role"]
    require(role in ROLES, f"{where}: unknown role {role!r} (expected system, user or assistant)")
    return {"role": role, "content": require_text(value["content"], f"{where}: content")}


def check_role_order(roles: list[str]) -> None:
    """System optional and first only; then user first; no two adjacent alike; assistant last.
    With two roles left, 'no two adjacent alike' is exactly user/assistant alternation."""
    for number, role in enumerate(roles[1:], start=2):
        require(role != "system", f"message {number}: 'system' is allowed only as the first message")
    turns = roles[1:] if roles[0] == "system" else roles
    if turns:
        first = len(roles) - len(turns) + 1
        require(turns[0] == "user", f"message {first}: the first turn must be 'user', got {turns[0]!r}")
    for number in range(2, len(roles) + 1):
        require(roles[number - 2] != roles[number - 1],
                f"messages {number - 1} and {number} both have role {roles[number - 1]!r}")
    require(roles[-1] == "assistant", f"the last message must be 'assistant', got {roles[-1]!r}")


def conversation(value: Any) -> Conversation:
    row = require_object(value)
    require("messages" in row, f"missing key 'messages'{found_keys(row)}")
    messages = row["messages"]
    require(isinstance(messages, list), f"'messages' must be a list, got {type_name(messages)}")
    require(len(messages) > 0, "'messages' is empty")
    clean = tuple(message(item, number) for number, item in enumerate(messages, start=1))
    check_role_order([item["role"] for item in clean])
    return Conversation(clean)


def text(value: Any) -> Text:
    if isinstance(value, dict):  # a table or dataset row for continued pre-training
        require("text" in value, f"missing key 'text'{found_keys(value)}")
        value = value["text"]
    return Text(require_text(value, "text"))


CHECKS = {
    TaskType.INSTRUCTION_FINETUNE: prompt_response,
    TaskType.CHAT_COMPLETION: conversation,
    TaskType.CONTINUED_PRETRAIN: text,
}


def validate(task: TaskType, record: Record) -> Example | Problem:
    if isinstance(record.value, Unreadable):
        return Problem(record.location, record.value.rule)
    try:
        return CHECKS[task](record.value)
    except Invalid as broken:
        return Problem(record.location, str(broken))
