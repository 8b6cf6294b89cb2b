"""The competition's data and prompts: the dataset (records of a chat and its answer, one JSON
object a line or one JSON array of them) and the list of choices a prompt gives.

Every way a file can be wrong is a `DataError` naming the file and its 1-based line, so a user
learns what to fix before a model loads, not from a traceback after it.
"""

import ast
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A bad file or record: `str()` is one line, `FILE:LINE: what is wrong` (no LINE for the file
    as a whole)."""

    def __init__(self, path: str | Path, line: int | None, what: str):
        super().__init__(f"{path}:{line}: {what}" if line else f"{path}: {what}")


@dataclass(frozen=True)
class FileIdentity:
    """What a file was when it was read: a later read of other bytes, or of the same bytes
    rewritten, differs."""

    size: int
    mtime_ns: int
    sha256: str


def _read_bytes(path: Path) -> tuple[bytes, FileIdentity]:
    try:
        with open(path, "rb") as f:
            raw, info = f.read(), os.fstat(f.fileno())
    except FileNotFoundError:
        raise DataError(path, None, "no such file") from None
    except IsADirectoryError:
        raise DataError(path, None, "is a directory, not a JSONL file") from None
    except OSError as e:
        raise DataError(path, None, f"cannot be read ({e.strerror})") from None
    return raw, FileIdentity(info.st_size, info.st_mtime_ns, hashlib.sha256(raw).hexdigest())


def read_lines(
    path: Path, cut_last: bool = False, raw: bytes | None = None
) -> list[tuple[int, str | None]]:
    """The file's lines as text, numbered from 1: a byte that is not UTF-8 is an error naming its
    line and column. With `cut_last`, the last non-blank line is None where it is not UTF-8 (a write
    cut inside a character)."""
    if raw is None:
        raw = _read_bytes(path)[0]
    parts = raw.split(b"\n")
    last = max((i for i, part in enumerate(parts) if part.strip()), default=-1)
    lines = []
    for n, line in enumerate(parts, 1):
        try:
            lines.append((n, _text(path, n, line)))
        except DataError:
            if not (cut_last and n == last + 1):
                raise
            lines.append((n, None))
    return lines


def _text(path: Path, n: int, line: bytes) -> str:
    try:
        # A byte-order mark is allowed at the start of the file only (some editors write one).
        return line.decode("utf-8-sig" if n == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            path, n, f"not UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1})"
        ) from None


def _check_text(path: Path, n: int, where: str, text: str) -> None:
    """Text the tokenizer can read: JSON's \\uD800-\\uDFFF escapes make lone surrogates, which no
    encoder takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(
            path,
            n,
            f"{where} holds a lone surrogate (\\u{ord(text[e.start]):04x} at character "
            f"{e.start + 1}): not text a tokenizer can read",
        ) from None


def check_record(rec, path: Path, n: int) -> None:
    """A record is {"message": [{"role", "content"}, ...], "answer"?: str}, its chat ending with a
    user turn."""
    if not isinstance(rec, dict):
        raise DataError(path, n, f"a record must be a JSON object, not {_json_type(rec)}")
    if "message" not in rec:
        raise DataError(
            path, n, "the record has no 'message' (a list of {'role', 'content'} turns)"
        )
    chat = rec["message"]
    if not isinstance(chat, list) or not chat:
        raise DataError(path, n, "'message' must be a non-empty list of {'role', 'content'} turns")
    for t, turn in enumerate(chat, 1):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise DataError(
                path, n, f"turn {t} of 'message' must be an object with 'role' and 'content'"
            )
        if turn["role"] not in ROLES:
            raise DataError(
                path, n, f"turn {t} has role {turn['role']!r}; expected one of {', '.join(ROLES)}"
            )
        if not isinstance(turn["content"], str):
            raise DataError(
                path, n, f"turn {t}'s 'content' must be a string, not {_json_type(turn['content'])}"
            )
        _check_text(path, n, f"turn {t}'s 'content'", turn["content"])
    if chat[-1]["role"] != "user":
        raise DataError(
            path,
            n,
            f"the chat's last turn has role {chat[-1]['role']!r}; it must end with a user turn "
            "(continuing an assistant's answer is not supported)",
        )
    if "answer" in rec and not isinstance(rec["answer"], str):
        raise DataError(path, n, f"'answer' must be a string, not {_json_type(rec['answer'])}")


def _json_type(value) -> str:
    return {
        type(None): "null",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        list: "a list",
        dict: "an object",
        str: "a string",
    }.get(type(value), type(value).__name__)


_SPACE = re.compile(r"[ \t\r\n]*")


def _array_records(text: str) -> list[tuple[int, object]] | None:
    """The elements of a file that is one JSON array, each with the line it starts on, in one pass
    over the text; None for any other file, or a broken array (then read line by line, which names
    the bad line). datasets.load_dataset("json"), which the organisers' script uses, reads such a
    file as its records."""
    at = _SPACE.match(text).end()
    if not text.startswith("[", at):
        return None
    decoder, found = json.JSONDecoder(), []
    at, line, counted = _SPACE.match(text, at + 1).end(), 1, 0
    if text.startswith("]", at):
        return found if not text[at + 1 :].strip() else None
    while True:
        line += text.count("\n", counted, at)
        counted = at
        try:
            element, at = decoder.raw_decode(text, at)
        # JSONDecodeError is a ValueError; so is a too-long integer
        except (ValueError, RecursionError):
            return None
        found.append((line, element))
        at = _SPACE.match(text, at).end()
        if text.startswith(",", at):
            at = _SPACE.match(text, at + 1).end()
        elif text.startswith("]", at):
            return found if not text[at + 1 :].strip() else None
        else:
            return None


def _json_lines(path: Path, lines: list[tuple[int, str]]) -> list[tuple[int, object]]:
    found = []
    for n, text in lines:
        if not text.strip():
            continue
        try:
            found.append((n, json.loads(text)))
        except json.JSONDecodeError as e:
            raise DataError(path, n, f"not valid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise DataError(
                path, n, "not a record: JSON nested too deeply for the decoder"
            ) from None
        # the only other ValueError: an integer of more digits than Python converts
        except ValueError:
            raise DataError(
                path,
                n,
                "not a record: it holds a number of more digits than the decoder converts "
                f"({sys.get_int_max_str_digits()})",
            ) from None
    return found


@dataclass(frozen=True)
class Dataset:
    """A data file's records, the line each starts on, and what the file was when it was read."""

    records: list[dict]
    lines: list[int]
    identity: FileIdentity


def read_dataset(path: str | Path) -> Dataset:
    """Every record of a dataset, checked: JSON lines (blank lines skipped) or one JSON array of
    records, read and parsed once. A file with no record is an error."""
    path = Path(path)
    raw, identity = _read_bytes(path)
    lines = read_lines(path, raw=raw)
    found = _array_records("\n".join(text for _, text in lines))
    if found is None:
        found = _json_lines(path, lines)
    for n, rec in found:
        check_record(rec, path, n)
    if not found:
        raise DataError(
            path,
            None,
            "holds no records (one JSON object a line, or a JSON array of them, expected)",
        )
    return Dataset([rec for _, rec in found], [n for n, _ in found], identity)


def read_records(path: str | Path) -> tuple[list[dict], list[int]]:
    """Every record of a dataset and the line each starts on (read_dataset)."""
    data = read_dataset(path)
    return data.records, data.lines


def fingerprint(value) -> str:
    """A short, stable digest of a JSON value (keys sorted): what a results line records of its
    record and run."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


_CHOICES = re.compile(r"choices:\s*(\[.*\])\s*$", re.MULTILINE)


def parse_choices(text: str) -> list[str]:
    """The `choices: [...]` list of a competition prompt (a Python list literal), or [] if there is
    none."""
    found = _CHOICES.findall(text)
    if not found:
        return []
    # The list node read directly (not ast.literal_eval, whose helper closures leave reference
    # cycles behind on every call: garbage that waits for the cyclic collector, which is paused
    # while generating).
    try:
        node = ast.parse(found[-1], mode="eval").body
    except (ValueError, SyntaxError):
        return []
    if not isinstance(node, (ast.List, ast.Tuple)) or not all(
        isinstance(e, ast.Constant) for e in node.elts
    ):
        return []
    return [str(e.value) for e in node.elts]


def scored_answer(generated_text: str) -> str:
    """What the organisers' Section 4 compares with a record's answer: the text without leading
    whitespace and newlines (their `generated_text.lstrip().replace("\\n", "")`), the one copy of
    the rule here and in bench/."""
    return generated_text.lstrip().replace("\n", "")
