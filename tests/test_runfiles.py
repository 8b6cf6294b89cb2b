"""The run's files: paths checked before anything is read, the lock on --out, results that know their record and
settings (the whole command's fault table is in test_test_script.py)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from orinfer.dataset import DataError, fingerprint
from orinfer.runfiles import Results, RunLock, check_data_path, read_results, results_path

pytestmark = pytest.mark.unit

RECORDS, SETTINGS = ["r0", "r1", "r2"], {"weights": "w", "dtype": "auto"}


def check_paths(data, out):
    check_data_path(data)
    return results_path(str(out), data)


def result(i: int, text: str = "x", record: str | None = None, settings: str = SETTINGS) -> str:
    return json.dumps(
        {
            "index": i,
            "record": RECORDS[i] if record is None else record,
            "settings": settings,
            "output": [{"generated_text": text}],
        }
    )


def test_results_a_cut_last_line_is_dropped_any_other_bad_line_is_an_error(tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text(result(0) + "\n" + result(2) + "\n" + result(1)[:20])
    done, note = read_results(out, RECORDS, SETTINGS)
    assert (
        done == {0: [{"generated_text": "x"}], 2: [{"generated_text": "x"}]}
        and f"{out}:3: the last line" in note
    )
    out.write_text(result(0) + "\n" + result(1)[:20] + "\n" + result(2) + "\n")
    with pytest.raises(DataError, match=f"{out}:2: not a result line"):
        read_results(out, RECORDS, SETTINGS)
    out.write_text(result(0) + "\n\n")  # trailing blank lines are not a cut line
    assert read_results(out, RECORDS, SETTINGS) == ({0: [{"generated_text": "x"}]}, None)


@pytest.mark.parametrize(
    "line, message",
    [
        (
            json.dumps(
                {
                    "index": 5,
                    "record": "r5",
                    "settings": SETTINGS,
                    "output": [{"generated_text": "x"}],
                }
            ),
            "outside the data's 3 records",
        ),
        (result(1, record="other"), "was made for another record"),
        (
            json.dumps({"index": 1, "output": [{"generated_text": "x"}]}),
            "was made for another record",
        ),  # no fingerprint
        (
            result(1, settings={"weights": "v", "dtype": "auto"}),
            "made with another weights: pass another --out",
        ),
        (
            result(1, settings={"weights": "w", "dtype": "float32"}),
            "made with another dtype: pass another --out",
        ),
        (
            result(1, settings="s"),
            "made with another settings \\(the line was written by an older orinfer",
        ),
    ],
)
def test_results_of_other_data_or_settings_are_refused(tmp_path, line, message):
    out = tmp_path / "o.jsonl"
    out.write_text(result(0) + "\n" + line + "\n" + result(2) + "\n")
    with pytest.raises(DataError, match=f"{out}:2: .*{message}"):
        read_results(out, RECORDS, SETTINGS)


def test_the_journal_is_made_only_when_the_run_begins_and_removed_if_it_holds_nothing(tmp_path):
    out = tmp_path / "o.jsonl"
    results = Results(out, False, RECORDS, SETTINGS)
    assert not (tmp_path / "o.jsonl.partial").exists()
    results.begin()
    results.close()
    assert not (
        tmp_path / "o.jsonl.partial"
    ).exists()  # a run that stopped before any result leaves nothing
    results = Results(out, False, RECORDS, SETTINGS)
    results.begin()
    results.add(1, [{"generated_text": "y"}], {"message": "the record as Section 3 read it"})
    results.close()
    assert (tmp_path / "o.jsonl.partial").read_text() == result(
        1, "y", record=fingerprint("the record as Section 3 read it")
    ) + "\n"
    assert "1 results are kept" in results.saved()


@pytest.mark.parametrize("case", ["same", "symlink", "other spelling", "journal"])
def test_out_may_never_be_the_data_file(tmp_path, case):
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    out = (
        {"same": data, "other spelling": tmp_path / "." / "d.jsonl", "journal": tmp_path / "d"}[
            case
        ]
        if case != "symlink"
        else tmp_path / "link.jsonl"
    )
    if case == "symlink":
        out.symlink_to(data)
    if case == "journal":
        data.rename(tmp_path / "d.partial")
        data = tmp_path / "d.partial"
    with pytest.raises(DataError, match="is the data file"):
        check_paths(data, out)


def test_paths_that_are_folders_or_pipes_are_refused(tmp_path):
    data, out = tmp_path / "d.jsonl", tmp_path / "o.jsonl"
    data.write_text("{}\n")
    (tmp_path / "o.jsonl.tmp").mkdir()
    with pytest.raises(DataError, match="o.jsonl.tmp: is a directory"):
        check_paths(data, out)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # nobody writes it: opening it would block
    with pytest.raises(DataError, match="is not a regular file"):
        check_paths(fifo, tmp_path / "x.jsonl")


def test_a_second_run_on_the_same_out_is_refused_and_a_dead_runs_lock_taken_over(tmp_path):
    out = tmp_path / "o.jsonl"
    first = RunLock(out)
    assert first.acquire() is None
    with pytest.raises(
        DataError, match=f"{out}: is in use by another run \\(pid {os.getpid()} on "
    ):
        RunLock(out).acquire()
    first.release()
    assert not (tmp_path / "o.jsonl.lock").exists()
    # A run killed while holding it leaves its file behind, but no lock: the next run takes it over and says so.
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); from pathlib import Path; "
        f"from orinfer.runfiles import RunLock; RunLock(Path({str(out)!r})).acquire(); import os; os._exit(9)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    assert (tmp_path / "o.jsonl.lock").exists()
    third = RunLock(out)
    assert "taken over from a run that ended" in third.acquire()
    third.release()
