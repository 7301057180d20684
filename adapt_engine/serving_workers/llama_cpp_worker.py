"""Run requests through llama.cpp (llama-cpp-python), inside its own virtualenv (standalone). Reads one JSON
request on stdin and prints one JSON line prefixed with ``RESULT `` on stdout.

Request: {"models": [{"path": GGUF, "prompts": [[token ids]], "max_tokens": N, "texts": [str]}], "n_ctx": 512,
          "threads": 2} -> per prompt: greedy tokens, their logprobs, the prompt tokens' logprobs; "texts"
          tokenized by llama.cpp's own tokenizer.
     or: {"bench": {"paths": [GGUF, ...], "prompt_len": P, "max_tokens": N, "repeats": R}} -> per model and
          round: prefill time (time to first token) and mean time per further token, one sequence, models
          interleaved round by round.
The KV cache is kept in float32 so a float32 GGUF is compared with float32 transformers.
"""

import time

import numpy as np
from protocol import serve  # beside this script


def _log_softmax(row):
    row = np.asarray(row, dtype=np.float64)
    m = row.max()
    return row - m - np.log(np.exp(row - m).sum())


def _load(path, n_ctx, threads):
    from llama_cpp import Llama

    return Llama(model_path=path, n_ctx=n_ctx, logits_all=True, n_threads=threads, n_threads_batch=threads,
                 type_k=0, type_v=0, flash_attn=False, verbose=False, seed=0)


def _greedy(llm, spec):
    result = []
    for prompt in spec["prompts"]:
        llm.reset()
        llm.eval(prompt)
        prompt_lp = [None] + [float(_log_softmax(llm.scores[i])[prompt[i + 1]]) for i in range(len(prompt) - 1)]
        tokens, logprobs = [], []
        for _ in range(spec["max_tokens"]):
            lp = _log_softmax(llm.scores[llm.n_tokens - 1])
            tok = int(lp.argmax())
            tokens.append(tok)
            logprobs.append(float(lp[tok]))
            llm.eval([tok])
        result.append({"tokens": tokens, "logprobs": logprobs, "prompt_logprobs": prompt_lp})
    texts = spec.get("texts", [])
    tokenized = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) for t in texts]
    return {"sequences": result, "tokenized": tokenized}


def _bench(request):
    """Load every model, then time one sequence each in interleaved rounds."""
    spec = request["bench"]
    llms = [_load(p, request.get("n_ctx", 512), request.get("threads", 2)) for p in spec["paths"]]
    prompt = [(7 * i + 3) % 1000 + 10 for i in range(spec["prompt_len"])]
    out = [{"ttft_s": [], "token_s": []} for _ in llms]
    for r in range(spec["repeats"] + 1):  # round 0 warms up
        for llm, rec in zip(llms, out):
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(prompt)
            ttft = time.perf_counter() - t0
            steps = []
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            for _ in range(spec["max_tokens"] - 1):
                t1 = time.perf_counter()
                llm.eval([tok])
                steps.append(time.perf_counter() - t1)
                tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            if r:
                rec["ttft_s"].append(ttft)
                rec["token_s"].append(sum(steps) / len(steps))
    return out


def main():
    serve(lambda path, request: _load(path, request.get("n_ctx", 512), request.get("threads", 2)),
          _greedy, _bench, lambda llm: llm.close())


if __name__ == "__main__":
    main()
