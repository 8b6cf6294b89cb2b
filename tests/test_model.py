"""The model's parts that the engine-against-pipeline tests do not isolate: the MLP taken in parts of rows, and where
the parameters are allocated."""

import dataclasses

import pytest
import torch

from orinfer.config import ModelConfig
from orinfer.kernels import EAGER
from orinfer.model import MLP, CausalLM
from orinfer.tiny import ASSETS, tiny_config

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("rows", [1, 7, 50])
def test_mlp_in_parts_of_rows_gives_every_rows_result(rows):
    cfg = dataclasses.replace(
        ModelConfig.from_folder(ASSETS), hidden_size=64, intermediate_size=176
    )
    whole, parts = MLP(cfg, EAGER), MLP(cfg, EAGER, rows=rows)
    g = torch.Generator().manual_seed(0)
    for a, b in zip(whole.parameters(), parts.parameters()):
        a.data = b.data = torch.randn(a.shape, generator=g) * 0.05
    x = torch.randn(23, 64, generator=g)
    out = parts(x)
    assert out.shape == (23, 64)
    torch.testing.assert_close(
        out, whole(x), rtol=1e-5, atol=1e-6
    )  # float32: a product of other rows rounds alike
    torch.testing.assert_close(parts(x[:5]), whole(x[:5]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("table_on_host", [False, True])
def test_parameters_take_one_allocation_a_layer_and_one_for_the_rest(table_on_host):
    cfg = ModelConfig.from_dict(tiny_config(num_hidden_layers=3))
    model = CausalLM(cfg, "cpu", torch.float32, embedding_on_host=table_on_host)

    def storages(module):
        return {p.untyped_storage().data_ptr() for p in module.parameters()}

    layers = [storages(layer) for layer in model.model.layers]
    assert all(len(s) == 1 for s in layers) and len(set().union(*layers)) == cfg.num_hidden_layers
    rest = storages(model.lm_head) | storages(model.model.norm)
    rest |= set() if table_on_host else storages(model.model.embed_tokens)
    assert len(rest) == 1 and not rest & set().union(*layers)
    assert model.model.embed_tokens.weight.is_meta == table_on_host
    for p in (
        model.parameters()
    ):  # each a view of its own part of the allocation, aligned for vector loads
        assert p.is_contiguous() and (
            p.is_meta or (p.data_ptr() - p.untyped_storage().data_ptr()) % 128 == 0
        )
    spans = sorted(
        (p.data_ptr(), p.data_ptr() + p.nbytes) for p in model.parameters() if not p.is_meta
    )
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))  # no two overlap
