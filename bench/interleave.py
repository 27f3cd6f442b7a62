"""Decode-step times of code variants switched at every step, for A/B comparisons in one process.

On a shared machine the memory bandwidth drifts by 10-20% within minutes: two runs one after the
other cannot resolve a few percent, two variants alternating step by step see the same drift.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def interleaved_step_times(
    engine,
    variants: dict[str, Callable[[], None]],
    adapter_ids: list[str | None],
    steps: int,
) -> dict[str, list[float]]:
    """Runs one greedy request per entry of adapter_ids (random 32-token prompt, `steps` new
    tokens, that adapter or none) to completion; before each step calls the next variant's
    install function in turn. Returns each variant's times of the steps where every request
    was decoding."""
    import torch

    from engine.types import Request, SamplingParams, StoppingCriteria

    generator = torch.Generator().manual_seed(0)
    for i, adapter_id in enumerate(adapter_ids):
        engine.add_request(
            Request(
                request_id=f"ab{i}-{time.monotonic_ns()}",
                prompt_token_ids=torch.randint(3, 30000, (32,), generator=generator).tolist(),
                sampling=SamplingParams(temperature=0.0),
                stopping=StoppingCriteria(max_new_tokens=steps, ignore_eos=True),
                adapters=((adapter_id, 1.0),) if adapter_id else (),
            )
        )
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    step = 0
    while engine.has_unfinished():
        running = engine.scheduler.running
        decoding = all(s.num_uncomputed == 1 for s in running) and not engine.scheduler.waiting
        name = names[step % len(names)]
        step += 1
        variants[name]()
        started = time.perf_counter()
        engine.step()
        if decoding and len(running) == len(adapter_ids):
            times[name].append(time.perf_counter() - started)
    return times
