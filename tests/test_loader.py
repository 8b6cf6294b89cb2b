import pytest
import torch

from orinfer.config import ModelConfig
from orinfer.loader import load_weights
from orinfer.model import CausalLM
from orinfer.tiny import write_tiny_model


def load(folder, dtype=torch.float32):
    model = CausalLM(ModelConfig.from_folder(folder), "cpu", dtype)
    load_weights(model, folder)
    return model


def test_sharded_folder_with_index_loads_the_same_weights(tmp_path):
    one = load(write_tiny_model(tmp_path / "one", seed=3))
    three_dir = write_tiny_model(tmp_path / "three", seed=3, shards=3)
    assert (three_dir / "model.safetensors.index.json").exists() and len(
        list(three_dir.glob("*.safetensors"))
    ) == 3
    three = load(three_dir)
    for (name, a), (_, b) in zip(one.state_dict().items(), three.state_dict().items()):
        assert torch.equal(a, b), name
    assert one.cfg.num_parameters == sum(p.numel() for p in one.parameters())


def test_bf16_checkpoint_converts_to_the_requested_dtype(tmp_path):
    folder = write_tiny_model(tmp_path, seed=4, dtype=torch.bfloat16)
    model = load(folder, torch.float32)
    ref = load(folder, torch.bfloat16)
    assert torch.equal(model.lm_head.weight, ref.lm_head.weight.float())


def test_missing_and_unknown_tensors_are_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = write_tiny_model(tmp_path, seed=5)
    # Copies: older safetensors (0.4) map the file, which the first save_file below truncates (a bus error after).
    weights = {k: v.clone() for k, v in load_file(folder / "model.safetensors").items()}
    save_file(
        {k: v for k, v in weights.items() if k != "lm_head.weight"}, folder / "model.safetensors"
    )
    with pytest.raises(KeyError, match="lacks 1 weights"):
        load(folder)
    save_file({**weights, "model.extra.weight": torch.zeros(2)}, folder / "model.safetensors")
    with pytest.raises(KeyError, match="model.extra.weight"):
        load(folder)


LOAD_AND_MEASURE = """
import sys, torch
sys.path.insert(0, {root!r})
from orinfer.config import ModelConfig
from orinfer.loader import load_weights
from orinfer.memory import peak_rss_bytes, rss_bytes
from orinfer.model import CausalLM
model = CausalLM(ModelConfig.from_folder({folder!r}), "cpu", torch.bfloat16)
before = rss_bytes()
load_weights(model, {folder!r})
params = sum(p.numel() * p.element_size() for p in model.parameters())
print(peak_rss_bytes() - before - params, params)
"""


def test_loading_stages_one_tensor_at_a_time(tmp_path):
    """Host memory beyond the parameters themselves stays near one tensor (the reusable read buffer), not a copy of
    the checkpoint: on a Jetson the host copy would sit in the same DRAM as the weights."""
    import subprocess
    import sys
    from conftest import ROOT

    folder = write_tiny_model(
        tmp_path,
        seed=6,
        dtype=torch.bfloat16,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=16,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    script = LOAD_AND_MEASURE.format(root=str(ROOT), folder=str(folder))
    extra, params = map(
        int,
        subprocess.run(
            [sys.executable, "-c", script], check=True, capture_output=True, text=True
        ).stdout.split(),
    )
    largest = 32064 * 1024 * 2
    assert params > 500 * 2**20  # a checkpoint big enough for a full copy to show
    assert extra < largest + 128 * 2**20, f"{extra / 2**20:.0f} MiB staged beyond the parameters"


def test_a_table_left_on_meta_is_read_from_the_file_row_by_row(tmp_path):
    folder = write_tiny_model(tmp_path, seed=5)
    model = CausalLM(ModelConfig.from_folder(folder), "cpu", torch.float32, embedding_on_host=True)
    assert model.model.embed_tokens.weight.is_meta and not model.lm_head.weight.is_meta
    load_weights(model, folder)
    table = load(folder).model.embed_tokens.weight
    embed = model.model.embed_tokens
    assert "model.embed_tokens.weight" not in dict(
        model.named_parameters()
    )  # no copy of the table is held
    ids = torch.tensor([7, 0, 7, table.shape[0] - 1, 3])  # repeats, both ends of the table
    assert torch.equal(embed(ids), table[ids])
    assert embed(torch.tensor([], dtype=torch.int64)).shape == (0, table.shape[1])
    with pytest.raises(IndexError, match="out of range"):
        embed(torch.tensor([table.shape[0]]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_rows_read_on_the_host_go_up_from_pinned_memory(tmp_path):
    """The rows arrive on the device, and nothing is copied up from pageable memory (such a copy
    waits for the pass in flight before it returns)."""
    from torch.profiler import ProfilerActivity, profile

    folder = write_tiny_model(tmp_path, seed=5)
    model = CausalLM(ModelConfig.from_folder(folder), "cuda", torch.float32, embedding_on_host=True)
    load_weights(model, folder)
    table = load(folder).model.embed_tokens.weight
    ids = torch.tensor([7, 0, 7, table.shape[0] - 1, 3])
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):  # the pinned buffer reused once its copy is done
            rows = model.model.embed_tokens(ids)
        torch.cuda.synchronize()
    assert rows.device.type == "cuda" and torch.equal(rows.cpu(), table[ids])
    copies = [e.name for e in prof.events() if "Memcpy HtoD" in e.name]
    assert copies and not [name for name in copies if "Pageable" in name]


def test_reading_a_table_from_the_file_needs_the_stored_dtype(tmp_path):
    folder = write_tiny_model(tmp_path, seed=6, dtype=torch.bfloat16)
    model = CausalLM(ModelConfig.from_folder(folder), "cpu", torch.float32, embedding_on_host=True)
    with pytest.raises(ValueError, match="reading it from the file needs torch.float32"):
        load_weights(model, folder)


def test_the_token_table_is_read_once_in_the_warm_up_and_the_load_says_how_fast(tmp_path):
    from orinfer.loader import FileRows, LoadReport, block_device

    folder = write_tiny_model(tmp_path, seed=6)
    model = CausalLM(ModelConfig.from_folder(folder), "cpu", torch.float32, embedding_on_host=True)
    report = load_weights(model, folder)
    rows = model.model.embed_tokens.rows
    assert isinstance(rows, FileRows) and rows.warm() == rows.shape[0] * rows.row_bytes
    assert report.bytes == sum(
        p.nbytes for p in model.parameters()
    ) and report.disk == block_device(folder)
    assert "GiB of weights in" in report.describe() and "\n" not in report.describe()
    slow = LoadReport(26 * 2**30, 110.0, "mmcblk0").describe()
    assert slow.splitlines()[1].startswith("!! the checkpoint's disk reads under 1 GB/s")


def test_a_missing_or_misshapen_tensor_is_found_before_any_is_read(tmp_path, monkeypatch):
    """The headers alone show the checkpoint cannot fill the model: nothing is read first (on an
    Orin the reads take minutes)."""
    from safetensors.torch import load_file, save_file

    from orinfer import loader

    folder = write_tiny_model(tmp_path, seed=5)
    weights = {k: v.clone() for k, v in load_file(folder / "model.safetensors").items()}
    reads = []
    monkeypatch.setattr(loader, "read_exactly", lambda *args: reads.append(args))
    save_file({k: v for k, v in weights.items() if k != "model.norm.weight"},
              folder / "model.safetensors")  # fmt: skip
    with pytest.raises(KeyError, match="lacks 1 weights"):
        load(folder)
    hidden = len(weights["model.norm.weight"])
    bad = dict(weights, **{"model.norm.weight": torch.zeros(hidden, 2)})
    save_file(bad, folder / "model.safetensors")
    with pytest.raises(ValueError, match=rf"model.norm.weight has shape \[{hidden}, 2\]"):
        load(folder)
    assert reads == []


def test_derived_rotary_frequencies_stored_in_a_checkpoint_are_skipped(tmp_path):
    """Older Llama folders store each layer's rotary_emb.inv_freq, which the model computes."""
    from safetensors.torch import load_file, save_file

    folder = write_tiny_model(tmp_path, seed=6)
    plain = load(folder)
    weights = {k: v.clone() for k, v in load_file(folder / "model.safetensors").items()}
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(weights, folder / "model.safetensors")
    for (name, a), (_, b) in zip(plain.state_dict().items(), load(folder).state_dict().items()):
        assert torch.equal(a, b), name
