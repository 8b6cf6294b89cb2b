"""The competition's data and prompts: records checked (JSON lines or one JSON array), fingerprints, choices parsed
(results files are test_runfiles.py's; the fault table for the whole command is in test_test_script.py)."""

import json

import pytest

from orinfer.dataset import DataError, fingerprint, parse_choices, read_records

pytestmark = pytest.mark.unit


def test_records_keep_their_line_numbers_past_blank_lines(tmp_path):
    data = tmp_path / "d.jsonl"
    turn = json.dumps(
        {"message": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}
    )
    data.write_bytes(
        b"\xef\xbb\xbf" + (turn + "\n\n   \n" + turn + "\n").encode()
    )  # a BOM, then blank lines
    records, lines = read_records(data)
    assert len(records) == 2 and lines == [1, 4]


def test_a_json_array_of_records_is_read_as_its_records_with_their_lines(tmp_path):
    """datasets.load_dataset("json"), which the organisers' script uses, reads a file holding one JSON array as its
    records: so does the runner, and a bad record is named by the line it starts on."""
    turn = {"message": [{"role": "user", "content": "q"}], "answer": "a"}
    data = tmp_path / "d.json"
    data.write_text("[\n  " + json.dumps(turn) + ",\n\n  " + json.dumps(turn) + "\n]\n")
    records, lines = read_records(data)
    assert records == [turn, turn] and lines == [2, 4]
    data.write_text("[" + json.dumps(turn) + ",\n 7]")
    with pytest.raises(DataError, match=f"{data}:2: a record must be a JSON object, not a number"):
        read_records(data)
    data.write_text("[]")
    with pytest.raises(DataError, match="holds no records"):
        read_records(data)
    data.write_text(
        json.dumps(turn) + "\n[1, 2]\n"
    )  # JSON lines, one of which is a list: named as such
    with pytest.raises(DataError, match=f"{data}:2: a record must be a JSON object, not a list"):
        read_records(data)


def test_text_a_tokenizer_cannot_read_is_named_with_its_line(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(
        json.dumps({"message": [{"role": "user", "content": "ok"}]})
        + "\n"
        + '{"message": [{"role": "user", "content": "bad \\ud800 half"}]}\n'
    )
    with pytest.raises(
        DataError,
        match=f"{data}:2: turn 1's 'content' holds a lone surrogate \\(\\\\ud800 at character 5\\)",
    ):
        read_records(data)


def test_fingerprints_are_stable_and_tell_records_apart():
    chat = [{"role": "user", "content": "q"}]
    assert fingerprint(chat) == fingerprint(
        [{"content": "q", "role": "user"}]
    )  # key order does not matter
    assert (
        fingerprint(chat) != fingerprint([{"role": "user", "content": "q "}])
        and len(fingerprint(chat)) == 16
    )


def test_parse_choices_of_competition_prompts(public_chats, longest_chat):
    assert parse_choices(public_chats[0][0]["content"]) == [
        "Deep sea animals",
        "fish",
        "Long Sea Fish",
        "Far Sea Animals",
    ]
    assert parse_choices(longest_chat[0]["content"]) == ["True", "False"]
    assert parse_choices("no list here") == [] and parse_choices("choices: [unclosed\n") == []
    quoted = ["it's", 'say "no"', "a\\b"]
    assert (
        parse_choices(f"question: q\nchoices: {quoted!r}\n") == quoted
    )  # repr's escapes, as the prompt has them
    assert (
        parse_choices("choices: [open('x')]\n") == [] and parse_choices("choices: {'a': 1}\n") == []
    )
