"""The budget arithmetic: Phi-3-medium on a 32 GB Jetson, budgets that are too small, and budget parsing."""

import pytest
import torch

from orinfer.config import ModelConfig
from orinfer.attention import BACKENDS
from orinfer import memory
from orinfer.memory import (
    GRAPHS_HOST_BYTES,
    MIN_KV_TOKENS,
    SHARED_MLP_ROWS,
    BudgetTooSmall,
    GiB,
    MiB,
    activation_bytes,
    parse_budget,
)
from orinfer.tiny import ASSETS

MEDIUM = ModelConfig.from_folder(ASSETS)
WEIGHTS = 13_960_238_080 * 2  # Phi-3-medium's parameters in bf16 (26.0 GiB)
VARLEN, PADDED = BACKENDS["varlen"], BACKENDS["padded"]


def plan_memory(*args, **kwargs):
    """The plan as optimize.prepare asks for it with the default backend order: varlen where CUDA is."""
    return memory.plan_memory(*args, **{"attention": VARLEN, **kwargs})


pytestmark = pytest.mark.unit


def test_orin_budget_fits_everything_and_leaves_a_usable_cache():
    # ~29.5 GiB is what a headless 32 GB Orin reports as MemAvailable; host RSS as measured idle on the H200.
    plan = plan_memory(
        MEDIUM,
        budget=int(29.5 * GiB),
        weights=WEIGHTS,
        itemsize=2,
        shared_host=True,
        host_bytes=800 * MiB,
    )
    used = plan.weights + plan.overhead + plan.workspace_bytes + plan.kv_bytes
    assert used <= plan.budget
    assert plan.overhead == sum(size for _, size in plan.overhead_items)  # the printed items add up
    assert (
        "host at planning 0.78 + host growth to come 0.43 + pinned buffers 0.02 + CUDA context 0.50"
        in plan.describe()
    )
    assert plan.kv_tokens >= 2048  # ~20 OpenBookQA prompts with their answers at once
    assert plan.kv_tokens >= 868 + 500  # the organisers' longest sample always fits
    assert plan.max_batched_tokens >= 512 and plan.max_num_seqs >= 16
    assert plan.max_gather_tokens * 2 * 10 * 128 * 2 <= plan.workspace_bytes


def test_discrete_gpu_budget_ignores_host_memory():
    shared = plan_memory(MEDIUM, 40 * GiB, WEIGHTS, 2, shared_host=True, host_bytes=GiB)
    discrete = plan_memory(MEDIUM, 40 * GiB, WEIGHTS, 2, shared_host=False, host_bytes=GiB)
    assert discrete.overhead == 0 and discrete.kv_tokens > shared.kv_tokens
    # Shared memory caps torch's allocator at what the plan gives the device; a discrete GPU is not capped.
    assert shared.device_cap == shared.budget - shared.overhead and discrete.device_cap is None
    assert shared.weights + shared.workspace_bytes + shared.kv_bytes <= shared.device_cap


def test_too_small_a_budget_is_a_clear_error():
    with pytest.raises(BudgetTooSmall, match="memory budget 27.00 GiB leaves 0 tokens of KV cache"):
        plan_memory(MEDIUM, 27 * GiB, WEIGHTS, 2, shared_host=True, host_bytes=600 * MiB)


@pytest.mark.parametrize("shared", [True, False])
def test_no_budget_gives_a_cache_below_the_floor_or_a_negative_size(shared):
    """Every budget around the bound either is refused or leaves at least MIN_KV_TOKENS (a budget just above the
    old bound once planned a negative cache and refused every prompt)."""
    for mib in range(26 * 1024, 29 * 1024, 16):
        try:
            plan = plan_memory(
                MEDIUM, mib * MiB, WEIGHTS, 2, shared_host=shared, host_bytes=600 * MiB
            )
        except BudgetTooSmall as e:
            assert "-" not in str(e)
            continue
        assert plan.kv_tokens >= MIN_KV_TOKENS and plan.kv_bytes > 0 and "-" not in plan.describe()


def test_the_cpu_plan_books_no_cuda_items_and_the_pool_is_sized_to_the_run():
    tiny = ModelConfig.from_dict(
        {
            **MEDIUM.__dict__,
            "model_type": "phi3",
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 128,
        }
    )
    plan = plan_memory(
        tiny, 20 * GiB, 10 * MiB, 4, shared_host=True, host_bytes=300 * MiB, cuda=False
    )
    described = plan.describe()
    assert [name for name, _ in plan.overhead_items] == ["host at planning", "host growth to come"]
    assert not plan.cuda_graphs and "graphs" not in described
    sized = plan_memory(
        tiny,
        20 * GiB,
        10 * MiB,
        4,
        shared_host=True,
        host_bytes=300 * MiB,
        cuda=False,
        kv_tokens_wanted=5000,
    )
    assert sized.kv_tokens == 5000 < plan.kv_tokens and "sized to the run" in sized.describe()
    more = plan_memory(
        tiny, 20 * GiB, 10 * MiB, 4, True, 300 * MiB, cuda=False, kv_tokens_wanted=10**12
    )
    assert (
        more.kv_tokens == plan.kv_tokens and not more.sized_to_run
    )  # never past what the budget leaves


def test_orin_emulation_cap_holds_the_longest_sample():
    # The 28.5 GiB cap of the Orin emulation, with the host as measured on the H200 before loading, and the token
    # table read from the bf16 checkpoint as the real one stores it.
    plan = plan_memory(
        MEDIUM,
        int(28.5 * GiB),
        WEIGHTS,
        2,
        shared_host=True,
        host_bytes=800 * MiB,
        table_in_checkpoint=True,
        attention=VARLEN,
    )
    assert plan.kv_tokens >= 868 + 500 + 1 and plan.max_batched_tokens >= 512
    assert not plan.cuda_graphs and not plan.attention_afforded


def test_shared_memory_takes_the_mlp_in_parts_and_passes_of_1024_tokens():
    # Host at planning as measured under the Jetson pin (run 48), the table read from the checkpoint.
    orin = plan_memory(
        MEDIUM,
        int(28.5 * GiB),
        WEIGHTS,
        2,
        shared_host=True,
        host_bytes=int(0.53 * GiB),
        table_in_checkpoint=True,
    )
    discrete = plan_memory(MEDIUM, 80 * GiB, WEIGHTS, 2, shared_host=False, host_bytes=0)
    assert orin.mlp_rows == SHARED_MLP_ROWS and discrete.mlp_rows is None
    assert orin.max_batched_tokens >= 1024
    # The parts bound the MLP's activations: a 1,024-token pass books less than two 512-token passes would.
    parted = activation_bytes(MEDIUM, 2, 1024, SHARED_MLP_ROWS)
    assert (
        parted
        < 2 * activation_bytes(MEDIUM, 2, 512, SHARED_MLP_ROWS)
        < 2 * activation_bytes(MEDIUM, 2, 512, 512)
    )
    assert parted + orin.max_gather_tokens * 2 * 10 * 128 * 2 <= orin.workspace_bytes


def test_graphs_and_an_attention_backends_kernels_only_where_the_budget_has_room_for_their_host_memory():
    """The plan reads the backend's declared costs, whichever it is (attention.core.Backend)."""
    orin = plan_memory(
        MEDIUM,
        int(29.5 * GiB),
        WEIGHTS,
        2,
        shared_host=True,
        host_bytes=800 * MiB,
        attention=VARLEN,
    )
    orin64 = plan_memory(
        MEDIUM, 60 * GiB, WEIGHTS, 2, shared_host=True, host_bytes=800 * MiB, attention=VARLEN
    )
    discrete = plan_memory(
        MEDIUM, 30 * GiB, WEIGHTS, 2, shared_host=False, host_bytes=800 * MiB, attention=VARLEN
    )
    assert not orin.cuda_graphs and orin64.cuda_graphs and discrete.cuda_graphs
    assert not orin.attention_afforded and orin64.attention_afforded and discrete.attention_afforded
    # On shared memory the host memory of the graphs and of the backend's kernels is counted in the overhead.
    assert orin64.overhead - orin.overhead == GRAPHS_HOST_BYTES + VARLEN.host_bytes
    assert (
        "varlen attention kernels" in dict(orin64.overhead_items)
        and "varlen attention allowed" in orin64.describe()
    )
    # A backend that gathers a whole pass's keys bounds them by the budget; the padded layout, in groups, by two
    # sequences of the longest context.
    padded = plan_memory(
        MEDIUM, 60 * GiB, WEIGHTS, 2, shared_host=True, host_bytes=800 * MiB, attention=PADDED
    )
    assert (
        padded.attention_afforded and padded.max_gather_tokens == 2 * MEDIUM.max_position_embeddings
    )
    assert orin64.max_gather_tokens > padded.max_gather_tokens


def test_parse_budget():
    cpu = torch.device("cpu")
    assert parse_budget("28.5GiB", cpu) == int(28.5 * GiB)
    assert parse_budget("512m", cpu) == 512 * MiB and parse_budget("1000", cpu) == 1000
    assert parse_budget("auto", cpu) > 0
    for bad in ("inf", "-1GiB", "0", "nan", "1e400", "0.5"):
        with pytest.raises(ValueError, match="expected a positive size"):
            parse_budget(bad, cpu)
    with pytest.raises(ValueError, match="--memory-budget"):
        parse_budget("lots", cpu)


def test_token_table_leaves_the_pool_where_memory_is_shared_and_graphs_are_off():
    tight = plan_memory(MEDIUM, int(28.5 * GiB), WEIGHTS, 2, shared_host=True, host_bytes=800 * MiB)
    served = plan_memory(
        MEDIUM,
        int(28.5 * GiB),
        WEIGHTS,
        2,
        shared_host=True,
        host_bytes=800 * MiB,
        table_in_checkpoint=True,
    )
    table = MEDIUM.vocab_size * MEDIUM.hidden_size * 2
    assert not tight.embedding_on_host and served.embedding_table == table
    # two pinned buffers (staging.Staging) of a pass's rows and their places (int64), each rounded up to a power of two
    rows = 2 * 16 * MiB
    assert served.max_batched_tokens * (MEDIUM.hidden_size * 2 + 8) > 8 * MiB
    assert ("token table rows of a pass", rows) in served.overhead_items
    assert "weights 26.00 - token table 0.31 read from the file" in served.describe()
    # What the table leaves goes to the cache and the passes (less its rows' buffer), to a block's rounding.
    grown = served.kv_bytes + served.workspace_bytes - tight.kv_bytes - tight.workspace_bytes
    assert (
        abs(table - rows - grown) < MEDIUM.kv_bytes_per_token and served.kv_tokens > tight.kv_tokens
    )
    assert (
        served.weights - table + served.overhead + served.workspace_bytes + served.kv_bytes
        <= served.budget
    )
    assert served.overhead == sum(size for _, size in served.overhead_items)
    # Where graphs are afforded, or on a discrete GPU, or where the file holds another dtype, the table stays.
    for kept in (
        plan_memory(MEDIUM, 60 * GiB, WEIGHTS, 2, True, 800 * MiB, table_in_checkpoint=True),
        plan_memory(MEDIUM, 30 * GiB, WEIGHTS, 2, False, 800 * MiB, table_in_checkpoint=True),
        plan_memory(
            MEDIUM, int(28.5 * GiB), WEIGHTS, 2, True, 800 * MiB, table_in_checkpoint=False
        ),
    ):
        assert not kept.embedding_on_host


@pytest.mark.parametrize("budget_gib", [27.8, 28.5, 29.5])
def test_orin_plan_books_the_larger_of_a_passs_two_peaks(budget_gib):
    # The host at planning as measured under the Jetson pin (runs 50 and 57), the table read from the checkpoint.
    plan = plan_memory(
        MEDIUM, int(budget_gib * GiB), WEIGHTS, 2, True, int(0.535 * GiB), table_in_checkpoint=True
    )
    tokens = plan.max_batched_tokens
    layers = (
        activation_bytes(MEDIUM, 2, tokens, SHARED_MLP_ROWS)
        + plan.max_gather_tokens * 2 * 10 * 128 * 2
    )
    # The LM head's rows come after the last layer, when the residual stream's two tensors are all that is left.
    head = (
        2 * tokens * MEDIUM.hidden_size * 2
        + plan.max_num_seqs * (1 + plan.max_drafts) * MEDIUM.vocab_size * 2 * 2
    )
    assert plan.workspace_bytes == max(layers, head)
    assert (
        plan.weights - plan.embedding_table + plan.overhead + plan.workspace_bytes + plan.kv_bytes
        <= plan.budget
    )
    if budget_gib == 28.5:  # issue 16's target for the emulation's 28.5 GiB
        assert plan.kv_tokens >= 5000 and tokens >= 1024


def _fake_machine(root, available_kib, cma_free_kib=None, cgroup=None, desktop=None):
    (root / "proc" / "self").mkdir(parents=True)
    meminfo = f"MemTotal: 31000000 kB\nMemAvailable: {available_kib} kB\n"
    if cma_free_kib is not None:
        meminfo += f"CmaTotal: 524288 kB\nCmaFree: {cma_free_kib} kB\n"
    (root / "proc" / "meminfo").write_text(meminfo)
    (root / "proc" / "self" / "status").write_text(
        "VmRSS: 900000 kB\nRssAnon: 400000 kB\nRssFile: 500000 kB\n"
    )
    if cgroup is not None:
        (root / "sys" / "fs" / "cgroup").mkdir(parents=True)
        (root / "sys" / "fs" / "cgroup" / "memory.max").write_text(f"{cgroup[0]}\n")
        (root / "sys" / "fs" / "cgroup" / "memory.current").write_text(f"{cgroup[1]}\n")
    if desktop:
        (root / "proc" / "1234").mkdir()
        (root / "proc" / "1234" / "comm").write_text(desktop + "\n")
    return root


@pytest.mark.unit
def test_the_automatic_budget_counts_private_memory_and_keeps_free_cma_and_a_reserve_out(tmp_path):
    from orinfer.memory import (
        AUTO_RESERVE_BYTES,
        describe_terms,
        desktop_session,
        shared_budget,
        shared_memory_terms,
    )

    orin = shared_memory_terms(_fake_machine(tmp_path / "orin", 29_000_000, cma_free_kib=500_000))
    assert orin == {
        "private": 400_000 * 1024,
        "available": 29_000_000 * 1024,
        "free CMA": 500_000 * 1024,
        "reserve": AUTO_RESERVE_BYTES,
    }
    assert shared_budget(orin) == (400_000 + 29_000_000 - 500_000) * 1024 - AUTO_RESERVE_BYTES
    assert "free CMA 0.48 - reserve 0.25 GiB" in describe_terms(orin)
    # A container capped at 20 GiB that holds 2 GiB: the process's private memory plus 18 GiB, less the reserve.
    capped = shared_memory_terms(
        _fake_machine(tmp_path / "box", 29_000_000, cgroup=(20 * GiB, 2 * GiB))
    )
    assert shared_budget(capped) == 400_000 * 1024 + 18 * GiB - AUTO_RESERVE_BYTES
    assert "a container's limit leaves 18.00" in describe_terms(capped)
    unlimited = shared_memory_terms(
        _fake_machine(tmp_path / "free", 29_000_000, cgroup=("max", 2 * GiB))
    )
    assert "cgroup room" not in unlimited
    assert (
        desktop_session(_fake_machine(tmp_path / "desk", 1, desktop="gnome-shell")) == "gnome-shell"
    )
    assert desktop_session(tmp_path / "orin") is None


@pytest.mark.unit
def test_out_of_memory_is_known_by_either_exception():
    from orinfer.memory import is_out_of_memory

    assert is_out_of_memory(
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    )
    assert is_out_of_memory(
        RuntimeError(
            'NVML_SUCCESS == r INTERNAL ASSERT FAILED at "../c10/cuda/'
            'CUDACachingAllocator.cpp":1154, please report a bug to PyTorch.'
        )
    )
    assert not is_out_of_memory(
        RuntimeError("CUDA error: an illegal memory access was encountered")
    )
    assert not is_out_of_memory(ValueError("NVML_SUCCESS == r INTERNAL ASSERT FAILED"))
