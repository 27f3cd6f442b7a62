"""A micro kit (seconds to train) shared by the kit tests; the full recipe is never trained here."""

from __future__ import annotations

from pathlib import Path

import pytest

from kit.build import Recipe, default_kit_dir
from kit.train import Architecture, Schedule

MICRO_ARCH = Architecture(
    layers=1, hidden_size=32, heads=2, kv_heads=1, intermediate_size=64, max_position_embeddings=128
)
MICRO_STEPS = Schedule(steps=6, batch_size=4, learning_rate=3e-2, warmup_steps=2)
MICRO = Recipe(
    large=MICRO_ARCH,
    small=Architecture(
        layers=1, hidden_size=16, heads=2, kv_heads=1, intermediate_size=32,
        max_position_embeddings=128,
    ),
    seq_len=32,
    large_pretrain=MICRO_STEPS,
    small_pretrain=MICRO_STEPS,
    expert=MICRO_STEPS,
    full_finetune=MICRO_STEPS,
    lora_finetune=MICRO_STEPS,
    multi_finetune=MICRO_STEPS,
    workers=1,
)  # fmt: skip


@pytest.fixture(scope="session")
def kit_cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kit-cache")


@pytest.fixture(scope="session")
def micro_kit(kit_cache_root: Path) -> str:
    return default_kit_dir(str(kit_cache_root), progress=False, recipe=MICRO)
