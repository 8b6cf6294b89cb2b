"""The files of one run of test_script.py: the data file it reads, the results file it writes (--out), and the files
beside --out that keep a run safe: OUT.lock (one run at a time), OUT.partial (the journal: each result as it
finishes), OUT.tmp (the next --out, renamed over it once whole) and OUT.error.log.

Nothing a user gave or a run finished is lost or mixed with another run's: every path is checked for what it is and
what it may become before a model loads; a results line records which record and which settings it belongs to, so
--resume keeps only this data's results; the journal is created only once the run is about to start.
"""
import errno
import fcntl
import json
import os
import socket
import stat
import sys
import time
from pathlib import Path

from .dataset import DataError, fingerprint, read_lines


def beside(out: Path, suffix: str) -> Path:
    return out.with_name(out.name + suffix)


SUFFIXES = (".partial", ".tmp", ".lock", ".error.log")


def check_paths(data: Path, out: Path) -> None:
    """Before anything is read or loaded: the data file is a regular file (Section 3 reads it again inside the
    clock, so a pipe would be empty there), and --out and its companions are files in a writable folder, none of
    them the data file (also through a link or another spelling of the path)."""
    try:
        mode = os.stat(data).st_mode  # stat, not open: opening a FIFO nobody writes would block
    except FileNotFoundError:
        raise DataError(data, None, "no such file") from None
    except OSError as e:
        raise DataError(data, None, f"cannot be read ({e.strerror})") from None
    if stat.S_ISDIR(mode):
        raise DataError(data, None, "is a directory, not a JSONL file")
    if not stat.S_ISREG(mode):
        raise DataError(data, None, "is not a regular file (a pipe or a device?): the run reads it twice, to check it "
                                    "before the model loads and again inside the timed section; save it to a file")
    folder = out.parent
    if not folder.is_dir():
        raise DataError(out, None, f"cannot be written: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DataError(out, None, f"cannot be written: no permission to write in {folder}")
    for path in (out, *(beside(out, s) for s in SUFFIXES)):
        if path.is_dir():
            raise DataError(path, None, "is a directory: --out must name a file (its results and the files beside it)")
        if path.exists() and os.path.samefile(path, data) or os.path.realpath(path) == os.path.realpath(data):
            raise DataError(path, None, f"is the data file {data}: the run would overwrite it; pass another --out")


class RunLock:
    """OUT.lock, held for the whole run: a second run on the same --out is refused at once, naming the holder. An
    flock ends with the process that holds it, so a lock file left by a run that died is simply taken over."""

    def __init__(self, out: Path):
        self.out, self.path, self.fd = out, beside(out, ".lock"), None

    def acquire(self) -> str | None:
        """Take the lock (a DataError if another run holds it); a note when an earlier run's file was taken over."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise DataError(self.path, None, f"cannot be written ({e.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise DataError(self.path, None, f"cannot be locked ({e.strerror})") from None
                raise DataError(self.out, None, f"is in use by another run ({holder}); wait for it to end, or pass "
                                                "another --out") from None
            try:  # its holder may have removed the file between our open and our lock: lock the one in place
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        earlier = os.read(fd, 200).decode(errors="replace").strip()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, started "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n".encode(), 0)
        self.fd = fd
        return f"{self.path}: taken over from a run that ended without removing it ({earlier})" if earlier else None

    def release(self) -> None:
        if self.fd is not None:
            os.unlink(self.path)  # while still held: a run waiting on the old file then locks a fresh one
            os.close(self.fd)
            self.fd = None


def _line(index: int, record: str, settings: str, output: list) -> str:
    return json.dumps({"index": index, "record": record, "settings": settings, "output": output},
                      ensure_ascii=False) + "\n"


def read_results(path: Path, records: list[str], settings: str) -> tuple[dict[int, list], str | None]:
    """The results already in a results file, each checked against the data's record fingerprints `records` and
    this run's `settings`, and a note if its last line was cut (a run that died while writing it: that line is
    ignored, so its record runs again). Any other bad or foreign line is an error naming it."""
    lines = [(n, text) for n, text in read_lines(path) if text.strip()]
    done, note = {}, None
    for n, text in lines:
        try:
            rec = json.loads(text)
            index, output = rec["index"], rec["output"]
            if not (isinstance(index, int) and isinstance(output, list) and output
                    and isinstance(output[0], dict) and isinstance(output[0].get("generated_text"), (str, list))):
                raise ValueError
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            if n == lines[-1][0]:
                note = f"{path}:{n}: the last line is incomplete (cut off by an interrupted run); its record runs again"
                break
            raise DataError(path, n, "not a result line ({\"index\": N, \"record\": ..., \"output\": "
                                     "[{\"generated_text\": ...}]})") from None
        if not 0 <= index < len(records):
            raise DataError(path, n, f"result index {index} is outside the data's {len(records)} records: these are "
                                     "the results of other data (pass another --out, or run without --resume)")
        if rec.get("record") != records[index]:
            raise DataError(path, n, f"the result for record {index} was made for another record (other data, or "
                                     "an older orinfer that wrote no fingerprint): pass another --out, or run without "
                                     "--resume")
        if rec.get("settings") != settings:
            raise DataError(path, n, "the result was made with another model, dtype or --max-new-tokens: pass "
                                     "another --out, or run with the same settings")
        done[index] = output
    return done, note


class Results:
    """The results of a run. --out is written once, at the end, atomically and in dataset order; until then each
    result is appended to the journal OUT.partial as it finishes (one flushed line), so a crash keeps every finished
    result and the previous --out stays as it was. `records`: each record's fingerprint; `settings`: the run's."""

    def __init__(self, out: Path, resume: bool, records: list[str], settings: str):
        self.out, self.journal = out, beside(out, ".partial")
        self.records, self.settings = records, settings
        self.done: dict[int, list] = {}
        self.sink, self.finished = None, False
        if resume:
            for path in (out, self.journal):
                if path.is_file():
                    done, note = read_results(path, records, settings)
                    self.done.update(done)
                    if note:
                        print(note, file=sys.stderr)
        elif self.journal.is_file() and self.journal.stat().st_size:
            raise DataError(self.journal, None, "holds the results of an interrupted run: pass --resume to keep "
                                                "them, or delete the file to start afresh")
        self.resumed = len(self.done)

    def begin(self) -> None:
        """Open the journal, holding exactly the results kept (a cut last line is dropped): just before the run."""
        try:
            self.sink = open(self.journal, "w", encoding="utf-8")
            self.sink.writelines(self._line(i, o) for i, o in sorted(self.done.items()))
            self.sink.flush()
        except OSError as e:
            raise DataError(self.journal, None, f"cannot be written ({e.strerror})") from None

    def _line(self, index: int, output: list) -> str:
        return _line(index, self.records[index], self.settings, output)

    def add(self, index: int, output: list) -> None:
        self.sink.write(self._line(index, output))
        self.sink.flush()
        self.done[index] = output

    def finish(self) -> None:
        """--out replaced by every result, in dataset order; the journal is then no longer needed."""
        tmp = beside(self.out, ".tmp")
        tmp.write_text("".join(self._line(i, o) for i, o in sorted(self.done.items())), encoding="utf-8")
        tmp.replace(self.out)
        self.finished = True
        self.close()
        self.journal.unlink(missing_ok=True)

    def close(self) -> None:
        """After a run that stopped: the journal keeps what it holds; one that holds nothing is removed."""
        if self.sink is not None:
            self.sink.close()
            self.sink = None
            if not self.done:
                self.journal.unlink(missing_ok=True)

    def saved(self) -> str:
        kept = len(self.done)
        if self.finished:
            return f"every result is in {self.out}"
        return f"{kept} results are kept in {self.journal}; --resume runs the rest" if kept else "no result was lost"
