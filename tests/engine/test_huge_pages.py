"""Weights and KV caches in huge-page arenas: tensors that behave as torch.empty's, memory the
kernel backs with 2 MB pages (read back from /proc/self/smaps), and in-place relayouts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from engine.huge_pages import HugePageArena, rewrite_in_place
from engine.kv_cache import KVCache
from engine.model import CausalLM
from engine.sparsity import GROUPS, SparsitySettings, apply_sparsity

THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str | None:
    """The bracketed mode of Linux transparent huge pages, or None without them."""
    if not THP_SETTING.is_file():
        return None
    found = re.search(r"\[(\w+)\]", THP_SETTING.read_text())
    return found.group(1) if found else None


needs_thp = pytest.mark.skipif(
    thp_mode() not in ("always", "madvise"),
    reason=f"transparent huge pages are {thp_mode() or 'absent'} on this machine",
)


def huge_bytes_at(address: int) -> int:
    """AnonHugePages of the mapping that holds `address`, from /proc/self/smaps."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        span = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if span:
            inside = int(span.group(1), 16) <= address < int(span.group(2), 16)
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no mapping holds {address:#x}")


def test_arena_tensors_behave_as_torch_empty() -> None:
    arena = HugePageArena.for_sizes([3 * 5 * 2, 1000 * 4, 7 * 8])
    a = arena.empty((3, 5), torch.bfloat16)
    b = arena.copy_of(torch.arange(1000, dtype=torch.int32), torch.float32)
    c = arena.empty((7,), torch.float64)
    for tensor, shape in ((a, (3, 5)), (b, (1000,)), (c, (7,))):
        assert tensor.shape == shape and tensor.is_contiguous()
        assert tensor.data_ptr() % 4096 == 0  # each on a page of its own
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    assert b.dtype == torch.float32 and torch.equal(b, torch.arange(1000, dtype=torch.float32))
    a.fill_(2.5)
    c.fill_(-1.0)
    assert torch.equal(b, torch.arange(1000, dtype=torch.float32))  # no overlap
    assert len({a.untyped_storage().data_ptr(), b.untyped_storage().data_ptr()}) == 2


def test_arena_falls_back_to_torch_when_full() -> None:
    arena = HugePageArena.for_sizes([4096])
    first = arena.empty((1024,), torch.float32)
    second = arena.empty((1024,), torch.float32)  # no room left: an ordinary tensor
    first.fill_(1.0)
    second.fill_(2.0)
    assert first.sum().item() == 1024 and second.sum().item() == 2048
    assert arena.empty((0, 4), torch.float32).shape == (0, 4)


def test_arena_falls_back_to_torch_when_no_mapping_can_be_had() -> None:
    arena = HugePageArena(1 << 60)  # more address space than a process has
    tensor = arena.empty((4,), torch.float32).fill_(2.0)
    assert tensor.sum().item() == 8


def test_arena_memory_outlives_the_arena() -> None:
    tensor = HugePageArena.for_sizes([4 << 20]).empty((1 << 20,), torch.float32)
    tensor.fill_(3.0)  # the arena object is gone; its mapping lives with the tensor
    assert tensor.sum().item() == 3 * (1 << 20)


@needs_thp
def test_arena_is_backed_by_huge_pages() -> None:
    tensor = HugePageArena.for_sizes([8 << 20]).empty((8 << 20,), torch.uint8)
    tensor.fill_(1)
    assert huge_bytes_at(tensor.data_ptr()) >= 2 << 20


@pytest.mark.parametrize("input_major", [True, False])
def test_rewrite_in_place_keeps_values_and_memory(input_major: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = HugePageArena.for_sizes([24 * 40 * 2]).copy_of(
        torch.randn(24, 40, generator=generator).bfloat16()
    )
    if not input_major:
        weight = rewrite_in_place(weight, input_major=True)
    expected, address = weight.clone(), weight.data_ptr()
    moved = rewrite_in_place(weight, input_major)
    assert torch.equal(moved, expected) and moved.data_ptr() == address
    assert moved.t().is_contiguous() if input_major else moved.is_contiguous()


def test_rewrite_of_a_view_copies() -> None:
    stacked = torch.randn(3, 24, 40)
    moved = rewrite_in_place(stacked[1], input_major=True)
    assert torch.equal(moved, stacked[1]) and moved.t().is_contiguous()
    assert moved.untyped_storage().data_ptr() != stacked.untyped_storage().data_ptr()


def test_loaded_weights_share_one_arena(model_dir: str) -> None:
    """Every weight the loader reads sits page-aligned in one mapping, huge pages where the
    system gives them; a sparse relayout and back moves no weight out of it."""
    model = CausalLM.from_dir(model_dir)
    weights = model.weights
    tensors = [weights.embed, weights.lm_head, weights.final_norm]
    for layer in weights.layers:
        tensors += [layer.input_norm, layer.qkv, layer.o, layer.post_attention_norm]
        tensors += [layer.gate_up, layer.down]
    addresses = sorted(t.data_ptr() for t in tensors)
    assert all(address % 4096 == 0 for address in addresses)
    span = addresses[-1] - addresses[0]
    total = sum(t.numel() * t.element_size() for t in tensors)
    assert span < total + 4096 * len(tensors)  # one after another, not scattered
    if thp_mode() in ("always", "madvise"):
        assert huge_bytes_at(weights.embed.data_ptr()) >= 2 << 20

    before = {(i, g): getattr(layer, g) for i, layer in enumerate(weights.layers) for g in GROUPS}
    expected = {key: t.clone() for key, t in before.items()}
    apply_sparsity(model, SparsitySettings(0.5, "wina", "top-k", ""))
    for (i, group), weight in before.items():
        sparse = getattr(weights.layers[i], group)
        assert sparse.data_ptr() == weight.data_ptr() and sparse.t().is_contiguous()
        assert torch.equal(sparse, expected[i, group])
    model.set_sparsity(None)
    for (i, group), weight in before.items():
        dense = getattr(weights.layers[i], group)
        assert dense.data_ptr() == weight.data_ptr() and dense.is_contiguous()
        assert torch.equal(dense, expected[i, group])


@needs_thp
def test_kv_cache_in_huge_pages() -> None:
    kv = KVCache(2, num_blocks=256, block_size=16, num_kv_heads=2, head_dim=64, dtype=torch.float32)
    assert all(t.abs().sum().item() == 0 for t in kv.keys + kv.values)  # starts zeroed
    assert huge_bytes_at(kv.keys[0].data_ptr()) >= 2 << 20
