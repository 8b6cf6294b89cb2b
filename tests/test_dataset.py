"""The competition's files and prompts: records checked, results read back, choices parsed (the fault table for the
whole command is in test_test_script.py)."""
import json

import pytest

from orinfer.dataset import DataError, parse_choices, read_records, read_results

pytestmark = pytest.mark.unit


def result(i: int, text: str = "x") -> str:
    return json.dumps({"index": i, "output": [{"generated_text": text}]})


def test_records_keep_their_line_numbers_past_blank_lines(tmp_path):
    data = tmp_path / "d.jsonl"
    turn = json.dumps({"message": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]})
    data.write_bytes(b"\xef\xbb\xbf" + (turn + "\n\n   \n" + turn + "\n").encode())  # a BOM, then blank lines
    records, lines = read_records(data)
    assert len(records) == 2 and lines == [1, 4]


def test_results_a_cut_last_line_is_dropped_any_other_bad_line_is_an_error(tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text(result(0) + "\n" + result(2) + "\n" + result(1)[:20])
    done, note = read_results(out, 3)
    assert done == {0: [{"generated_text": "x"}], 2: [{"generated_text": "x"}]} and f"{out}:3: the last line" in note
    out.write_text(result(0) + "\n" + result(1)[:20] + "\n" + result(2) + "\n")
    with pytest.raises(DataError, match=f"{out}:2: not a result line"):
        read_results(out, 3)
    out.write_text(result(5) + "\n")
    with pytest.raises(DataError, match="outside the dataset's 3 records"):
        read_results(out, 3)
    out.write_text(result(0) + "\n\n")  # trailing blank lines are not a cut line
    assert read_results(out, 3) == ({0: [{"generated_text": "x"}]}, None)


def test_parse_choices_of_competition_prompts(public_chats, longest_chat):
    assert parse_choices(public_chats[0][0]["content"]) == ["Deep sea animals", "fish", "Long Sea Fish", "Far Sea Animals"]
    assert parse_choices(longest_chat[0]["content"]) == ["True", "False"]
    assert parse_choices("no list here") == [] and parse_choices("choices: [unclosed\n") == []
    quoted = ["it's", 'say "no"', "a\\b"]
    assert parse_choices(f"question: q\nchoices: {quoted!r}\n") == quoted  # repr's escapes, as the prompt has them
    assert parse_choices("choices: [open('x')]\n") == [] and parse_choices("choices: {'a': 1}\n") == []
