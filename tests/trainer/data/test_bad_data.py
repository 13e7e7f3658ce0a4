"""A corpus of bad data files, each refused by `kubetune validate` with `file:line` and the rule
(or, for a whole-file or folder problem, the file or folder and what is wrong), no traceback;
`kubetune run --local` gives the same lines; files most tools accept (a BOM, CRLF) are accepted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kubetune.cli import main

REPO = Path(__file__).resolve().parents[3]
IFT, CHAT, CPT = "INSTRUCTION_FINETUNE", "CHAT_COMPLETION", "CONTINUED_PRETRAIN"
GOOD = '{"prompt": "one plus one?", "response": " two"}'
MiB = 2**20


def chat(*turns, **extra) -> str:
    return json.dumps({"messages": [{"role": role, "content": content} for role, content in turns], **extra})


def hi(reply: str = "hello") -> list[tuple[str, str]]:
    return [("user", "hi"), ("assistant", reply)]


def lines(*items: str) -> bytes:
    return "".join(f"{item}\n" for item in items).encode()


def nested(depth: int) -> bytes:
    return b'{"prompt": ' + b"[" * depth + b"]" * depth + b', "response": "r"}\n'


def symlink_loop(folder: Path) -> None:
    os.symlink(folder / "b.jsonl", folder / "a.jsonl")
    os.symlink(folder / "a.jsonl", folder / "b.jsonl")


# id, task, files under the data folder ({name: bytes}, or a function of the folder), what to point
# the run at ("" for the folder), and the message; {data} stands for the data path.
CASES = [
    ("malformed-json", IFT, {"d.jsonl": lines(GOOD, '{"prompt": "a", "response": }')}, "d.jsonl",
     "{data}:2: invalid JSON: Expecting value (column 29)"),
    ("json-array-one-line", IFT, {"d.json": b'[' + GOOD.encode() + b']'}, "d.json",
     "{data}:1: record must be a JSON object, got a JSON array (JSONL holds one object per line"),
    ("json-array-pretty", IFT, {"d.jsonl": b"[\n  " + GOOD.encode() + b"\n]\n"}, "d.jsonl",
     "{data}:1: invalid JSON: Expecting value (column 2); a JSON array? JSONL needs one object per line"),
    ("missing-prompt", IFT, {"d.jsonl": lines('{"response": "r"}')}, "d.jsonl",
     "{data}:1: missing key 'prompt' (it has 'response')"),
    ("misspelled-response", IFT, {"d.jsonl": lines('{"prompt": "p", "respones": "r"}')}, "d.jsonl",
     "{data}:1: missing key 'response' (or 'completion') (it has 'prompt', 'respones')"),
    ("response-and-completion", IFT, {"d.jsonl": lines('{"prompt": "p", "response": "r", "completion": "c"}')},
     "d.jsonl", "{data}:1: has both 'response' and 'completion' (give one)"),
    ("empty-object", IFT, {"d.jsonl": lines("{}")}, "d.jsonl", "{data}:1: missing key 'prompt' (it is empty)"),
    ("prompt-not-string", IFT, {"d.jsonl": lines('{"prompt": 3, "response": "r"}')}, "d.jsonl",
     "{data}:1: 'prompt' must be a string, got int"),
    ("response-null", IFT, {"d.jsonl": lines('{"prompt": "p", "response": null}')}, "d.jsonl",
     "{data}:1: 'response' must be a string, got null"),
    ("response-list", IFT, {"d.jsonl": lines('{"prompt": "p", "response": ["r"]}')}, "d.jsonl",
     "{data}:1: 'response' must be a string, got list"),
    ("empty-prompt", IFT, {"d.jsonl": lines('{"prompt": "", "response": "r"}')}, "d.jsonl",
     "{data}:1: 'prompt' is empty"),
    ("blank-response", IFT, {"d.jsonl": lines('{"prompt": "p", "response": " \\n "}')}, "d.jsonl",
     "{data}:1: 'response' is empty"),
    ("record-is-a-string", IFT, {"d.jsonl": lines('"just text"')}, "d.jsonl",
     "{data}:1: record must be a JSON object, got str"),
    ("record-is-a-number", IFT, {"d.jsonl": lines("42")}, "d.jsonl", "{data}:1: record must be a JSON object, got int"),
    ("not-utf8", IFT, {"d.jsonl": b'{"prompt": "caf\xe9", "response": "r"}\n'}, "d.jsonl",
     "{data}:1: line is not valid UTF-8 (byte 0xe9 at byte 16); save the file as UTF-8"),
    ("utf16", IFT, {"d.jsonl": (GOOD + "\n").encode("utf-16")}, "d.jsonl",
     "{data}:1: line is not valid UTF-8 (byte 0xff at byte 1)"),
    ("nested-100000-deep", IFT, {"d.jsonl": nested(100_000)}, "d.jsonl",
     "{data}:1: JSON nested too deeply to read (over 500 levels)"),
    ("50MB-line", IFT, {"d.jsonl": lines(GOOD) + b'{"prompt": "' + b"x" * (50 * MiB) + b'", "response": "r"}\n'},
     "d.jsonl", "{data}:2: line is 52,428,831 bytes, over the limit of 8,388,608 bytes per record; it is not read"),
    ("empty-file", IFT, {"d.jsonl": b""}, "d.jsonl", "{data}: no records found (train data)"),
    ("blank-lines-only", IFT, {"d.jsonl": b"\n  \n\r\n"}, "d.jsonl", "{data}: no records found (train data)"),
    ("empty-folder", IFT, {}, "", "{data}: no .jsonl files in this folder (it is empty); INSTRUCTION_FINETUNE reads "
     "JSONL files, recursively"),
    ("folder-of-json", IFT, {"a.json": lines(GOOD), "b.csv": b"prompt,response\n"}, "",
     "{data}: no .jsonl files in this folder (it has {data}/a.json, {data}/b.csv)"),
    ("missing-path", IFT, {}, "nope.jsonl", "{data}: no such file or folder"),
    ("symlink-loop", IFT, symlink_loop, "", "{data}/a.jsonl: cannot read the file: Too many levels of symbolic links"),
    ("dangling-symlink", IFT, lambda folder: os.symlink(folder / "gone.jsonl", folder / "d.jsonl"), "",
     "{data}/d.jsonl: cannot read the file: No such file or directory"),
    ("folder-named-jsonl", IFT, lambda folder: (folder / "sub").mkdir() or os.symlink(folder / "sub", folder / "x.jsonl"),
     "", "{data}/x.jsonl: cannot read the file: Is a directory"),
    ("chat-two-user-turns", CHAT, {"c.jsonl": lines(chat(("user", "a"), ("user", "b"), ("assistant", "c")))},
     "c.jsonl", "{data}:1: messages 1 and 2 both have role 'user'"),
    ("chat-assistant-first", CHAT, {"c.jsonl": lines(chat(("assistant", "a"), ("user", "b"), ("assistant", "c")))},
     "c.jsonl", "{data}:1: message 1: the first turn must be 'user', got 'assistant'"),
    ("chat-last-not-assistant", CHAT, {"c.jsonl": lines(chat(*hi(), ("user", "and?")))}, "c.jsonl",
     "{data}:1: the last message must be 'assistant', got 'user'"),
    ("chat-system-later", CHAT, {"c.jsonl": lines(chat(*hi(), ("system", "s"), ("user", "u"), ("assistant", "a")))},
     "c.jsonl", "{data}:1: message 3: 'system' is allowed only as the first message"),
    ("chat-unknown-role", CHAT, {"c.jsonl": lines(chat(("user", "hi"), ("bot", "hello")))}, "c.jsonl",
     "{data}:1: message 2: unknown role 'bot' (expected system, user or assistant)"),
    ("chat-empty-content", CHAT, {"c.jsonl": lines(chat(*hi(reply="")))}, "c.jsonl",
     "{data}:1: message 2: content is empty"),
    ("chat-content-not-string", CHAT, {"c.jsonl": lines('{"messages": [{"role": "user", "content": 1}]}')},
     "c.jsonl", "{data}:1: message 1: content must be a string, got int"),
    ("chat-messages-not-list", CHAT, {"c.jsonl": lines('{"messages": "hi"}')}, "c.jsonl",
     "{data}:1: 'messages' must be a list, got str"),
    ("chat-no-messages", CHAT, {"c.jsonl": lines('{"messages": []}')}, "c.jsonl", "{data}:1: 'messages' is empty"),
    ("chat-missing-content", CHAT, {"c.jsonl": lines('{"messages": [{"role": "user"}]}')}, "c.jsonl",
     "{data}:1: message 1: missing key 'content'"),
    ("cpt-no-txt", CPT, {"a.md": b"# notes", "b.jsonl": lines(GOOD)}, "",
     "{data}: no .txt files in this folder (it has {data}/a.md, {data}/b.jsonl); CONTINUED_PRETRAIN reads one "
     ".txt file per document, recursively"),
    ("cpt-not-utf8", CPT, {"a.txt": b"ok", "b.txt": b"caf\xe9 au lait"}, "",
     "{data}/b.txt: file is not valid UTF-8 text (byte 0xe9 at byte 4); save it as UTF-8"),
    ("cpt-empty-txt", CPT, {"a.txt": b"ok", "b.txt": b"  \n"}, "", "{data}/b.txt: text is empty"),
    ("cpt-9MB-file", CPT, {"a.txt": b"ok", "big.txt": b"word " * (9 * MiB // 5)}, "",
     "{data}/big.txt: file is 9,437,180 bytes, over the limit of 8,388,608 bytes per record; it is not read"),
]


def write_case(folder: Path, files) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if callable(files):
        files(folder)
        return
    for name, content in files.items():
        (folder / name).write_bytes(content)


def run_file(tmp_path: Path, model: Path, task: str, data: Path, name: str = "bad-data") -> Path:
    document = {"apiVersion": "kubetune.dev/v1alpha1", "kind": "TrainingRun", "metadata": {"name": name},
                "spec": {"model": str(model), "trainDataPath": str(data), "taskType": task,
                         "registerTo": "main.tests.bad_data", "contextLength": 64, "globalBatchSize": 2,
                         "trainingDuration": "1ba"}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_validate_names_the_file_line_and_rule(case, tmp_path, tiny_model_dir, capsys):
    _, task, files, target, message = case
    folder = tmp_path / "data"
    write_case(folder, files)
    data = folder / target if target else folder
    assert main(["validate", str(run_file(tmp_path, tiny_model_dir, task, data))]) == 1
    err = capsys.readouterr().err
    assert message.format(data=data) in err
    assert "Traceback" not in err and "InternalError" not in err


@pytest.mark.parametrize("name, content", [
    ("bom", b"\xef\xbb\xbf" + lines(GOOD, GOOD)),  # most editors and tools accept one; it carries no data
    ("crlf", (GOOD + "\r\n" + GOOD + "\r\n").encode()),
    ("extra-keys", lines('{"prompt": "p", "response": " r", "id": 7, "source": "wiki"}', GOOD)),
    ("no-final-newline", lines(GOOD) + GOOD.encode()),
])
def test_what_most_tools_accept_is_accepted(name, content, tmp_path, tiny_model_dir, capsys):
    (tmp_path / "d.jsonl").write_bytes(content)
    assert main(["validate", str(run_file(tmp_path, tiny_model_dir, IFT, tmp_path / "d.jsonl"))]) == 0
    assert "samples                            2" in capsys.readouterr().out


def test_a_sample_truncated_to_nothing_is_dropped_and_counted(tmp_path, tiny_model_dir, capsys):
    long_prompt = json.dumps({"prompt": "word " * 200, "response": " never seen"})
    (tmp_path / "d.jsonl").write_text("\n".join([GOOD, long_prompt, GOOD]) + "\n")
    assert main(["validate", str(run_file(tmp_path, tiny_model_dir, IFT, tmp_path / "d.jsonl"))]) == 0
    out = capsys.readouterr().out
    assert "samples                            2" in out and "dropped (no token left to learn)   1" in out
    (tmp_path / "d.jsonl").write_text(long_prompt + "\n")
    assert main(["validate", str(run_file(tmp_path, tiny_model_dir, IFT, tmp_path / "d.jsonl"))]) == 1
    assert "no sample has a token to learn within contextLength 64 (1 dropped, e.g. " in capsys.readouterr().err


LOCAL_CASES = ["malformed-json", "misspelled-response", "not-utf8", "nested-100000-deep", "50MB-line",
               "symlink-loop", "json-array-one-line"]


def test_run_local_reports_the_same_lines(tmp_path, tiny_model_dir, capsys):
    """One local run over a folder holding several bad files: every line validate prints, in order."""
    folder = tmp_path / "data"
    for number, name in enumerate(LOCAL_CASES):
        _, _, files, target, _ = next(case for case in CASES if case[0] == name)
        part = folder / f"{number:02d}"
        write_case(part, files)
        if target and target.endswith(".json"):
            (part / target).rename(part / "d.jsonl")
    path = run_file(tmp_path, tiny_model_dir, IFT, folder)
    assert main(["validate", str(path)]) == 1
    expected = [line.strip() for line in capsys.readouterr().err.splitlines() if f"{folder}/" in line]
    assert len(expected) >= len(LOCAL_CASES)  # the symlink loop is two unreadable files
    done = subprocess.run([sys.executable, "-m", "kubetune.cli", "run", str(path), "--local", "--workdir",
                           str(tmp_path / "work")], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 1 and "Failed: DataValidationFailed" in done.stderr
    shown = [line.strip() for line in (done.stdout + done.stderr).splitlines() if f"{folder}/" in line]
    missing = [line for line in expected if line not in shown]  # the same lines (printed in the event and at the end)
    assert not missing
    assert "Traceback" not in done.stderr
