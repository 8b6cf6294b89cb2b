"""The files of one run of test_script.py: the data file it reads, the results file it writes
(--out), and the files beside --out that keep a run safe: OUT.lock (one run at a time), OUT.partial
(the journal: each result as it finishes), OUT.tmp (the next --out, renamed over it once whole) and
OUT.error.log.

Nothing a user gave or a run finished is lost or mixed with another run's: every path is checked for
what it is and what it may become before a model loads; a results line records which record and
which settings it belongs to, so --resume keeps only this data's results; the journal is created
only once the run is about to start.
"""

import errno
import fcntl
import hashlib
import json
import os
import socket
import stat
import sys
import time
from pathlib import Path

from . import checkpoint
from .dataset import DataError, fingerprint, read_lines


def beside(out: Path, suffix: str) -> Path:
    return out.with_name(out.name + suffix)


SUFFIXES = (".partial", ".partial.tmp", ".tmp", ".lock", ".error.log")


def check_data_path(data: Path) -> None:
    """The data file is a regular file: Section 3 reads it again inside the clock, so a pipe would
    be empty there (and reading a FIFO nobody writes, or /dev/zero, would never end)."""
    try:
        mode = os.stat(data).st_mode  # stat, not open: opening a FIFO nobody writes would block
    except FileNotFoundError:
        raise DataError(data, None, "no such file") from None
    except OSError as e:
        raise DataError(data, None, f"cannot be read ({e.strerror})") from None
    if stat.S_ISDIR(mode):
        raise DataError(data, None, "is a directory, not a JSONL file")
    if not stat.S_ISREG(mode):
        raise DataError(
            data,
            None,
            "is not a regular file (a pipe or a device?): the run reads it twice, to check it "
            "before the model loads and again inside the timed section; save it to a file",
        )


def forget_pages(path: Path) -> None:
    """Drop a file's pages from the page cache (where the kernel allows: clean pages), so that the
    next read of it comes from the disk, as a first read would."""
    if hasattr(os, "posix_fadvise"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def results_path(text: str, data: Path) -> Path:
    """--out checked before anything is read or loaded, and the path the run writes: --out itself,
    or the regular file a symbolic link names (written through: the link stays, its file is replaced
    and its companions are made beside that file). Refused: a name that is a folder, anything but a
    regular file or a link to one, a missing or read-only folder, and --out or a companion that is
    the data file (also through a link or another spelling)."""
    out = Path(text)
    if not text or text.endswith(os.sep) or out.name in ("", ".", ".."):
        raise DataError(
            repr(text) if not text else text,
            None,
            "names a folder, not a file: --out must name the results file (e.g. outputs.jsonl)",
        )
    if out.is_symlink():
        target = Path(os.path.realpath(out))
        if not target.is_file():
            raise DataError(
                out,
                None,
                f"is a link to {target}, which is not a regular file: pass a file to write",
            )
        out = target
    _check_writable(out.parent, out)
    for path in (out, *(beside(out, s) for s in SUFFIXES)):
        if path.is_dir():
            raise DataError(
                path,
                None,
                "is a directory: --out must name a file (its results and the files beside it)",
            )
        if (
            path.exists()
            and os.path.samefile(path, data)
            or os.path.realpath(path) == os.path.realpath(data)
        ):
            raise DataError(
                path,
                None,
                f"is the data file {data}: the run would overwrite it; pass another --out",
            )
        if os.path.lexists(path) and (
            path != out and path.is_symlink() or not stat.S_ISREG(os.stat(path).st_mode)
        ):
            raise DataError(
                path,
                None,
                "is not a regular file (a device, pipe, socket or link): the run would replace "
                "it; pass another --out, or move it away",
            )
    return out


def _check_writable(folder: Path, out: Path) -> None:
    if not folder.is_dir():
        raise DataError(out, None, f"cannot be written: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DataError(out, None, f"cannot be written: no permission to write in {folder}")


class RunLock:
    """OUT.lock, held for the whole run: a second run on the same --out is refused at once, naming
    the holder. An flock ends with the process that holds it, so a lock file left by a run that died
    is simply taken over."""

    def __init__(self, out: Path):
        self.out, self.path, self.fd = out, beside(out, ".lock"), None

    def acquire(self) -> str | None:
        """Take the lock (a DataError if another run holds it); a note when an earlier run's file
        was taken over."""
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
                raise DataError(
                    self.out,
                    None,
                    f"is in use by another run ({holder}); wait for it to end, or pass another "
                    "--out",
                ) from None
            # its holder may have removed the file between our open and our lock: lock the one in
            # place
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        earlier = os.read(fd, 200).decode(errors="replace").strip()
        os.ftruncate(fd, 0)
        os.pwrite(
            fd,
            f"pid {os.getpid()} on {socket.gethostname()}, started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n".encode(),
            0,
        )
        self.fd = fd
        return (
            f"{self.path}: taken over from a run that ended without removing it ({earlier})"
            if earlier
            else None
        )

    def release(self) -> None:
        if self.fd is not None:
            # while still held: a run waiting on the old file then locks a fresh one
            os.unlink(self.path)
            os.close(self.fd)
            self.fd = None


# The files of a model folder that decide its outputs besides the weights and config.json.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
)
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def run_settings(model_dir: str | Path, dtype: str, max_new_tokens: int) -> dict:
    """What a result depends on besides its record, each part a fingerprint: the model's config,
    generation config, weights (checkpoint.fingerprint), tokenizer, chat template
    (tokenizer_config.json's or a file of its own), and the run's dtype and max_new_tokens. A file
    that is absent is fingerprinted as absent (the set-up refuses a folder that lacks what it
    needs)."""
    folder = Path(model_dir)
    try:
        weights = checkpoint.fingerprint(folder)
    except FileNotFoundError:
        weights = "absent"
    config = folder / "tokenizer_config.json"
    try:
        tokenizer_config = json.loads(config.read_text(encoding="utf-8"))
        template = tokenizer_config.pop("chat_template", None)
    except (OSError, ValueError, AttributeError):
        tokenizer_config, template = _files(folder, ["tokenizer_config.json"]), None
    return {
        "model config": _files(folder, ["config.json"]),
        "weights": weights,
        "generation config": _files(folder, ["generation_config.json"]),
        "tokenizer": fingerprint([_files(folder, TOKENIZER_FILES), tokenizer_config]),
        "chat template": fingerprint([template, _files(folder, TEMPLATE_FILES)]),
        "dtype": dtype,
        "max_new_tokens": max_new_tokens,
    }


def _files(folder: Path, names) -> str:
    digest = hashlib.sha256()
    for name in names:
        path = folder / name
        digest.update(name.encode() + (b"\0" + path.read_bytes() if path.is_file() else b"\1"))
    return digest.hexdigest()[:16]


def _line(index: int, record: str, settings: dict, output: list) -> str:
    return (
        json.dumps(
            {"index": index, "record": record, "settings": settings, "output": output},
            ensure_ascii=False,
        )
        + "\n"
    )


def read_results(
    path: Path, records: list[str], settings: dict
) -> tuple[dict[int, list], str | None]:
    """The results already in a results file, each checked against the data's record fingerprints
    `records` and this run's `settings`, and a note if its last line was cut (a run that died while
    writing it, wherever the cut fell, inside a character too: that line is ignored, so its record
    runs again). Any other bad or foreign line is an error naming it and what differs."""
    lines = [
        (n, text) for n, text in read_lines(path, cut_last=True) if text is None or text.strip()
    ]
    done, note = {}, None
    for n, text in lines:
        try:
            rec = json.loads(text)
            index, output = rec["index"], rec["output"]
            if not (
                isinstance(index, int)
                and isinstance(output, list)
                and output
                and isinstance(output[0], dict)
                and isinstance(output[0].get("generated_text"), (str, list))
            ):
                raise ValueError
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, RecursionError):
            if n == lines[-1][0]:
                note = (
                    f"{path}:{n}: the last line is incomplete (cut off by an interrupted run); its "
                    "record runs again"
                )
                break
            raise DataError(
                path,
                n,
                'not a result line ({"index": N, "record": ..., "output": [{"generated_text": '
                "...}]})",
            ) from None
        if not 0 <= index < len(records):
            raise DataError(
                path,
                n,
                f"result index {index} is outside the data's {len(records)} records: these are the "
                "results of other data (pass another --out, or run without --resume)",
            )
        if rec.get("record") != records[index]:
            raise DataError(
                path,
                n,
                f"the result for record {index} was made for another record (other data, or an "
                "older orinfer that wrote no fingerprint): pass another --out, or run without "
                "--resume",
            )
        _check_settings(path, n, rec.get("settings"), settings)
        done[index] = output
    return done, note


def _check_settings(path: Path, n: int, theirs, ours: dict) -> None:
    if theirs == ours:
        return
    if not isinstance(theirs, dict):
        differ = (
            "settings (the line was written by an older orinfer, which fingerprinted only "
            "config.json)"
        )
    else:
        differ = ", ".join(
            k for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)
        )
    raise DataError(
        path,
        n,
        f"the result was made with another {differ}: pass another --out, or run with the same "
        "model folder and options",
    )


class Results:
    """The results of a run. --out is written once, at the end, atomically and in dataset order;
    until then each result is appended to the journal OUT.partial as it finishes (one flushed line),
    so a crash keeps every finished result and the previous --out stays as it was. `records`: each
    record's fingerprint; `settings`: the run's."""

    def __init__(self, out: Path, resume: bool, records: list[str], settings: dict):
        self.out, self.journal = out, beside(out, ".partial")
        self.records, self.settings = records, settings
        self.done: dict[int, list] = {}
        # each result's record fingerprint, from the read that gave its record
        self.marks: dict[int, str] = {}
        self.sink, self.finished = None, False
        if resume:
            for path in (out, self.journal):
                if path.is_file():
                    done, note = read_results(path, records, settings)
                    self.done.update(done)
                    self.marks.update((i, records[i]) for i in done)
                    if note:
                        print(note, file=sys.stderr)
        elif self.journal.is_file() and self.journal.stat().st_size:
            raise DataError(
                self.journal,
                None,
                "holds the results of an interrupted run: pass --resume to keep them, or delete "
                "the file to start afresh",
            )
        self.resumed = len(self.done)

    def begin(self) -> None:
        """The journal, holding exactly the results kept (a cut last line dropped), just before the
        run: written to a new file and renamed into place, so the kept results are on disk at every
        instant, then appended to."""
        staged = beside(self.journal, ".tmp")
        try:
            _write_atomically(
                staged,
                self.journal,
                "".join(self._line(i, o) for i, o in sorted(self.done.items())),
            )
            self.sink = open(self.journal, "a", encoding="utf-8")
        except OSError as e:
            staged.unlink(missing_ok=True)
            raise DataError(self.journal, None, f"cannot be written ({e.strerror})") from None

    def _line(self, index: int, output: list) -> str:
        return _line(index, self.marks[index], self.settings, output)

    def add(self, index: int, output: list, record: dict) -> None:
        """One result, fingerprinted by its `record` as the run read it (inside the clock, in
        test_script.py)."""
        self.marks[index] = fingerprint(record["message"])
        self.sink.write(self._line(index, output))
        self.sink.flush()
        self.done[index] = output

    def finish(self) -> None:
        """--out replaced by every result, in dataset order; the journal is no longer needed."""
        _write_atomically(
            beside(self.out, ".tmp"),
            self.out,
            "".join(self._line(i, o) for i, o in sorted(self.done.items())),
        )
        self.finished = True
        self.close()
        self.journal.unlink(missing_ok=True)

    def close(self) -> None:
        """After a run that stopped: the journal keeps what it holds; one that holds nothing is
        removed. A close that cannot flush (a full disk) loses only the line being written, which
        --resume ignores."""
        if self.sink is not None:
            sink, self.sink = self.sink, None
            try:
                sink.close()
            except OSError:
                pass
            if not self.done:
                self.journal.unlink(missing_ok=True)

    def saved(self) -> str:
        kept = len(self.done)
        if self.finished:
            return f"every result is in {self.out}"
        return (
            f"{kept} results are kept in {self.journal}; --resume runs the rest"
            if kept
            else "no result was lost"
        )


def _write_atomically(staged: Path, path: Path, text: str) -> None:
    """`path` replaced by `text` whole or not at all: written to `staged`, flushed to the disk,
    renamed over it."""
    try:
        with open(staged, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        staged.replace(path)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
