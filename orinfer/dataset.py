"""The competition's files and prompts: the dataset (JSONL records of a chat and its answer), the results file, and
the list of choices a prompt gives.

Every way a file can be wrong is a `DataError` naming the file and its 1-based line, so a user learns what to fix
before a model loads, not from a traceback after it.
"""
import ast
import json
import re
from pathlib import Path

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A bad file or record: `str()` is one line, `FILE:LINE: what is wrong` (no LINE for the file as a whole)."""

    def __init__(self, path: str | Path, line: int | None, what: str):
        super().__init__(f"{path}:{line}: {what}" if line else f"{path}: {what}")


def _lines(path: Path) -> list[tuple[int, bytes]]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(path, None, "no such file") from None
    except IsADirectoryError:
        raise DataError(path, None, "is a directory, not a JSONL file") from None
    except OSError as e:
        raise DataError(path, None, f"cannot be read ({e.strerror})") from None
    return list(enumerate(raw.split(b"\n"), 1))


def _text(path: Path, n: int, line: bytes) -> str:
    try:
        # A byte-order mark is allowed at the start of the file only (some editors write one).
        return line.decode("utf-8-sig" if n == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise DataError(path, n, f"not UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1})") from None


def check_record(rec, path: Path, n: int) -> None:
    """A record is {"message": [{"role", "content"}, ...], "answer"?: str}, its chat ending with a user turn."""
    if not isinstance(rec, dict):
        raise DataError(path, n, f"a record must be a JSON object, not {type(rec).__name__}")
    if "message" not in rec:
        raise DataError(path, n, "the record has no 'message' (a list of {'role', 'content'} turns)")
    chat = rec["message"]
    if not isinstance(chat, list) or not chat:
        raise DataError(path, n, "'message' must be a non-empty list of {'role', 'content'} turns")
    for t, turn in enumerate(chat, 1):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise DataError(path, n, f"turn {t} of 'message' must be an object with 'role' and 'content'")
        if turn["role"] not in ROLES:
            raise DataError(path, n, f"turn {t} has role {turn['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(turn["content"], str):
            raise DataError(path, n, f"turn {t}'s 'content' must be a string, not {_json_type(turn['content'])}")
    if chat[-1]["role"] != "user":
        raise DataError(path, n, f"the chat's last turn has role {chat[-1]['role']!r}; it must end with a user turn "
                                 "(continuing an assistant's answer is not supported)")
    if "answer" in rec and not isinstance(rec["answer"], str):
        raise DataError(path, n, f"'answer' must be a string, not {_json_type(rec['answer'])}")


def _json_type(value) -> str:
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def read_records(path: str | Path) -> tuple[list[dict], list[int]]:
    """Every record of a JSONL dataset, checked, and the line each came from. Blank lines are skipped; a file
    with no record is an error."""
    path = Path(path)
    records, line_numbers = [], []
    for n, line in _lines(path):
        text = _text(path, n, line)
        if not text.strip():
            continue
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(path, n, f"not valid JSON ({e.msg} at column {e.colno})") from None
        check_record(rec, path, n)
        records.append(rec)
        line_numbers.append(n)
    if not records:
        raise DataError(path, None, "holds no records (one JSON object a line expected)")
    return records, line_numbers


def read_results(path: str | Path, total: int) -> tuple[dict[int, list], str | None]:
    """The results already in a results file ({"index", "output"} lines), and a note if its last line was cut
    (a run that died while writing it): that line is ignored, so its record runs again. Any other bad line is an
    error: the file is not ours, or was damaged."""
    path = Path(path)
    lines = _lines(path)
    while lines and not lines[-1][1].strip():
        lines.pop()
    done, note = {}, None
    for n, line in lines:
        if not line.strip():
            continue
        try:
            rec = json.loads(_text(path, n, line))
            index, output = rec["index"], rec["output"]
            if not (isinstance(index, int) and isinstance(output, list) and output
                    and isinstance(output[0], dict) and isinstance(output[0].get("generated_text"), (str, list))):
                raise ValueError
        except (json.JSONDecodeError, DataError, KeyError, TypeError, ValueError):
            if n == lines[-1][0]:
                note = f"{path}:{n}: the last line is incomplete (cut off by an interrupted run); its record runs again"
                break
            raise DataError(path, n, "not a result line ({\"index\": N, \"output\": [{\"generated_text\": ...}]})") from None
        if not 0 <= index < total:
            raise DataError(path, n, f"result index {index} is outside the dataset's {total} records "
                                     "(is this the results file of another dataset?)")
        done[index] = output
    return done, note


_CHOICES = re.compile(r"choices:\s*(\[.*\])\s*$", re.MULTILINE)


def parse_choices(text: str) -> list[str]:
    """The `choices: [...]` list of a competition prompt (a Python list literal), or [] if there is none."""
    found = _CHOICES.findall(text)
    if not found:
        return []
    # The list node read directly (not ast.literal_eval, whose helper closures leave reference cycles behind on
    # every call: garbage that waits for the cyclic collector, which is paused while generating).
    try:
        node = ast.parse(found[-1], mode="eval").body
    except (ValueError, SyntaxError):
        return []
    if not isinstance(node, (ast.List, ast.Tuple)) or not all(isinstance(e, ast.Constant) for e in node.elts):
        return []
    return [str(e.value) for e in node.elts]
