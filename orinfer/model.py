"""Phi-3 (CausalLM's math and parameter names) over a flat batch of new tokens.

Every operation follows transformers' Phi-3 in order and dtype, so that at float32 the greedy tokens
are the same: RMSNorm in float32 then cast back before the weight, RoPE angles computed in float32
on the model's device then cast, fused qkv_proj split as [q | k | v], fused gate_up_proj split as
[gate | up] with up * silu(gate). Adapted from transformers' modeling_phi3.py
(https://github.com/huggingface/transformers, Apache-2.0): the order of operations, the dtypes and
the parameter names; the eager MLP runs gate and up as two products on the fused weight's halves.
"""

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention.core import Context, paged_attention
from .config import ModelConfig
from .integers import ceil_div
from .kernels import EAGER, Kernels


class Linear(nn.Module):
    """x @ weight.T with the weight left uninitialised: every weight comes from the checkpoint, and
    initialising nn.Linear's even on the meta device imports torch's compiler stack (~0.1 GiB of
    host memory) for nothing."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Embedding(nn.Module):
    """Rows of the table by token id, the table left uninitialised as Linear's; or, once the loader
    gives it `rows` (loader.FileRows), read from the checkpoint's file in place of the parameter."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim))
        self.rows = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows(ids) if self.rows is not None else F.embedding(ids, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, kernels: Kernels):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))
        self.eps, self.kernels = eps, kernels

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); or, given the residual stream, (residual + x, norm(residual + x)) in one fused
        step."""
        if residual is None:
            return self.kernels.rms_norm(x, self.weight, self.eps)
        return self.kernels.add_rms_norm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, kernels: Kernels):
        super().__init__()
        self.kernels = kernels
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.dim = cfg.head_dim
        self.qkv_proj = Linear(
            cfg.hidden_size, (self.heads + 2 * self.kv_heads) * self.dim, cfg.attention_bias
        )
        self.o_proj = Linear(self.heads * self.dim, cfg.hidden_size)
        # bound by the runner to this layer's slice of the KV pool
        self.k_cache = self.v_cache = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        ctx: Context,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Every token's keys and values are written to the cache; the output is `rows`' only (None:
        all)."""
        tokens = x.shape[0]
        qk, v = self.qkv_proj(x).split(
            [(self.heads + self.kv_heads) * self.dim, self.kv_heads * self.dim], -1
        )
        # Query and key heads rotate together: one kernel, and the views below need no copy.
        q, k = self.kernels.rope(qk.view(tokens, -1, self.dim), cos, sin).split(
            [self.heads, self.kv_heads], dim=1
        )
        v = v.view(tokens, self.kv_heads, self.dim)
        out = paged_attention(q, k, v, self.k_cache, self.v_cache, ctx)
        return self.o_proj(out if rows is None else out[rows])


class MLP(nn.Module):
    """`rows`: the most tokens one product takes (a longer pass goes through in parts: the same
    products row by row, rounded as a batch of another size would be), which bounds the [tokens,
    intermediate] activations; None: all at once."""

    def __init__(self, cfg: ModelConfig, kernels: Kernels, rows: int | None = None):
        super().__init__()
        self.kernels, self.rows = kernels, rows
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows is not None and x.shape[0] > self.rows:
            return torch.cat([self._rows(part) for part in x.split(self.rows)])
        return self._rows(x)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        # a fused kernel reads the strided halves of the one product at full speed
        if self.kernels.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        # eager kernels use vector loads on contiguous tensors only: two products on views of the
        # one weight
        else:
            gate_w, up_w = self.gate_up_proj.weight.chunk(2, dim=0)
            gate, up = F.linear(x, gate_w), F.linear(x, up_w)
        return self.down_proj(self.kernels.silu_mul(gate, up))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, kernels: Kernels, mlp_rows: int | None):
        super().__init__()
        self.self_attn = Attention(cfg, kernels)
        self.mlp = MLP(cfg, kernels, mlp_rows)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kernels)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kernels)

    def forward(
        self,
        h: torch.Tensor,
        delta: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        ctx: Context,
        rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h is the residual stream before the previous layer's MLP output `delta` is added (None
        for the first layer): each add is fused into the norm that reads its result. Returns the
        same pair for the next layer, for `rows` only where given (the last layer: what follows its
        attention is needed where a token is sampled, and its keys and values, all that later tokens
        read, are written for every token)."""
        if delta is None:
            x = self.input_layernorm(h)
        else:
            h, x = self.input_layernorm(delta, h)
        h, x = self.post_attention_layernorm(
            self.self_attn(x, cos, sin, ctx, rows), h if rows is None else h[rows]
        )
        return h, self.mlp(x)


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, kernels: Kernels, mlp_rows: int | None):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, kernels, mlp_rows) for _ in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kernels)


def _place_parameters(
    modules: list[nn.Module], device: torch.device | str, dtype: torch.dtype
) -> None:
    """Gives the modules' own parameters one allocation on `device` (each a view of it, 128-byte
    aligned or more). torch.empty, not to_empty(): that goes through torch._refs, which imports
    sympy (host memory)."""
    owned = [(m, name, p.shape) for m in modules for name, p in m.named_parameters(recurse=False)]
    sizes = [ceil_div(math.prod(shape), 64) * 64 for _, _, shape in owned]
    flat = torch.empty(sum(sizes), dtype=dtype, device=device)
    for (module, name, shape), start in zip(owned, itertools.accumulate([0] + sizes)):
        view = flat[start : start + math.prod(shape)].view(shape)
        setattr(module, name, nn.Parameter(view, requires_grad=False))


class CausalLM(nn.Module):
    """Parameters are created uninitialised on `device`; the loader (or a benchmark) must fill every
    one. `kernels`: the elementwise functions every layer calls (kernels.EAGER, or
    kernels.compiled()).

    `embedding_on_host`: the token table stays on the meta device until the loader has it read from
    the checkpoint's file row by row (loader.serve_from_file). A pass reads one row a token, so on a
    unified-memory board the table's 0.31 GiB need not sit in the GPU's pool. forward() is then
    given the ids on the host, reads their rows there and sends them up.

    `mlp_rows`: the most tokens one MLP product takes (the memory plan's; None: a pass's all)."""

    def __init__(
        self,
        cfg: ModelConfig,
        device: torch.device | str,
        dtype: torch.dtype,
        kernels: Kernels = EAGER,
        embedding_on_host: bool = False,
        mlp_rows: int | None = None,
    ):
        super().__init__()
        self.cfg, self.kernels, self.embedding_on_host = cfg, kernels, embedding_on_host
        # shapes only; each parameter is then made once, on its device, in `dtype`
        with torch.device("meta"):
            self.model = DecoderModel(cfg, kernels, mlp_rows)
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        # One allocation a decoder layer and one for the rest: torch's allocator gives a tensor over
        # 1 MiB a segment rounded up to 2 MiB and splits off no remainder of 1 MiB or less, so
        # Phi-3-medium's qkv_proj (75 MiB) and down_proj (175 MiB) made one by one held 80 MiB more
        # than their bytes: KV cache the plan would lose.
        in_layers = {id(m) for layer in self.model.layers for m in layer.modules()}
        table = self.model.embed_tokens if embedding_on_host else None
        for part in [list(layer.modules()) for layer in self.model.layers] + [
            [m for m in self.modules() if id(m) not in in_layers and m is not table]
        ]:
            _place_parameters(part, device, dtype)
        if table is not None:
            shape = table.weight.shape
            table.weight = nn.Parameter(
                torch.empty(shape, dtype=dtype, device="meta"), requires_grad=False
            )
        # RoPE angles are computed per pass from the positions, as transformers computes them
        # (float32, one product per position and frequency): any position works, past
        # max_position_embeddings too, as it does there.
        dim = cfg.head_dim
        self.inv_freq = (
            1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        ).to(device)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def forward(self, input_ids: torch.Tensor, ctx: Context) -> torch.Tensor:
        """Greedy next token for each of ctx.sample_rows; logits are never formed for the other
        positions."""
        # the padded layout's masks, say: once a pass, not once a layer
        ctx.layout.prepare(self.dtype)
        freqs = ctx.positions.float()[:, None] * self.inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        cos, sin = angles.cos().to(self.dtype), angles.sin().to(self.dtype)
        # a table read on the host sends its rows up itself (loader.FileRows)
        h, delta = self.model.embed_tokens(input_ids), None
        *layers, last = self.model.layers
        for layer in layers:
            h, delta = layer(h, delta, cos, sin, ctx)
        h, delta = last(h, delta, cos, sin, ctx, ctx.sample_rows)
        logits = self.lm_head(self.model.norm(delta, h)[1])
        return logits.argmax(dim=-1)
