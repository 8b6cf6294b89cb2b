"""test_script.py end to end with --demo: the organisers' report, the outputs file, resume, and clear input errors."""
import json

import pytest
from conftest import ROOT

import test_script


def run(capsys, *argv):
    assert test_script.main(["--demo", *argv]) == 0
    return capsys.readouterr().out


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "outs.jsonl"
    printed = run(capsys, "--out", str(out), "--max-new-tokens", "50")
    assert "Elapsed_time: " in printed and "Correctness: 0/30" in printed  # random weights answer nothing right
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(30))
    assert all(isinstance(r["output"][0]["generated_text"], str) for r in rows)


def test_resume_runs_only_the_missing_records(tmp_path, capsys):
    out = tmp_path / "outs.jsonl"
    run(capsys, "--out", str(out), "--max-new-tokens", "20")
    full = out.read_text().splitlines()
    out.write_text("\n".join(full[:12]) + "\n")   # as if the run had died after 12 results
    printed = run(capsys, "--out", str(out), "--max-new-tokens", "20", "--resume")
    assert "12 records were resumed" in printed
    assert out.read_text().splitlines() == full


def test_scores_like_the_organisers(tmp_path, capsys, monkeypatch):
    """A record whose answer is the (nonsense) generated text, after lstrip and newline removal, counts as correct."""
    out = tmp_path / "outs.jsonl"
    run(capsys, "--out", str(out), "--max-new-tokens", "20")
    first = json.loads(out.read_text().splitlines()[1])["output"][0]["generated_text"]
    records = [json.loads(line) for line in (ROOT / "data" / "test_dataset.jsonl").read_text().splitlines()]
    records[1]["answer"] = first.lstrip().replace("\n", "")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert "Correctness: 1/30" in run(capsys, "--data", str(data), "--out", str(out), "--max-new-tokens", "20")


@pytest.mark.parametrize("line, message", [("{not json", ":2: not valid JSON"),
                                           ('{"answer": "x"}', ":2: record needs 'message'")])
def test_bad_records_name_their_line(tmp_path, line, message):
    data = tmp_path / "bad.jsonl"
    good = (ROOT / "data" / "test_dataset.jsonl").read_text().splitlines()[0]
    data.write_text(good + "\n" + line + "\n")
    with pytest.raises(SystemExit, match=message):
        test_script.main(["--demo", "--data", str(data), "--out", str(tmp_path / "o.jsonl")])


def test_missing_model_suggests_demo(tmp_path):
    with pytest.raises(SystemExit, match="--demo"):
        test_script.main(["--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "o.jsonl")])
