"""`prune` under torchrun: 2 gloo processes score their shares of the calibration batches, make the same plan
as each other and as one process, and only rank 0 writes the output; in memory and streamed (--offload layer)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from adapt_engine.saving import load_pruned

WORKER = """
import json, os, sys, torch
from dataclasses import asdict
from adapt_engine.cli import COMMANDS, build_parser
from adapt_engine.commands import run_prune
from adapt_engine.settings import from_args
torch.set_num_threads(1)
argv = json.loads(sys.argv[1])
report = run_prune(from_args(COMMANDS["prune"][0], build_parser().parse_args(argv)))
with open(sys.argv[2] + f"/rank{os.environ['RANK']}.json", "w") as fh:
    json.dump({"widths": report.widths_after, "params": report.params_after, "history": report.details["history"]}, fh)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _argv(model_dir, out, offload: str) -> list[str]:
    # 8 windows in batches of 4: one whole batch per rank, so the summed scores are one process's sums.
    return ["prune", "--model", str(model_dir), "--output", str(out), "--sparsity", "0.3", "--steps", "2",
            "--calib-samples", "8", "--calib-batch-size", "4", "--calib-seq-len", "16", "--eval-tokens", "128",
            "--no-bench", "--offload", offload, "--fp32-matmul", "ieee"]


@pytest.mark.parametrize("offload", ["none", "layer"])
def test_two_ranks_make_one_process_plan_and_only_rank0_saves(tiny_model_dir, tmp_path, offload):
    from adapt_engine.cli import main

    single = tmp_path / "single"
    assert main(_argv(tiny_model_dir, single, offload)) == 0
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "ranks"
    argv = json.dumps(_argv(tiny_model_dir, out, offload))
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script), argv, str(tmp_path)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    errs = [p.communicate(timeout=600)[1].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-3000:] for e in errs)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["widths"] == r1["widths"] and r0["params"] == r1["params"]
    assert [h["widths"] for h in r0["history"]] == [h["widths"] for h in r1["history"]]
    reference = json.loads((single / "pruning_report.json").read_text())
    assert r0["widths"] == reference["widths_after"]
    # Each rank scored its own batch (different losses) and together they scored one process's two batches.
    for h0, h1, h in zip(r0["history"], r1["history"], reference["history"], strict=True):
        assert h0["calib_loss"] != h1["calib_loss"]
        assert (h0["calib_loss"] + h1["calib_loss"]) / 2 == pytest.approx(h["calib_loss"], rel=1e-5)
    assert not list(tmp_path.glob(".adapt-offload-*")), "every rank's scratch folder must be removed"
    a, b = load_pruned(single), load_pruned(out)  # rank 0 saved; the weights are one process's up to sum order
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
