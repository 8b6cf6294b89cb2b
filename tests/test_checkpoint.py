"""The checkpoint's files checked before any weight loads: whole, well formed, and fingerprinted by their headers."""

import os

import pytest
import torch
from safetensors.torch import save_file

from orinfer import checkpoint
from orinfer.checkpoint import CheckpointError, check_checkpoint, read_exactly

pytestmark = pytest.mark.unit


@pytest.fixture
def shard(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(4, 8), "b": torch.zeros(3, dtype=torch.bfloat16)}, path)
    return path


def test_a_whole_file_passes_and_its_header_describes_every_byte(shard):
    [(path, header, start)] = check_checkpoint(shard.parent)
    assert path == shard and set(header) == {"a", "b"}
    assert start + max(e["data_offsets"][1] for e in header.values()) == shard.stat().st_size


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda raw: raw[:-1], "is .* bytes but its header describes"),
        (lambda raw: raw + b"\0", "is .* bytes but its header describes"),
        (lambda raw: raw[:3], "is 3 bytes, truncated"),
        (
            lambda raw: (10**12).to_bytes(8, "little") + raw[8:],
            "its header claims 1000000000000 bytes",
        ),
        (
            lambda raw: raw.replace(b'"shape":[4,8]', b'"shape":[4,9]'),
            "the header's entry for 'a' is not a well-formed",
        ),
        (
            lambda raw: raw.replace(b'"dtype"', b'"dtyp_"', 1),
            "the header's entry for '.' is not a well-formed tensor",
        ),
    ],
)
def test_a_damaged_file_is_one_error_naming_it(shard, damage, message):
    shard.write_bytes(damage(shard.read_bytes()))
    with pytest.raises(CheckpointError, match=f"{shard}: {message}"):
        check_checkpoint(shard.parent)


def test_a_file_cut_after_its_check_is_an_error_not_a_hang(shard):
    size = shard.stat().st_size
    fd = os.open(shard, os.O_RDONLY)
    try:
        buffer = memoryview(bytearray(64))
        read_exactly(fd, buffer, size - 64, shard)  # the last 64 bytes: there
        with pytest.raises(
            CheckpointError, match="ended at byte .* while reading its tensors: it was truncated"
        ):
            read_exactly(
                fd, buffer, size - 32, shard
            )  # a file shorter than its header said: an error, at once
    finally:
        os.close(fd)


def test_the_fingerprint_follows_the_headers_and_the_weights(shard, tmp_path):
    before = checkpoint.fingerprint(shard.parent)
    save_file({"a": torch.ones(4, 8), "b": torch.zeros(3, dtype=torch.bfloat16)}, shard)
    assert checkpoint.fingerprint(shard.parent) == before  # the same tensors written again
    save_file({"a": torch.ones(4, 8), "c": torch.zeros(3, dtype=torch.bfloat16)}, shard)
    assert checkpoint.fingerprint(shard.parent) != before  # another name
    save_file({"a": torch.full((4, 8), 2.0), "b": torch.zeros(3, dtype=torch.bfloat16)}, shard)
    assert checkpoint.fingerprint(shard.parent) != before  # the same header, other values
