"""Stream a safetensors checkpoint into the model, one tensor at a time.

safetensors' own `safe_open` always memory-maps the file; on a unified-memory board (Jetson) the
mapped pages and the device copy share the same DRAM, so the peak doubles (safetensors#758). Here
each tensor is read with plain file reads into one reusable host buffer, copied to the device, and
its page-cache pages are dropped, so the host holds at most one tensor at a time. The file format is
just a JSON header followed by raw little-endian data.

A table the model leaves on the meta device (the token table, when the memory plan keeps it off the
GPU) is instead read from the file a row at a time, when a pass needs the row (FileRows): the rows
read stay in the kernel's page cache, which it reclaims under pressure, and never in this process's
memory beyond one pass (a memory map would make the pages the process's own, and the kernel maps a
fault's neighbours in too).
"""

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .attention.core import as_words
from .checkpoint import check_checkpoint, checkpoint_files, read_exactly, read_header, stored_dtype
from .families import fused_rows, weight_targets
from .staging import Staging, writable

_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def tensor_dtype(folder: str | Path, name: str) -> torch.dtype | None:
    """The dtype `name` is stored in, or None where the folder has no checkpoint holding it."""
    return _DTYPES.get(stored_dtype(folder, name))


def _check_complete(folder: str | Path, missing) -> None:
    """A weight left unfilled is an error: a silently uninitialised one would still produce text."""
    if missing:
        missing = sorted(missing)
        raise KeyError(f"{folder}: checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")


class FileRows:
    """Rows of a 2-D tensor stored at `offset` in a checkpoint file, read by token id: `rows(ids)`
    is `table[ids]` on `device` (each distinct row read once, with read-ahead off: a pass needs
    scattered rows). The distinct rows are read into a pinned buffer and go up with the ids' places
    among them in one copy that does not wait for the pass in flight; the device picks the rows."""

    def __init__(
        self, path: Path, offset: int, shape: list[int], dtype: torch.dtype, device: torch.device
    ):
        self.path, self.offset, self.shape, self.dtype = path, offset, shape, dtype
        self.row_bytes = shape[1] * dtype.itemsize
        self.staging = Staging(device)
        self.fd = os.open(path, os.O_RDONLY)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        unique, inverse = torch.unique(ids, return_inverse=True)
        if len(unique) and not 0 <= int(unique[0]) <= int(unique[-1]) < self.shape[0]:
            raise IndexError(f"token id out of range for the {self.shape[0]}-row table")
        size, rows = self.row_bytes, unique.tolist()
        table_bytes = len(rows) * size  # a multiple of 8: the places that follow are int64

        def fill(buffer: torch.Tensor) -> None:
            view = writable(buffer)
            for i, row in enumerate(rows):
                read_exactly(self.fd, view[i * size : (i + 1) * size], self.offset + row * size,
                             self.path)  # fmt: skip
            buffer[table_bytes:].view(torch.int64).copy_(inverse.view(-1))

        sent = self.staging.send(table_bytes + 8 * inverse.numel(), fill)
        table = sent[:table_bytes].view(self.dtype).view(len(rows), self.shape[1])
        # picked as words: torch before 2.8 moves an element a thread step
        picked = as_words(table)[sent[table_bytes:].view(torch.int64).view(-1)]
        return picked.view(self.dtype).view(*inverse.shape, self.shape[1])

    def warm(self) -> int:
        """Read the whole table once, in order, so its rows sit in the page cache (reclaimable) when
        passes ask for them: after a 26 GiB load the cache no longer holds them, and each distinct
        token would be a cold random read inside the timed run. The same bytes whatever the data;
        returns them."""
        size = self.shape[0] * self.row_bytes
        buffer = memoryview(bytearray(min(size, 16 << 20)))
        with open(self.path, "rb", buffering=0) as f:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), self.offset, size, os.POSIX_FADV_WILLNEED)
            for at in range(0, size, len(buffer)):
                read_exactly(
                    f.fileno(), buffer[: min(len(buffer), size - at)], self.offset + at, self.path
                )
        return size

    def __del__(self):
        os.close(self.fd)


def serve_from_file(model: torch.nn.Module, folder: str | Path) -> set[str]:
    """Give every table still on the meta device (an Embedding's weight) FileRows over its place in
    the checkpoint, in place of the parameter, its rows sent to the model's device; returns their
    names. The stored dtype must be the run's."""
    wanted = {name: p for name, p in model.named_parameters() if p.is_meta}
    served = set(wanted)
    # where the rows go: the device the rest of the model is on
    device = next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))
    for path in checkpoint_files(folder) if wanted else []:
        header, data_start = read_header(path)
        for name in sorted(set(header) & set(wanted)):
            entry, param = header[name], wanted.pop(name)
            dtype = _DTYPES.get(entry["dtype"])
            if (
                dtype != param.dtype
                or list(param.shape) != entry["shape"]
                or len(entry["shape"]) != 2
            ):
                raise ValueError(
                    f"{path.name}: {name} is {entry['dtype']} {entry['shape']}, reading it from "
                    f"the file needs {param.dtype} {list(param.shape)}"
                )
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            delattr(module, attr)
            module.rows = FileRows(
                path, data_start + entry["data_offsets"][0], entry["shape"], dtype, device
            )
    _check_complete(folder, wanted)
    return served


@dataclass(frozen=True)
class LoadReport:
    """How the checkpoint was read: bytes, seconds, and the block device holding it (nvme0n1,
    mmcblk0...)."""

    bytes: int
    seconds: float
    disk: str

    SLOW = 1e9  # bytes/s under which the load is worth a warning: an NVMe drive gives 1.5-3 GB/s

    def describe(self) -> str:
        rate = self.bytes / max(self.seconds, 1e-9)
        line = (
            f"load: {self.bytes / 2**30:.2f} GiB of weights in {self.seconds:.1f} s "
            f"({rate / 1e9:.2f} GB/s) from {self.disk}"
        )
        if rate < self.SLOW and self.bytes > 2**30:
            line += (
                "\n!! the checkpoint's disk reads under 1 GB/s: an eMMC or SD card loads 26 GiB "
                "in minutes; an NVMe drive in ~15 s (docs/JETSON.md)"
            )
        return line


def block_device(path: Path) -> str:
    """The block device a file lives on, by its name in /sys/dev/block (the partition's disk, e.g.
    nvme0n1p1)."""
    dev = os.stat(path).st_dev
    link = Path("/sys/dev/block") / f"{os.major(dev)}:{os.minor(dev)}"
    try:
        return link.resolve(strict=True).name
    except OSError:
        number = f"{os.major(dev)}:{os.minor(dev)}"
        return f"device {number} (not a block device: a network or overlay file system?)"


# Buffers some checkpoints store though the model derives them (older Llama folders keep each
# layer's rotary frequencies; transformers ignores them on load too): skipped.
DERIVED = (".rotary_emb.inv_freq",)


def load_weights(model: torch.nn.Module, folder: str | Path) -> LoadReport:
    """Fill every parameter of `model` from the checkpoint, its names mapped by the family's table
    (families.py: separate projections into their rows of the fused ones, a tied table into the LM
    head too).

    Each tensor is converted to the parameter's dtype on the device; tables left on the meta device
    are read from the file as needed (serve_from_file). Unknown, missing, misshapen or partly filled
    parameters are an error, found from the files' headers before any tensor is read.
    """
    start = time.perf_counter()
    served = serve_from_file(model, folder)
    params = dict(model.named_parameters())
    files = check_checkpoint(folder)
    cfg, split = model.cfg, fused_rows(model.cfg)

    def targets(name: str) -> list[tuple[str, int]]:  # where a stored tensor goes, besides the file
        if name.endswith(DERIVED):
            return []
        places = weight_targets(name, cfg.family, split, cfg.tie_word_embeddings)
        return [t for t in places if t[0] not in served]

    reads = _read_plan(folder, files, params, served, targets)
    # One buffer of the largest tensor's size, allocated once: growing it as bigger tensors come
    # would briefly hold the old and the new buffer, a higher host peak.
    sizes = (
        e["data_offsets"][1] - e["data_offsets"][0] for _, _, items in reads for _, e, _ in items
    )
    buffer, read = bytearray(max(sizes, default=0)), 0
    for path, data_start, items in reads:
        fd = os.open(path, os.O_RDONLY)
        try:
            for _, entry, parts in items:
                read += _load_tensor(fd, path, entry, data_start, parts, buffer)
        finally:
            os.close(fd)
    return LoadReport(read, time.perf_counter() - start, block_device(files[0][0]))


def _read_plan(folder, files, params: dict, served: set, targets) -> list:
    """Each file's tensors that fill a parameter, in file order, each with the parameter rows it
    goes to: checked whole against the model (a dtype this reads, a place in the model of the
    stored shape, every parameter's rows filled) before a byte of data is read."""
    reads, filled = [], {}
    for path, header, data_start in files:
        items = []
        for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            places = targets(name)
            if not places:
                continue
            if entry["dtype"] not in _DTYPES:
                raise TypeError(f"{path.name}: {name} has unsupported dtype {entry['dtype']}")
            parts = [_part(path, name, entry, params, target, row) for target, row in places]
            for target, row in places:
                filled.setdefault(target, set()).add(
                    (row, entry["shape"][0] if entry["shape"] else 1)
                )
            items.append((name, entry, parts))
        reads.append((path, data_start, items))
    unfilled = [
        n
        for n, p in params.items()
        if n not in served and sum(r for _, r in filled.get(n, ())) != len(p)
    ]
    _check_complete(folder, unfilled)
    return reads


def _part(path: Path, name: str, entry: dict, params: dict, target: str, row: int):
    """The rows of parameter `target` a stored tensor fills from `row` on, its shape checked."""
    if target not in params:
        raise KeyError(f"{path.name}: tensor {name!r} has no place in the model")
    part = params[target][row : row + entry["shape"][0]] if entry["shape"] else params[target]
    if list(part.shape) != entry["shape"]:
        raise ValueError(
            f"{path.name}: {name} has shape {entry['shape']}, the model expects {list(part.shape)}"
        )
    return part


def _load_tensor(
    fd: int, path: Path, entry: dict, data_start: int, parts: list, buffer: bytearray
) -> int:
    """One tensor from the file into each of its parameter rows (`parts`), through `buffer`; its
    pages then leave the page cache."""
    begin, end = entry["data_offsets"]
    size, dtype = end - begin, _DTYPES[entry["dtype"]]
    read_exactly(fd, memoryview(buffer)[:size], data_start + begin, path)
    host = torch.frombuffer(buffer, dtype=dtype, count=size // dtype.itemsize)
    with torch.no_grad():
        for part in parts:
            part.copy_(host.view(entry["shape"]))
    if parts[0].device.type != "cpu":
        torch.cuda.synchronize(parts[0].device)  # the buffer is reused for the next tensor
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, data_start + begin, size, os.POSIX_FADV_DONTNEED)
    return size
