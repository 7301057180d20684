"""The request loop both workers share, run with the engine's own Python beside them (the script's folder is
on ``sys.path``): one JSON request on stdin, one ``RESULT {json}`` line on stdout."""

import json
import sys
import time


def reply(result) -> None:
    """Print the one result line the caller reads."""
    print("RESULT " + json.dumps(result), flush=True)


def serve(load, greedy, bench, close) -> None:
    """Answer one request: ``bench`` timings, or per model ``load(path, request)`` then ``greedy(model, spec)``
    (with the start-up time), ``close(model)`` before the next."""
    request = json.loads(sys.stdin.read())
    if "bench" in request:
        reply(bench(request))
        return
    results = []
    for spec in request["models"]:
        t0 = time.perf_counter()
        model = load(spec["path"], request)
        startup = time.perf_counter() - t0
        body = greedy(model, spec)
        results.append({"path": spec["path"], "startup_s": startup, "result": body})
        close(model)
    reply(results)
