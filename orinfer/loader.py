"""Stream a safetensors checkpoint into the model, one tensor at a time.

safetensors' own `safe_open` always memory-maps the file; on a unified-memory board (Jetson) the mapped pages and
the device copy share the same DRAM, so the peak doubles (safetensors#758). Here each tensor is read with plain
file reads into one reusable host buffer, copied to the device, and its page-cache pages are dropped, so the host
holds at most one tensor at a time. The file format is just a JSON header followed by raw little-endian data.

A table the model leaves on the meta device (the token table, when the memory plan keeps it off the GPU) is instead
read from the file a row at a time, when a pass needs the row (FileRows): the rows read stay in the kernel's page
cache, which it reclaims under pressure, and never in this process's memory beyond one pass (a memory map would make
the pages the process's own, and the kernel maps a fault's neighbours in too).
"""
import os
from pathlib import Path

import torch

from .checkpoint import check_checkpoint, checkpoint_files, read_exactly, read_header, stored_dtype

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
    """Rows of a 2-D tensor stored at `offset` in a checkpoint file, read by token id: `rows(ids)` is
    `table[ids]` (each distinct row read once, with read-ahead off: a pass needs scattered rows)."""

    def __init__(self, path: Path, offset: int, shape: list[int], dtype: torch.dtype):
        self.path, self.offset, self.shape, self.dtype = path, offset, shape, dtype
        self.row_bytes = shape[1] * dtype.itemsize
        self.fd = os.open(path, os.O_RDONLY)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        unique, inverse = torch.unique(ids, return_inverse=True)
        if len(unique) and not 0 <= int(unique[0]) <= int(unique[-1]) < self.shape[0]:
            raise IndexError(f"token id out of range for the {self.shape[0]}-row table")
        size = self.row_bytes
        buffer = bytearray(len(unique) * size)
        view = memoryview(buffer)
        for i, row in enumerate(unique.tolist()):
            read_exactly(self.fd, view[i * size:(i + 1) * size], self.offset + row * size, self.path)
        table = torch.frombuffer(buffer, dtype=self.dtype) if buffer else torch.empty(0, dtype=self.dtype)
        return table.view(len(unique), self.shape[1])[inverse]

    def __del__(self):
        os.close(self.fd)


def serve_from_file(model: torch.nn.Module, folder: str | Path) -> set[str]:
    """Give every table still on the meta device (an Embedding's weight) FileRows over its place in the checkpoint,
    in place of the parameter; returns their names. The stored dtype must be the run's."""
    wanted = {name: p for name, p in model.named_parameters() if p.is_meta}
    served = set(wanted)
    for path in checkpoint_files(folder) if wanted else []:
        header, data_start = read_header(path)
        for name in sorted(set(header) & set(wanted)):
            entry, param = header[name], wanted.pop(name)
            dtype = _DTYPES.get(entry["dtype"])
            if dtype != param.dtype or list(param.shape) != entry["shape"] or len(entry["shape"]) != 2:
                raise ValueError(f"{path.name}: {name} is {entry['dtype']} {entry['shape']}, reading it from the file "
                                 f"needs {param.dtype} {list(param.shape)}")
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            delattr(module, attr)
            module.rows = FileRows(path, data_start + entry["data_offsets"][0], entry["shape"], dtype)
    _check_complete(folder, wanted)
    return served


def load_weights(model: torch.nn.Module, folder: str | Path) -> None:
    """Fill every parameter of `model` (names as in transformers' Phi3ForCausalLM) from the checkpoint.

    Each tensor is converted to the parameter's dtype on the device; tables left on the meta device are read from
    the file as needed (serve_from_file). Unknown or missing names are an error (_check_complete).
    """
    served = serve_from_file(model, folder)
    params, loaded = dict(model.named_parameters()), set(served)
    files = check_checkpoint(folder)
    # One buffer of the largest tensor's size, allocated once: growing it as bigger tensors come would briefly hold
    # the old and the new buffer (measured on the H200: host peak 0.87 GiB over idle instead of ~0.6).
    largest = max((e["data_offsets"][1] - e["data_offsets"][0] for _, h, _ in files for n, e in h.items()
                   if n not in served), default=0)
    buffer = bytearray(largest)
    for path, header, data_start in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                if name in served:
                    continue
                if name not in params:
                    raise KeyError(f"{path.name}: tensor {name!r} has no place in the Phi-3 model")
                param = params[name]
                begin, end = entry["data_offsets"]
                if entry["dtype"] not in _DTYPES:
                    raise TypeError(f"{path.name}: {name} has unsupported dtype {entry['dtype']}")
                if list(param.shape) != entry["shape"]:
                    raise ValueError(f"{path.name}: {name} has shape {entry['shape']}, the model expects {list(param.shape)}")
                size = end - begin
                read_exactly(fd, memoryview(buffer)[:size], data_start + begin, path)
                host = torch.frombuffer(buffer, dtype=_DTYPES[entry["dtype"]], count=size // _DTYPES[entry["dtype"]].itemsize)
                with torch.no_grad():
                    param.copy_(host.view(entry["shape"]))
                if param.device.type != "cpu":
                    torch.cuda.synchronize(param.device)  # the buffer is reused for the next tensor
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, data_start + begin, size, os.POSIX_FADV_DONTNEED)
                loaded.add(name)
        finally:
            os.close(fd)
    _check_complete(folder, set(params) - loaded)
