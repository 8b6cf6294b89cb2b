"""A safetensors checkpoint's files and tables, read and checked without torch: each file is an
8-byte header length, a JSON table of tensors (dtype, shape, byte range) and the data those ranges
cover exactly.

Every shard is checked against its header before any weight is read, so a truncated download or a
corrupt file is one line naming the file, never a load that hangs at the end of a short file or
fails half-way through 26 GiB. Format: https://github.com/huggingface/safetensors#format (the same
checks safetensors' own reader makes).
"""

import hashlib
import json
import math
import os
import struct
from pathlib import Path

from .dataset import DataError

# Bytes an element of each safetensors dtype takes (the ones this project loads are in
# loader._DTYPES).
ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON table


class CheckpointError(DataError):
    """A checkpoint file that is not whole or not a safetensors file: `str()` names the file and
    what to do."""

    def __init__(self, path: Path, what: str):
        super().__init__(path, None, what)


def checkpoint_files(folder: str | Path) -> list[Path]:
    """The folder's shards: those its index names, else every *.safetensors file."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(
                set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(
                index, "not a safetensors index (JSON with a 'weight_map' of tensor -> file)"
            ) from None
        files = [folder / n for n in names]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{folder}: no *.safetensors files (only safetensors checkpoints are loaded)"
        )
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(
            index, f"names shards that are not in the folder: {', '.join(missing)}"
        )
    return files


def read_header(path: Path) -> tuple[dict, int]:
    """The tensor table of one file (without __metadata__) and the offset where its data starts,
    checked: the header fits the file, every entry is well formed, and the tensors' bytes end
    exactly at the end of the file."""
    size = path.stat().st_size
    truncated = "truncated or not a safetensors file: copy or download it again"
    with open(path, "rb") as f:
        if size < 8:
            raise CheckpointError(path, f"is {size} bytes, {truncated}")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(size - 8, MAX_HEADER):
            raise CheckpointError(
                path, f"its header claims {n} bytes and the file has {size}: {truncated}"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):
        header = None
    if not isinstance(header, dict):
        raise CheckpointError(path, f"its header is not a JSON table of tensors: {truncated}")
    header.pop("__metadata__", None)
    end = max((_entry_end(path, name, entry) for name, entry in header.items()), default=0)
    if end != size - 8 - n:
        raise CheckpointError(
            path, f"is {size} bytes but its header describes {8 + n + end}: {truncated}"
        )
    return header, 8 + n


def _entry_end(path: Path, name: str, entry) -> int:
    """Where a tensor's bytes end, after checking that its byte range holds exactly its shape in its
    dtype."""
    try:
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        ok = all(isinstance(v, int) and v >= 0 for v in (*shape, begin, end)) and begin <= end
    except (TypeError, KeyError, ValueError):
        ok = False
    if ok and dtype in ITEMSIZE:
        ok = end - begin == math.prod(shape) * ITEMSIZE[dtype]
    if not ok:
        raise CheckpointError(
            path,
            f"the header's entry for {name!r} is not a well-formed tensor: the file is corrupt",
        )
    return end


def check_checkpoint(folder: str | Path) -> list[tuple[Path, dict, int]]:
    """Every shard with its checked header and data offset (a CheckpointError names the first that
    is not whole)."""
    return [(path, *read_header(path)) for path in checkpoint_files(folder)]


def stored_dtype(folder: str | Path, name: str) -> str | None:
    """The safetensors dtype `name` is stored in, or None where the folder has no checkpoint holding
    it."""
    try:
        shards = check_checkpoint(folder)
    except (FileNotFoundError, CheckpointError):
        return None
    entry = next((h[name] for _, h, _ in shards if name in h), None)
    return entry["dtype"] if entry else None


def read_exactly(fd: int, view: memoryview, offset: int, path: Path) -> None:
    """Fill `view` from the file at `offset`: a short read (the file shrank since its header was
    checked) is an error, not a loop that waits for bytes that will never come."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            raise CheckpointError(
                path,
                f"ended at byte {offset + got} while reading its tensors: it was truncated after "
                "it was checked; copy or download it again",
            )
        got += n


SAMPLES, SAMPLE_BYTES = 16, 4096


def fingerprint(folder: str | Path) -> str:
    """What identifies the weights without reading 26 GiB: each shard's name, size and checked
    header, and 16 samples of 4 KiB spread over its data (two trainings of one architecture share
    headers and sizes, never those bytes; an edit confined to bytes no sample reads goes unseen)."""
    digest = hashlib.sha256()
    for path, header, start in check_checkpoint(folder):
        size = path.stat().st_size
        table = json.dumps(header, sort_keys=True)
        digest.update(f"{path.name}\0{size}\0{table}\0".encode())
        span = max(0, size - start - SAMPLE_BYTES)
        with open(path, "rb") as f:
            for k in range(SAMPLES):
                f.seek(start + span * k // (SAMPLES - 1))
                digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()[:16]
