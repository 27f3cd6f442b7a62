"""Generate, Tokenize and the CLI against the shared server, checked against transformers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import torch

from tandem.v1 import tandem_pb2 as pb

PROMPT_IDS = [1, 1139, 7045, 1164, 4366, 29491]


def _tokens(deltas: list[pb.Delta]) -> list[int]:
    return [token for delta in deltas for token in delta.token_ids]


def _hf_greedy(hf_model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False
        )
    return out[0, len(prompt_ids) :].tolist()


def test_greedy_stream_matches_transformers(server, hf_model, hf_tokenizer) -> None:
    deltas, final = server.generate(
        model="tiny-llama",
        token_ids=PROMPT_IDS,
        sampling=pb.SamplingParams(temperature=0.0),
        stopping=pb.StoppingCriteria(max_new_tokens=24),
    )
    tokens = _tokens(deltas)
    expected = _hf_greedy(hf_model, PROMPT_IDS, 24)
    assert tokens == expected
    # At most one delta per engine step (one token each, unless the client fell behind).
    assert all(delta.token_ids for delta in deltas)
    full = hf_tokenizer.decode(PROMPT_IDS + tokens, skip_special_tokens=True)
    prompt_text = hf_tokenizer.decode(PROMPT_IDS, skip_special_tokens=True)
    assert "".join(delta.text for delta in deltas) == full[len(prompt_text) :]
    expected_reason = pb.FINISH_REASON_LENGTH if len(expected) == 24 else pb.FINISH_REASON_EOS
    assert final.finish_reason == expected_reason
    assert final.usage.prompt_tokens == len(PROMPT_IDS)
    assert final.usage.completion_tokens == len(tokens)


def test_stream_interval_sends_the_first_token_at_once_then_several_a_delta(
    server_factory, hf_model, hf_tokenizer
) -> None:
    # The same tokens, text and logprobs as one delta per token, in fewer messages.
    server = server_factory("--stream-interval", "4")
    server.wait_until_serving()
    deltas, final = server.generate(
        token_ids=PROMPT_IDS,
        sampling=pb.SamplingParams(temperature=0.0),
        stopping=pb.StoppingCriteria(max_new_tokens=23),
        output=pb.OutputOptions(logprobs=True, top_logprobs=2),
    )
    tokens = _tokens(deltas)
    assert tokens == _hf_greedy(hf_model, PROMPT_IDS, 23)
    assert len(deltas[0].token_ids) == 1
    assert all(len(delta.token_ids) >= 4 for delta in deltas[1:-1])
    assert 1 + (len(tokens) - 1 + 3) // 4 >= len(deltas) > 1
    full = hf_tokenizer.decode(PROMPT_IDS + tokens, skip_special_tokens=True)
    prompt_text = hf_tokenizer.decode(PROMPT_IDS, skip_special_tokens=True)
    assert "".join(delta.text for delta in deltas) == full[len(prompt_text) :]
    assert [lp.token_id for delta in deltas for lp in delta.logprobs] == tokens
    assert final.usage.completion_tokens == len(tokens)


def test_tokenize_round_trip(server, hf_tokenizer) -> None:
    text = "Tandem serves one large model and many small experts."
    ids = list(server.generation.Tokenize(pb.TokenizeRequest(model="second", text=text)).token_ids)
    assert ids == hf_tokenizer.encode(text)
    assert hf_tokenizer.decode(ids, skip_special_tokens=True) == text
    greedy = pb.SamplingParams(temperature=0.0)
    stopping = pb.StoppingCriteria(max_new_tokens=8, ignore_eos=True)
    from_text, final = server.generate(
        model="second", text=text, sampling=greedy, stopping=stopping
    )
    from_ids, _ = server.generate(model="second", token_ids=ids, sampling=greedy, stopping=stopping)
    assert final.usage.prompt_tokens == len(ids)
    assert _tokens(from_text) == _tokens(from_ids)
    assert len(_tokens(from_text)) == 8


def test_logprobs_match_transformers(server, hf_model) -> None:
    deltas, _ = server.generate(
        model="tiny-llama",
        token_ids=PROMPT_IDS,
        sampling=pb.SamplingParams(temperature=0.0),
        stopping=pb.StoppingCriteria(max_new_tokens=6, ignore_eos=True),
        output=pb.OutputOptions(logprobs=True, top_logprobs=3),
    )
    tokens = _tokens(deltas)
    entries = [entry for delta in deltas for entry in delta.logprobs]
    with torch.no_grad():
        logits = hf_model(torch.tensor([PROMPT_IDS + tokens])).logits[0]
    reference = torch.log_softmax(logits[len(PROMPT_IDS) - 1 : -1], dim=-1)
    assert [entry.token_id for entry in entries] == tokens
    for position, (token, entry) in enumerate(zip(tokens, entries, strict=True)):
        best = torch.topk(reference[position], 3)
        assert [top.token_id for top in entry.top] == best.indices.tolist()
        assert entry.top[0].token_id == token  # greedy
        assert abs(entry.logprob - reference[position, token].item()) < 1e-3
        for top, value in zip(entry.top, best.values.tolist(), strict=True):
            assert abs(top.logprob - value) < 1e-3


def test_sampling_with_a_seed_is_reproducible(server) -> None:
    request = {
        "model": "second",
        "text": "Once upon a time",
        "sampling": pb.SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=7),
        "stopping": pb.StoppingCriteria(max_new_tokens=10, ignore_eos=True),
    }
    first, _ = server.generate(**request)
    second, _ = server.generate(**request)
    assert _tokens(first) == _tokens(second)


def test_stop_string_ends_the_stream(server) -> None:
    greedy = pb.SamplingParams(temperature=0.0)
    deltas, _ = server.generate(
        model="second",
        token_ids=PROMPT_IDS,
        sampling=greedy,
        stopping=pb.StoppingCriteria(max_new_tokens=12, ignore_eos=True),
    )
    text = "".join(delta.text for delta in deltas)
    stop = text[len(text) // 2 :][:3]
    assert stop.strip(), text
    stopped, final = server.generate(
        model="second",
        token_ids=PROMPT_IDS,
        sampling=greedy,
        stopping=pb.StoppingCriteria(max_new_tokens=12, ignore_eos=True, stop=[stop]),
    )
    assert final.finish_reason == pb.FINISH_REASON_STOP_STRING
    assert "".join(delta.text for delta in stopped) == text[: text.index(stop)]


def _tandem(*args: str) -> subprocess.CompletedProcess[str]:
    """The installed console script (`pip install -e .` puts it beside the interpreter)."""
    script = Path(sys.executable).parent / "tandem"
    return subprocess.run(
        [str(script), *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_constrained_generate_over_grpc(server) -> None:
    """A regex and a JSON schema over real gRPC: every output matches (re.fullmatch, the
    jsonschema validator), the final reports the checks, and SMC reports its particles."""
    pattern = r"[a-z]{3,6}-[0-9]{2}"
    for method in (pb.CONSTRAINT_METHOD_AWRS, pb.CONSTRAINT_METHOD_MASK):
        deltas, final = server.generate(
            model="tiny-llama",
            text="Hello",
            sampling=pb.SamplingParams(temperature=1.0, seed=3),
            stopping=pb.StoppingCriteria(max_new_tokens=40),
            constraint=pb.Constraint(regex=pattern, method=method),
        )
        assert final.finish_reason == pb.FINISH_REASON_EOS
        assert re.fullmatch(pattern, "".join(d.text for d in deltas))
        if method == pb.CONSTRAINT_METHOD_AWRS:
            assert final.usage.constraint_checks >= final.usage.completion_tokens
        else:
            assert final.usage.constraint_mask_steps == final.usage.completion_tokens
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
        "required": ["ok", "n"],
        "additionalProperties": False,
    }
    deltas, final = server.generate(
        model="tiny-llama",
        text="Hello",
        sampling=pb.SamplingParams(temperature=0.7, seed=1),
        stopping=pb.StoppingCriteria(max_new_tokens=40),
        constraint=pb.Constraint(json_schema=json.dumps(schema)),
    )
    assert final.finish_reason == pb.FINISH_REASON_EOS
    jsonschema.validate(json.loads("".join(d.text for d in deltas)), schema)


def test_cli_generate_with_a_constraint(server, tmp_path) -> None:
    result = _tandem(
        "generate", "Hello", "--model", "tiny-llama", "--address", server.address,
        "--regex", "[a-z]{3}-[0-9]", "--temperature", "1", "--seed", "4",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert re.fullmatch("[a-z]{3}-[0-9]", result.stdout)
    assert "finish: eos" in result.stderr and "constraint checks" in result.stderr
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"enum": ["red", "green"]}))
    result = _tandem(
        "generate", "Hello", "--model", "tiny-llama", "--address", server.address,
        "--json-schema", f"@{schema}", "--constraint-method", "smc", "--particles", "3",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) in ("red", "green")
    assert "log weight" in result.stderr


def test_cli_generate_streams_text_and_reports_usage(server) -> None:
    deltas, _ = server.generate(
        model="second",
        text="Hello",
        sampling=pb.SamplingParams(temperature=0.0),
        stopping=pb.StoppingCriteria(max_new_tokens=12, ignore_eos=True),
    )
    result = _tandem(
        "generate", "Hello", "--model", "second", "--address", server.address,
        "--temperature", "0", "--max-new-tokens", "12", "--ignore-eos", "--logprobs", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "".join(delta.text for delta in deltas)
    assert "[finish: length, prompt 2 tokens, completion 12 tokens]" in result.stderr
    assert result.stderr.count("logprob") == 12


def test_cli_tokenize_and_models(server, hf_tokenizer) -> None:
    tokenized = _tandem("tokenize", "Hello world", "--model", "second", "--address", server.address)
    assert tokenized.returncode == 0, tokenized.stderr
    assert tokenized.stdout.split() == [str(i) for i in hf_tokenizer.encode("Hello world")]
    models = _tandem("models", "--address", server.address)
    assert models.returncode == 0, models.stderr
    assert [line.split("\t")[0] for line in models.stdout.splitlines()] == ["tiny-llama", "second"]


def test_cli_reports_errors_with_their_status_code(server) -> None:
    result = _tandem("generate", "Hello", "--model", "missing", "--address", server.address)
    assert result.returncode == 1
    assert "NOT_FOUND" in result.stderr
