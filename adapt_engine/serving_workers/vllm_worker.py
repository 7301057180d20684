"""Run requests through vLLM, inside vLLM's own virtualenv (standalone: imports neither torch code of ours nor
adapt_engine). Reads one JSON request on stdin and prints one JSON line prefixed with ``RESULT `` on stdout.

Request: {"models": [{"path": DIR, "prompts": [[token ids]], "max_tokens": N, "texts": [str]}], "dtype": ...,
          "max_model_len": 512} -> per model and prompt: greedy tokens, their logprobs, and the logprobs of the
          prompt tokens (each given the ones before it); "texts" tokenized by vLLM's tokenizer.
     or: {"bench": {"paths": [DIR, ...], "prompt_len": P, "max_tokens": N, "concurrency": [1, 4], "repeats": R}}
          -> per model: time to first token of one request, and the wall time and tokens of each
          concurrency level's generate() call, in interleaved rounds.
"""

import gc
import json
import os
import time

from protocol import serve  # beside this script


def _llm(path, dtype, max_model_len):
    from vllm import LLM

    with open(os.path.join(path, "config.json")) as fh:
        max_model_len = min(max_model_len, json.load(fh).get("max_position_embeddings", max_model_len))
    # Prompts are token ids; a folder without a tokenizer (tiny test models) runs without one.
    no_tokenizer = not os.path.exists(os.path.join(path, "tokenizer_config.json"))
    return LLM(model=path, dtype=dtype, max_model_len=max_model_len, enforce_eager=True, trust_remote_code=True,
               seed=0, max_num_seqs=64, skip_tokenizer_init=no_tokenizer)


def _greedy(llm, spec):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], logprobs=1, prompt_logprobs=1,
                            ignore_eos=True, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], params, use_tqdm=False)
    result = []
    for prompt, out in zip(spec["prompts"], outs):
        gen = out.outputs[0]
        tokens = list(gen.token_ids)
        logprobs = [step[t].logprob for t, step in zip(tokens, gen.logprobs)]
        prompt_lp = [None if step is None else step[t].logprob for t, step in zip(prompt, out.prompt_logprobs)]
        result.append({"tokens": tokens, "logprobs": logprobs, "prompt_logprobs": prompt_lp})
    texts = spec.get("texts", [])
    tokenized = [llm.get_tokenizer().encode(t, add_special_tokens=False) for t in texts]
    return {"sequences": result, "tokenized": tokenized}


def _bench(request):
    """Load every model, then time them in interleaved rounds (so drifting machine load hits all alike)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    spec = request["bench"]
    llms = [_llm(p, request.get("dtype", "float32"), request.get("max_model_len", 512)) for p in spec["paths"]]
    prompt = TokensPrompt(prompt_token_ids=[(7 * i + 3) % 1000 + 10 for i in range(spec["prompt_len"])])
    full = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True, detokenize=False)
    first = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False)
    for llm in llms:  # warm-up
        llm.generate([prompt] * 2, full, use_tqdm=False)
    out = [{"ttft_s": [], "levels": {str(n): [] for n in spec["concurrency"]}} for _ in llms]
    for _ in range(spec["repeats"]):
        for llm, rec in zip(llms, out):
            t0 = time.perf_counter()
            llm.generate([prompt], first, use_tqdm=False)
            rec["ttft_s"].append(time.perf_counter() - t0)
            for n in spec["concurrency"]:
                t0 = time.perf_counter()
                res = llm.generate([prompt] * n, full, use_tqdm=False)
                wall = time.perf_counter() - t0
                tokens = sum(len(r.outputs[0].token_ids) for r in res)
                rec["levels"][str(n)].append({"wall_s": wall, "tokens": tokens})
    return out


def _close(llm):
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    del llm
    gc.collect()


def main():
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    serve(lambda path, request: _llm(path, request.get("dtype", "float32"), request.get("max_model_len", 512)),
          _greedy, _bench, _close)


if __name__ == "__main__":
    main()
