"""Layer importance (how much each decoder layer changes its input) and group saliency.

Both come out of one calibration pass: forward hooks on every decoder layer reduce (input, output)
to a per-layer similarity on the fly, and post-accumulate-grad hooks reduce every gradient to group
scores the moment it exists and free it, so the model's full gradient is never held at once
(the "80 GB for a 7B model" problem of gradient-materialising pruners).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import precision
from .adapters import DecoderAdapter
from .args import AGGREGATES, CALIB_DTYPES, GRADIENT_IMPORTANCES, SIMILARITIES
from .groups import GroupScores, Member, aggregate_members, group_members, member_groups, stem_members
from .kernels import group_saliency
from .lm_loss import causal_lm_loss, frozen_head_weight


@functools.cache  # the CPU's flags do not change: read /proc/cpuinfo once, not at every calibration pass
def _cpu_has_fast_bf16() -> bool:
    # AMX or AVX512-BF16: bf16 matmuls run 2-3x faster than fp32 there; elsewhere they are emulated.
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = line.split()
                    return "amx_bf16" in flags or "avx512_bf16" in flags
    except OSError:
        pass
    return False


def resolve_calib_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """The autocast dtype of the calibration pass: float32 (none), bfloat16, or auto (bf16 where it is fast)."""
    if name not in CALIB_DTYPES:
        raise ValueError(f"--calib-dtype must be one of {', '.join(CALIB_DTYPES)}, got '{name}'")
    if name == "auto":
        device = torch.device(device)
        fast = (torch.cuda.is_bf16_supported() if device.type == "cuda" else
                device.type == "cpu" and _cpu_has_fast_bf16())
        return torch.bfloat16 if fast else torch.float32
    return torch.bfloat16 if name == "bfloat16" else torch.float32


def _hidden_in(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def hidden_out(output) -> torch.Tensor:
    """The hidden states a decoder layer returned (a tensor, or the first item of a tuple in some releases)."""
    return output[0] if isinstance(output, (tuple, list)) else output


class LayerSimilarity:
    """Accumulates, per decoder layer, the mean token-wise change between its input and output."""

    def __init__(self, adapter: DecoderAdapter, similarity: str = "cosine"):
        if similarity not in SIMILARITIES:
            raise ValueError(f"--similarity must be one of {', '.join(SIMILARITIES)}, got '{similarity}'")
        self.similarity = similarity
        self.adapter = adapter
        n = len(adapter.layers)
        self.sums = torch.zeros(n, dtype=torch.float64)
        self.counts = torch.zeros(n, dtype=torch.float64)
        self._handles: list = []

    def _hook(self, index: int):
        def hook(module, args, kwargs, output):
            with torch.no_grad():
                x = _hidden_in(args, kwargs).detach().float()
                y = hidden_out(output).detach().float()
                if self.similarity == "cosine":
                    val = torch.nn.functional.cosine_similarity(x, y, dim=-1)
                elif self.similarity == "euclidean":
                    val = (y - x).norm(dim=-1)
                else:
                    val = (y - x).abs().sum(-1)
                self.sums[index] += val.sum().item()
                self.counts[index] += val.numel()

        return hook

    @contextlib.contextmanager
    def attached(self) -> Iterator[LayerSimilarity]:
        """Forward hooks on every decoder layer while inside the block."""
        try:
            for i, layer in enumerate(self.adapter.layers):
                self._handles.append(layer.register_forward_hook(self._hook(i), with_kwargs=True))
            yield self
        finally:
            for h in self._handles:
                h.remove()
            self._handles.clear()

    def importance(self) -> torch.Tensor:
        """Raw importance per layer: higher means the layer matters more (−cosine, or a distance)."""
        if (self.counts == 0).any():
            raise RuntimeError("layer similarity has no data: run the calibration forward pass first")
        mean = self.sums / self.counts
        return -mean if self.similarity == "cosine" else mean


def normalize_importance(raw: torch.Tensor) -> torch.Tensor:
    """Shift to mean 0 and scale to max |I| = 1 (all zeros when every layer is equally important)."""
    centered = raw - raw.mean()
    peak = centered.abs().max()
    if peak <= 0 or not torch.isfinite(peak):
        return torch.zeros_like(centered)
    return centered / peak


def _score_tensor(
    weight: torch.Tensor, grad: torch.Tensor | None, member: Member, metric: str, out: torch.Tensor,
    fisher: torch.Tensor | None = None,
) -> None:
    """Add one tensor's saliency (a matrix or a 1-D bias) into its group bucket with the fused kernel."""
    group_saliency(weight.detach(), grad, member.dim, group_size=member.group_size, metric=metric, out=out,
                   fisher=fisher)


class _MetricScores:
    """One base metric's group scores over the calibration batches.

    ``aggregate`` sum adds every member's per-group score into its group's bucket as it arrives (the original
    behaviour, bit for bit); prod, max and last keep one score vector per member (summed over the batches) and
    combine a group's members at the end (``groups.aggregate_members``), as LLM-Pruner's aggregation options do.
    """

    def __init__(self, adapter: DecoderAdapter, members: dict[nn.Parameter, Member], metric: str, aggregate: str,
                 device: torch.device, stem: bool = False):
        self.adapter, self.members, self.metric, self.aggregate = adapter, members, metric, aggregate
        self.per_member: dict[nn.Parameter, torch.Tensor] | None = None
        if aggregate == "sum":
            self.total = GroupScores.zeros(adapter, device=device, stem=stem)
            # 'vectorize' sums w*g signed over each whole group (all its matrices) per micro-batch, then takes |.|
            self._signed = GroupScores.zeros(adapter, device=device, stem=stem) if metric == "vectorize" else None
        else:
            self.per_member = {p: torch.zeros(member_groups(p, m), dtype=torch.float32, device=device)
                               for p, m in members.items()}
            # per member, vectorize's |.| is that of the member's own signed sum
            self._signed_member = ({p: torch.zeros_like(t) for p, t in self.per_member.items()}
                                   if metric == "vectorize" else None)
        self._fisher: dict[tuple[nn.Parameter, str], torch.Tensor] = {}

    def add(self, param: nn.Parameter, member: Member) -> None:
        """Score one parameter's gradient of the current batch for one group it belongs to."""
        fisher = None
        if self.metric == "param_mix":  # a Fisher trace per parameter and bucket (each call accumulates it)
            fisher = self._fisher.setdefault((param, member.bucket), torch.zeros_like(param, dtype=torch.float32))
        if self.per_member is None:
            target = (self._signed if self._signed is not None else self.total).bucket(member.layer, member.bucket)
        else:
            target = (self._signed_member if self._signed_member is not None else self.per_member)[param]
        _score_tensor(param, param.grad, member, self.metric, target, fisher=fisher)

    def end_micro_batch(self) -> None:
        """Close one scored batch (``vectorize`` turns its signed sums into |.| here)."""
        if self.per_member is None and self._signed is not None:
            pairs = zip(self.total.all_tensors(), self._signed.all_tensors())
        elif self.per_member is not None and self._signed_member is not None:
            pairs = ((self.per_member[p], self._signed_member[p]) for p in self.per_member)
        else:
            return
        for total, signed in pairs:
            total.add_(signed.abs())
            signed.zero_()

    def scores(self) -> GroupScores:
        """Group scores of everything scored so far."""
        if self.per_member is None:
            return self.total
        return aggregate_members(self.adapter, self.members, self.per_member, self.aggregate)


class SaliencyCollector:
    """Reduces each gradient to group scores as soon as it is accumulated, then frees it.

    ``metric`` mix is AdaPruner's Eq. 5, ``α1·I_vector + α2·s·I_element``: I_vector is our ``vectorize``
    (|Σ w·g| of the structure, the coarse first-order term), I_element is our ``param_mix`` (Σ over elements of
    |w·g − ½·w²·F|, the fine-grained term with the Fisher diagonal for the Hessian, Eq. 4), and ``s`` is the
    alignment factor that brings the element-wise term to the vector term's order of magnitude; ``mix`` is
    ``(α1, α2, s)``. Both terms come from the same backward pass.
    """

    def __init__(self, adapter: DecoderAdapter, metric: str = "taylor", aggregate: str = "sum",
                 mix: tuple[float, float, float] | None = None, stem: bool = False):
        if metric not in GRADIENT_IMPORTANCES:
            raise ValueError(f"gradient saliency metric must be one of {', '.join(GRADIENT_IMPORTANCES)}, "
                             f"got '{metric}'")
        if aggregate not in AGGREGATES:
            raise ValueError(f"--aggregate must be one of {', '.join(AGGREGATES)}, got '{aggregate}'")
        if stem and aggregate != "sum":
            raise ValueError("stem channels are scored with --aggregate sum only")
        self.adapter = adapter
        self.metric = metric
        self.members = group_members(adapter)
        # A projection weight feeds two groups when stem channels are scored: its head/channel and the hidden
        # channels of its input columns (q/k/v/gate/up) or output rows (o/down).
        self._all: dict[nn.Parameter, list[Member]] = {p: [m] for p, m in self.members.items()}
        if stem:
            for p, m in stem_members(adapter).items():
                self._all.setdefault(p, []).append(m)
        device = next(adapter.model.parameters()).device
        if metric == "mix":
            alpha_vector, alpha_element, scale = mix if mix is not None else (1.0, 1.0, 1.0)
            self._weights = (alpha_vector, alpha_element * scale)
            base = ("vectorize", "param_mix")
        else:
            self._weights = None
            base = (metric,)
        self._parts = [_MetricScores(adapter, self.members, m, aggregate, device, stem) for m in base]
        self._handles: list = []
        # True while the micro-batches of one batch before its last run their backward: gradients
        # are summed into .grad and scored once, so the scores are those of the whole batch.
        self.accumulating = False

    @property
    def scores(self) -> GroupScores:
        """The group scores collected so far (for mix, the weighted sum of its two terms)."""
        if self._weights is None:
            return self._parts[0].scores()
        vector, element = (part.scores() for part in self._parts)
        out = GroupScores()
        for name in ("q_heads", "kv_heads", "mlp"):
            getattr(out, name).extend(self._weights[0] * v + self._weights[1] * e
                                      for v, e in zip(getattr(vector, name), getattr(element, name)))
        if vector.stem is not None:
            out.stem = self._weights[0] * vector.stem + self._weights[1] * element.stem
        return out

    def _hook(self, param: nn.Parameter) -> None:
        if self.accumulating:  # a micro-batch that is not its batch's last: keep summing into .grad
            return
        for member in self._all[param]:
            for part in self._parts:
                part.add(param, member)
        param.grad = None  # freed at once: the model's gradients never all exist together

    def end_micro_batch(self) -> None:
        """Close one micro-batch (``vectorize`` turns its signed sums into |.| here)."""
        for part in self._parts:
            part.end_micro_batch()

    @contextlib.contextmanager
    def attached(self) -> Iterator[SaliencyCollector]:
        """Gradient hooks on every prunable parameter; everything else is frozen while inside."""
        model = self.adapter.model
        saved = {p: p.requires_grad for p in model.parameters()}
        try:
            for p in model.parameters():
                p.requires_grad_(p in self._all)
            for p in self._all:
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook))
            yield self
        finally:
            for h in self._handles:
                h.remove()
            self._handles.clear()
            for p, flag in saved.items():
                p.requires_grad_(flag)
                p.grad = None


def magnitude_scores(adapter: DecoderAdapter, stem: bool = False) -> GroupScores:
    """Σ|W| per group: the data-free baseline."""
    device = next(adapter.model.parameters()).device
    scores = GroupScores.zeros(adapter, device=device, stem=stem)
    for members in (group_members(adapter), stem_members(adapter) if stem else {}):
        for p, m in members.items():
            _score_tensor(p, None, m, "magnitude", scores.bucket(m.layer, m.bucket))
    return scores


def random_scores(adapter: DecoderAdapter, generator: torch.Generator, stem: bool = False) -> GroupScores:
    """Uniform random scores: the chance baseline."""
    scores = GroupScores.zeros(adapter, stem=stem)
    for t in scores.all_tensors():
        t.copy_(torch.rand(t.shape, generator=generator))
    return scores


# Up to this many tokens per window, bf16 attention on CPU runs faster through SDPA's math kernel (which computes
# in float32 and holds batch x heads x seq² scores) than through its flash kernel: forward+backward of 4 x 9 heads
# x 64 tokens took 3.6 ms vs 5.8 ms, 2 x 128 tokens 4.9 vs 6.6 ms, 1 x 192 tokens 5.1 vs 3.9 ms (Xeon with AMX,
# one thread). Longer windows keep the flash kernel, whose memory does not grow with seq².
MATH_ATTENTION_MAX_SEQ = 128


def calib_compute_dtype(calib_dtype: str, device: torch.device | str, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype the calibration pass computes in: bf16 autocast over float32 weights when ``calib_dtype`` resolves
    to it, else the weights' own dtype."""
    amp_dtype = resolve_calib_dtype(calib_dtype, device)
    return amp_dtype if amp_dtype != torch.float32 and weight_dtype == torch.float32 else weight_dtype


def calib_autocast(calib_dtype: str, device: torch.device | str, weight_dtype: torch.dtype,
                   fp32_matmul_mode: str = "ieee",
                   seq_len: int | None = None) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the calibration pass's numeric context: autocast (bf16 only over float32 weights), the
    float32 matmul mode (``precision.resolve_fp32_matmul``) and, for bf16 on CPU with windows of at most
    ``MATH_ATTENTION_MAX_SEQ`` tokens, SDPA's math kernel."""
    compute = calib_compute_dtype(calib_dtype, device, weight_dtype)
    enabled = compute != weight_dtype
    mode = precision.resolve_fp32_matmul(fp32_matmul_mode, device)
    device_type = torch.device(device).type
    math_attention = (enabled and device_type == "cpu" and seq_len is not None
                      and seq_len <= MATH_ATTENTION_MAX_SEQ)

    @contextlib.contextmanager
    def context():
        with contextlib.ExitStack() as stack:
            stack.enter_context(precision.fp32_matmul(mode))
            stack.enter_context(torch.autocast(device_type, dtype=compute, enabled=enabled))
            if math_attention:
                stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            yield

    return context


def calibration_batches(calib_ids: torch.Tensor, batch_size: int,
                        micro_batch_size: int | None) -> list[list[torch.Tensor]]:
    """The calibration windows as batches (one scored gradient each) of micro-batches (one forward each)."""
    micro = min(batch_size, micro_batch_size or batch_size)
    return [list(batch.split(micro)) for batch in calib_ids.split(batch_size)]


@dataclass(frozen=True)
class CalibPass:
    """What a calibration pass measures and how it batches: the keywords of :func:`calibration_pass` that its
    streamed twin (``streaming.streamed_calibration_pass``) shares."""

    batch_size: int
    similarity: str | None
    saliency_metric: str | None
    calib_dtype: str = "float32"
    micro_batch_size: int | None = None
    fp32_matmul: str = "ieee"
    aggregate: str = "sum"
    mix: tuple[float, float, float] | None = None


def calibration_pass(
    adapter: DecoderAdapter,
    calib_ids: torch.Tensor,
    batch_size: int,
    similarity: str | None,
    saliency_metric: str | None,
    progress=None,
    calib_dtype: str = "float32",
    micro_batch_size: int | None = None,
    observers: tuple = (),
    fp32_matmul: str = "ieee",
    aggregate: str = "sum",
    mix: tuple[float, float, float] | None = None,
    stem: bool = False,
) -> tuple[torch.Tensor | None, GroupScores | None, float]:
    """One pass over the calibration set: raw layer importances, gradient saliency, mean loss.

    ``similarity=None`` skips layer importance; ``saliency_metric=None`` skips the backward pass.
    ``calib_dtype`` bfloat16 runs forward and backward under bf16 autocast: the weights stay fp32
    (so gradients arrive in fp32) and saliency and similarities still accumulate in fp32/fp64.
    The loss is fused with the LM head where the family allows (lm_loss.causal_lm_loss), so no
    batch × seq × vocab logits are held; each batch's gradients are reduced to group scores and
    freed by the hooks, so peak memory does not grow with the number of samples.
    ``micro_batch_size`` (< ``batch_size``) runs each batch as micro-batches whose gradients add up
    in the prunable weights' ``.grad`` and are scored once per batch, so the scores are those of the
    whole batch while the activations held are those of one micro-batch (the held gradients cost
    one fp32 copy of the prunable weights).
    ``fp32_matmul`` (ieee | bf16 | auto, ``precision.py``) is how float32 matmuls are computed on CPU.
    ``observers`` are extra hook holders (``.attached()`` context managers, e.g. compensation statistics)
    that watch the same forward pass. ``aggregate``, ``mix`` and ``stem`` are :class:`SaliencyCollector`'s (``stem``
    also scores hidden channels: the embedding, LM head and norms then take gradients too).
    """
    model = adapter.model
    device = next(model.parameters()).device
    device_type = torch.device(device).type
    autocast = calib_autocast(calib_dtype, device, next(model.parameters()).dtype, fp32_matmul,
                              seq_len=calib_ids.shape[-1])
    sim = LayerSimilarity(adapter, similarity) if similarity else None
    collector = SaliencyCollector(adapter, saliency_metric, aggregate, mix, stem) if saliency_metric else None
    was_training = model.training
    model.eval()  # no dropout: saliency of the deterministic model
    total_loss, batches = 0.0, 0
    with contextlib.ExitStack() as stack:
        # The whole pass, backward included (autocast covers only the forward).
        stack.enter_context(precision.fp32_matmul(precision.resolve_fp32_matmul(fp32_matmul, device)))
        if sim is not None:
            stack.enter_context(sim.attached())
        if collector is not None:
            stack.enter_context(collector.attached())
        for observer in observers:
            stack.enter_context(observer.attached())
        if collector is None:
            stack.enter_context(torch.no_grad())
        for batch in calibration_batches(calib_ids, batch_size, micro_batch_size):
            rows = sum(ids.shape[0] for ids in batch)
            batch_loss = 0.0
            # One autocast region per batch: its cache keeps the bf16 copies of the frozen-for-the-pass weights
            # from one micro-batch to the next instead of casting every weight again (the backward runs with
            # autocast off, as it would outside the region).
            with autocast():
                head_weight = frozen_head_weight(model)  # likewise the fused loss's LM head, cast once per batch
                for k, ids in enumerate(batch):
                    ids = ids.to(device)
                    weight = ids.shape[0] / rows  # equal-length rows: the batch mean is the weighted sum
                    loss = causal_lm_loss(model, ids, head_weight=head_weight)
                    if collector is not None:
                        collector.accumulating = k < len(batch) - 1
                        with torch.autocast(device_type, enabled=False):
                            (loss * weight if weight != 1.0 else loss).backward()
                    batch_loss += float(loss.detach()) * weight
            if collector is not None:
                collector.end_micro_batch()
            total_loss += batch_loss
            batches += 1
            if progress is not None:
                progress(rows)
    model.train(was_training)
    raw = sim.importance() if sim is not None else None
    return raw, (collector.scores if collector is not None else None), total_loss / max(batches, 1)
