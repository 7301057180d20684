"""Time per optimizer step of ``accel --distill`` against plain cross-entropy training (issue 16: ≤ 1.5×).

The student is a random Llama with SmolLM2-135M proportions (hidden 576, 9 query / 3 KV heads, vocab 49152,
tied embeddings) cut to 4 decoder layers whose MLPs were pruned to 1152 of 1536 channels. Teachers are frozen,
in the dtype ``--teacher-dtype auto`` picks: for ``kd`` the same model unpruned (1536 channels, the original),
for ``progressive`` one with 1344 channels (a snapshot between the two, as the rule picks one about
--distill-gap above the student). One step is a global batch of 8 × 128 tokens (micro-batch 4), bf16 autocast
where the CPU has native bf16, all through ``training.train_step``:

* ``none``: the fused next-token loss (what ``--distill none`` runs)
* ``kd``, ``progressive``: ``DistillLoss`` with the defaults of ``--distill kd|progressive`` (KL only)
* ``kd+layer``: kd with the layer term (``--kd-layer-weight 1``)

Each round runs all four in rotating order; ratios are medians of per-round ratios. A 4-layer model has
a larger share of its work in the LM head than the 30-layer original, so this overstates the KL's cost.

    pytest benchmarks/bench_distill.py --benchmark-only
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")

from adapt_engine.distill_loss import DistillLoss  # noqa: E402
from adapt_engine.optim import build_optimizer  # noqa: E402
from adapt_engine.training import autocast_dtype, train_step  # noqa: E402

CONFIG = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
              num_hidden_layers=4, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True)
STUDENT_MLP, SNAPSHOT_MLP = 1152, 1344
SEQ, MICRO, GLOBAL, STEPS, ROUNDS = 128, 4, 8, 2, 3
MODES = ("none", "kd", "progressive", "kd+layer")


def test_distill_step_time_ratio(benchmark, bench_record):
    torch.manual_seed(0)
    amp = autocast_dtype("auto", torch.device("cpu"))

    def llama(mlp: int):
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**CONFIG, "intermediate_size": mlp}))

    teacher, snapshot = (llama(m).to(amp or torch.float32).requires_grad_(False).eval() for m in (1536, SNAPSHOT_MLP))
    student = llama(STUDENT_MLP)
    student.train()
    optimizer = build_optimizer(student, lr=1e-5)
    ids = torch.randint(0, CONFIG["vocab_size"], (GLOBAL * STEPS, SEQ), generator=torch.Generator().manual_seed(0))
    loss_fns = {"none": None, "kd": DistillLoss(teacher), "progressive": DistillLoss(snapshot),
                "kd+layer": DistillLoss(teacher, layer_weight=1.0)}

    def steps(mode: str) -> float:
        t0 = time.perf_counter()
        for s in range(STEPS):
            train_step(student, optimizer, ids[s * GLOBAL:(s + 1) * GLOBAL], lr=1e-5, micro_batch=MICRO,
                       max_grad_norm=1.0, amp=amp, fused_loss_of=student, loss_fn=loss_fns[mode])
        return (time.perf_counter() - t0) / STEPS

    times: dict[str, list[float]] = {k: [] for k in MODES}

    def one_round():
        start = len(times["none"]) % len(MODES)  # rotate who goes first: drifting load hits all alike
        for mode in MODES[start:] + MODES[:start]:
            times[mode].append(steps(mode))

    one_round()  # warm-up
    for v in times.values():
        v.clear()
    benchmark.group = "accel --distill step time"
    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    info = {f"step_s {k}": statistics.median(v) for k, v in times.items()}
    for mode in MODES[1:]:
        info[f"ratio {mode} vs none"] = statistics.median(b / a for a, b in zip(times["none"], times[mode]))
        info[f"ratio {mode} vs none, fastest rounds"] = min(times[mode]) / min(times["none"])
    bench_record(benchmark, "distill vs none step (one round = all four)", None, **info,
                 teacher_dtype=str(next(teacher.parameters()).dtype).removeprefix("torch."),
                 autocast=str(amp).removeprefix("torch.") if amp else "none")
