"""Adapt-Pruner (Algorithm 1): calibrate → layer importance → per-layer sparsity → group saliency →
surgery, repeated for T sub-steps until the model reaches its parameter target."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from .adapters import DecoderAdapter, LayerShape, count_params
from .allocation import (
    LayerCosts,
    budget_shape,
    incremental_sparsities,
    layer_sparsities,
    plan_budgets,
    step_targets,
)
from .args import GRADIENT_IMPORTANCES, PruneSettings, parse_layers
from .attention_ladder import attention_params, rung_costs, rungs
from .compensation import InputStatistics, check_compensation, compensate_layer, compensate_plan, statistics_bytes
from .distributed import process_group_world
from .errors import UsageError
from .global_allocation import STEM_TYPE, GlobalPlan, SizeModel, floor_params, plan_global
from .groups import GroupScores, LayerKeep, attention_keep, choose_mlp_keep
from .host_memory import trim_heap
from .importance import (
    CalibPass,
    calibration_pass,
    magnitude_scores,
    random_scores,
)
from .importance_scale import scale_importance
from .streaming import StreamedModel, StreamingError, available_memory_bytes, streamed_calibration_pass
from .surgery import apply_plan, prune_layer, prune_stem

__all__ = ["PruneSettings", "AdaptPruner", "count_params"]


class AdaptPruner:
    """Prunes a model in place towards parameter targets, one Algorithm-1 sub-step at a time."""

    def __init__(self, model, settings: PruneSettings, calib_ids: torch.Tensor | None,
                 calib_sampler: Callable[[int], torch.Tensor] | None = None,
                 streamed: StreamedModel | None = None, scratch: Path | None = None):
        """``calib_sampler(i)`` gives sub-step i's calibration windows under ``calib_resample``
        (sub-step 0 uses ``calib_ids``). With ``streamed`` (whose ``.model`` is ``model``), one decoder layer
        is in memory at a time and every cut layer is rewritten to the ``scratch`` folder."""
        settings.validate()
        self.model = model
        self.settings = settings
        self.streamed = streamed
        self.scratch = scratch
        self.adapter = streamed.adapter if streamed is not None else DecoderAdapter(model)
        if streamed is not None:
            if streamed.model is not model or scratch is None:
                raise ValueError("a streamed pruner needs the streamed model itself and a scratch folder")
            if settings.importance == "magnitude":
                raise StreamingError("--importance magnitude reads every weight at once; with --offload layer use "
                                     "taylor, vectorize, param_mix or random")
            if settings.allocation == "global":
                raise StreamingError("--allocation global ranks groups of every layer (and stem channels span them "
                                     "all) at once; use --offload none with it")
        self.calib_ids = calib_ids
        self.calib_sampler = calib_sampler
        if settings.calib_resample and calib_sampler is None:
            raise UsageError("calib_resample needs a calib_sampler that draws fresh windows for each sub-step")
        # Unset (None) resample, carry and damp follow their default rules (PruneSettings.resolved_refit).
        self.resample, self.carry, self.damp = settings.resolved_refit(calib_sampler is not None, streamed is None)
        check_compensation(self.adapter, settings.compensate, self.damp)
        if streamed is not None and settings.compensate_carry:
            raise UsageError("--compensate-carry keeps every layer's statistics in memory between sub-steps; it is "
                             "not available with --offload layer (drop one of the two)")
        self.original_shapes = self.adapter.shapes()
        self.stem = STEM_TYPE in settings.group_types
        if settings.uniform_shape and any(sh != self.original_shapes[0] for sh in self.original_shapes):
            raise UsageError("--uniform-shape keeps every layer the same shape, but this model's layers already "
                             "differ; start from a model whose layers all have one shape")
        self.original_hidden = self.adapter.hidden_size
        self.original_prunable = self.adapter.prunable_params()
        self.frozen = self._frozen_layers()
        self.included_prunable = self._included_prunable()
        self.original_total = count_params(model)
        # Parameters that pruning never touches (embeddings, norms, LM head).
        self.fixed_params = self.original_total - self.original_prunable
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.history: list[dict] = []
        self._carried: InputStatistics | None = None  # --compensate-carry: the last sub-step's statistics, cut to size
        # --layer-update incremental: per-layer sparsity targets carried from sub-step to sub-step, and
        # the overall sparsity they were last moved to (relative to the original prunable parameters).
        self.layer_sparsity: torch.Tensor | None = None
        self.overall_sparsity = 0.0
        if settings.needs_calibration and (calib_ids is None or calib_ids.numel() == 0):
            raise UsageError("this importance/allocation/compensation needs calibration data; pass calib_ids "
                             "(or use compensate='none' with magnitude/random importance and uniform allocation)")

    def _frozen_layers(self) -> frozenset[int]:
        """Layers ``--layers`` leaves out (never pruned); a UsageError when it names a layer the model lacks."""
        n = len(self.adapter.layers)
        if self.settings.layers is None:
            return frozenset()
        chosen = parse_layers(self.settings.layers)
        if chosen[-1] >= n:
            raise UsageError(f"--layers {self.settings.layers} names layer {chosen[-1]}, but the model has {n} "
                             f"decoder layers (0-{n - 1})")
        return frozenset(range(n)) - frozenset(chosen)

    def _included_prunable(self) -> int:
        """Original prunable parameters of the layers that may be pruned (all of them without ``--layers``)."""
        if not self.frozen:
            return self.original_prunable
        a = self.adapter
        return self.original_prunable - sum(a.layer_params(j) for j in self.frozen)

    def min_params(self) -> int:
        """Smallest reachable size: the lowest attention rung and one MLP channel (or round_to) per layer
        (frozen layers at their current size)."""
        if self.settings.allocation == "global":
            s = self.settings
            return floor_params(self.adapter, s.group_types, s.ladder, s.uniform_shape)
        a = self.adapter
        total = self.fixed_params
        step = self.settings.round_to
        ladder = self.settings.ladder
        for j, s in enumerate(self.original_shapes):
            if j in self.frozen:
                total += a.layer_params(j)
                continue
            total += attention_params(a, j, s, rungs(s, ladder, j)[-1], ladder)
            total += min(step, s.intermediate_size) * a.params_per_channel(j)
        return total

    def _scores(self, progress: Callable[[int], None] | None,
                observers: tuple = ()) -> tuple[torch.Tensor, GroupScores, float | None]:
        s = self.settings
        adaptive = s.allocation == "adaptive"
        gradient = s.importance in GRADIENT_IMPORTANCES
        raw, scores, loss = None, None, None
        if adaptive or gradient or s.compensate != "none":
            raw, scores, loss = self._calibration_pass(
                s.similarity if adaptive else None, s.importance if gradient else None, progress, observers)
        if s.importance == "magnitude":
            scores = magnitude_scores(self.adapter, stem=self.stem)
        elif s.importance == "random":
            scores = random_scores(self.adapter, self.generator, stem=self.stem)
        scores = self._reduce_across_ranks(scores)
        n = len(self.adapter.layers)
        if raw is None:
            raw = torch.zeros(n, dtype=torch.float64)
        return raw, scores, loss

    def _calibration_pass(self, similarity: str | None, saliency_metric: str | None, progress, observers: tuple):
        """:func:`calibration_pass` over this sub-step's windows, or its streamed twin (which keeps every layer's
        inputs when the compensation statistics are to be gathered layer by layer at the cut instead of by
        ``observers``)."""
        s = self.settings
        opts = CalibPass(s.calib_batch_size, similarity, saliency_metric, s.calib_dtype, s.calib_micro_batch,
                         fp32_matmul=s.fp32_matmul, aggregate=s.aggregate,
                         mix=s.mix if s.importance == "mix" else None)
        if self.streamed is not None:
            replay = s.compensate != "none" and not observers  # statistics gathered per layer at the cut
            return streamed_calibration_pass(self.streamed, self.calib_ids, opts, progress, observers=observers,
                                             keep_inputs=replay)
        return calibration_pass(self.adapter, self.calib_ids, **asdict(opts), progress=progress, observers=observers,
                                stem=self.stem and saliency_metric is not None)

    def _statistics_fit(self) -> bool:
        """Whether every layer's compensation statistics together take under a quarter of the available memory
        (then a streamed prune gathers them in its forward sweep instead of replaying each layer's forward)."""
        need = statistics_bytes(self.adapter, self.settings.compensate)
        free = available_memory_bytes(self.streamed.device)
        return free is not None and need < free / 4

    def _cut(self, plan: list[LayerKeep], stats: InputStatistics | None, optimizer) -> None:
        """Compensate (if asked) and remove what ``plan`` drops; streamed, one resident layer at a time."""
        s = self.settings
        if self.streamed is None:
            if stats is not None:
                stats.reduce_across_ranks()
                compensate_plan(self.adapter, plan, stats, self.damp, s.mlp_select)
            apply_plan(self.adapter, plan, optimizer)
            if stats is not None and self.carry:
                stats.keep(plan)
                self._carried = stats
            return
        if stats is not None:  # gathered in the forward sweep (they fit in memory)
            stats.reduce_across_ranks()
        cut = [j for j, keep in enumerate(plan) if not keep.removes_nothing()]
        with self.streamed.prefetching(cut):  # the next layer to cut is read while this one is cut
            for j in cut:
                keep = plan[j]
                with self.streamed.resident(j):
                    if s.compensate != "none":
                        layer_stats = stats
                        if layer_stats is None:  # one layer's statistics at a time: replay its calibration forward
                            layer_stats = InputStatistics(self.adapter, s.compensate)
                            with layer_stats.attached([j]):
                                self.streamed.replay(j)
                            layer_stats.reduce_across_ranks()
                        compensate_layer(self.adapter, j, keep, layer_stats, self.damp, s.mlp_select)
                    prune_layer(self.adapter, j, keep)
                    self.streamed.rewrite(j, self.scratch)
        self.streamed.forget_inputs()
        self.adapter.record_shapes()

    @staticmethod
    def _reduce_across_ranks(scores: GroupScores) -> GroupScores:
        # Under torchrun every rank sees other data: sum the saliency so all ranks decide identically.
        if process_group_world():
            for t in scores.all_tensors():
                torch.distributed.all_reduce(t)
        return scores

    def step(self, target_params: int, optimizer=None, group_scores: GroupScores | None = None,
             progress: Callable[[int], None] | None = None, max_groups: int | None = None) -> dict:
        """One sub-step: score, allocate per-layer widths for ``target_params`` total, cut. Returns a record.
        ``max_groups`` (``--allocation global`` only) stops the cut after that many groups, short of the target."""
        if max_groups is not None and self.settings.allocation != "global":
            raise ValueError("max_groups counts the groups of one global ranking; it needs allocation='global'")
        t0 = time.perf_counter()
        s = self.settings
        trim_heap()  # the last sub-step freed every weight and statistic it resized: give their pages back first
        if self.resample and self.history:
            self.calib_ids = self.calib_sampler(len(self.history))
        stats = InputStatistics(self.adapter, s.compensate) if s.compensate != "none" else None
        if stats is not None and self._carried is not None:
            stats.start_from(self._carried, self.carry)
        self._carried = None
        if stats is not None and self.streamed is not None and not self._statistics_fit():
            stats = None  # streamed: each layer's statistics are gathered when it is cut (replay)
        observers = (stats,) if stats is not None else ()
        if group_scores is not None and (s.allocation == "adaptive" or s.compensate != "none"):
            raw, _, loss = self._calibration_pass(s.similarity if s.allocation == "adaptive" else None, None,
                                                  progress, observers)
            if raw is None:
                raw = torch.zeros(len(self.adapter.layers), dtype=torch.float64)
            scores = group_scores
        elif group_scores is not None:
            raw, scores, loss = torch.zeros(len(self.adapter.layers), dtype=torch.float64), group_scores, None
        else:
            raw, scores, loss = self._scores(progress, observers)
        if s.allocation == "global":
            return self._global_step(target_params, scores, stats, optimizer, loss, t0, max_groups)
        world = process_group_world()
        if world:
            raw = raw.to(next(self.model.parameters()).device, torch.float64)
            torch.distributed.all_reduce(raw)
            raw = raw.cpu() / world
        importance = self._importance(raw)
        amplitude = s.amplitude if s.allocation == "adaptive" else 0.0
        target_prunable = max(0, target_params - self.fixed_params)
        s_cur = self._sparsity_of_included(target_prunable)
        targets = None
        if s.layer_update == "incremental":
            previous = self.layer_sparsity
            if previous is None:
                previous = torch.full((len(raw),), self.overall_sparsity)
            targets = incremental_sparsities(previous, s_cur - self.overall_sparsity, importance, amplitude)
            self.layer_sparsity = targets
        elif self.frozen:
            targets = layer_sparsities(s_cur, importance, amplitude)
        if targets is not None and self.frozen:
            targets[sorted(self.frozen)] = 0.0
        self.overall_sparsity = s_cur
        costs = self._layer_costs(scores) if s.split == "saliency" else None
        budgets, sparsity = plan_budgets(
            self.adapter, self.original_shapes, self.original_prunable, target_prunable,
            importance, amplitude, s.ladder, s.round_to, costs, targets, self.frozen,
        )
        plan = []
        for j, budget in enumerate(budgets):
            cur = self.adapter.layer_shape(j)
            new = budget_shape(self.original_shapes[j], budget, s.ladder)
            keep = attention_keep(scores.q_heads[j], scores.kv_heads[j], cur, new, s.ladder, s.kv_merge)
            if new.intermediate_size < cur.intermediate_size:
                keep.mlp = choose_mlp_keep(scores.mlp[j], new.intermediate_size)
            plan.append(keep)
        self._cut(plan, stats, optimizer)
        return self._record(target_params, loss, raw, importance, sparsity, t0)

    def _record(self, target_params: int, loss: float | None, raw, importance, sparsity, t0: float,
                **extra) -> dict:
        """The history record of the sub-step just cut (``extra`` fields before its time), appended and returned."""
        record = {
            "target_params": int(target_params),
            "params": count_params(self.model),
            "calib_loss": loss,
            "layer_importance_raw": [float(x) for x in raw],
            "layer_importance": [float(x) for x in importance],
            "layer_sparsity": [float(x) for x in sparsity],
            "widths": [asdict(sh) for sh in self.adapter.shapes()],
            **extra,
            "seconds": time.perf_counter() - t0,
        }
        self.history.append(record)
        return record

    def _importance(self, raw: torch.Tensor) -> torch.Tensor:
        """Normalised layer importance ``I_j`` (zeros under uniform allocation); with ``--layers`` it is
        normalised over the pruned layers alone and is 0 for the frozen ones."""
        if self.settings.allocation != "adaptive":
            return torch.zeros(len(raw))
        if not self.frozen:
            return scale_importance(raw.float(), self.settings.importance_scale)
        included = [j for j in range(len(raw)) if j not in self.frozen]
        importance = torch.zeros(len(raw))
        importance[included] = scale_importance(raw.float()[included], self.settings.importance_scale)
        return importance

    def _sparsity_of_included(self, target_prunable: int) -> float:
        """Overall sparsity the pruned layers must reach for the model to have ``target_prunable`` prunable
        parameters (frozen layers keep all of theirs)."""
        if not self.frozen:
            return 1.0 - target_prunable / self.original_prunable
        return (self.original_prunable - target_prunable) / self.included_prunable

    def _global_step(self, target_params: int, scores: GroupScores, stats: InputStatistics | None, optimizer,
                     loss: float | None, t0: float, max_groups: int | None = None) -> dict:
        """A sub-step of ``--allocation global``: one ranking of heads, MLP channels and stem channels."""
        s = self.settings
        before = count_params(self.model)
        plan: GlobalPlan = plan_global(self.adapter, scores, target_params, s.group_types, s.ladder,
                                       s.uniform_shape, SizeModel(self.adapter), max_groups)
        self._cut(plan.layers, stats, optimizer)  # compensation refits o/down columns before their rows shrink
        if plan.stem_keep is not None:
            prune_stem(self.adapter, plan.stem_keep, optimizer)
        params = count_params(self.model)
        if params != plan.params:
            raise RuntimeError(f"global plan expected {plan.params:,} parameters, surgery left {params:,}")
        n = len(self.adapter.layers)
        layer_params = [self.adapter.layer_params(j) for j in range(n)]
        size = SizeModel(self.adapter)
        original = [sum(x * m for x, m in zip(size.layer_coefficients(j, self.original_shapes[j]),
                                               (self.original_hidden, 1))) for j in range(n)]
        return self._record(target_params, loss, [0.0] * n, [0.0] * n,
                            [1.0 - a / b for a, b in zip(layer_params, original)], t0,
                            hidden_size=self.adapter.hidden_size,
                            removed_params={k: int(v) for k, v in plan.removed_params.items()},
                            removal_order=plan.removal_order, params_removed=before - params)

    def _layer_costs(self, scores: GroupScores) -> list[LayerCosts]:
        """Saliency lost by each attention rung, and cumulative saliency of the cheapest MLP channels, per layer."""
        out = []
        ladder = self.settings.ladder
        for j in range(len(self.adapter.layers)):
            shape = self.adapter.layer_shape(j)
            attention = rung_costs(scores.q_heads[j], scores.kv_heads[j], shape, ladder, rungs(shape, ladder, j))
            mlp = scores.mlp[j].double().cpu().sort().values
            zero = torch.zeros(1, dtype=torch.float64)
            out.append(LayerCosts(attention, torch.cat([zero, mlp.cumsum(0)])[:-1]))
        return out

    def prune_to(self, target_params: int, steps: int | None = None, optimizer=None,
                 group_scores: GroupScores | None = None, progress=None, on_step=None) -> list[dict]:
        """Shrink the model in place to ``target_params`` total parameters in ``steps`` sub-steps."""
        steps = steps or self.settings.steps
        floor = self.min_params()
        current = count_params(self.model)
        if target_params < floor:
            raise UsageError(
                f"target of {target_params:,} parameters is below the smallest reachable size {floor:,} "
                f"(the lowest attention rung and one MLP channel per layer, embeddings kept); ask for fewer removed"
            )
        if target_params > current:
            raise UsageError(f"target of {target_params:,} parameters exceeds the current {current:,}; "
                             f"pruning only removes parameters")
        records = []
        for i, target in enumerate(step_targets(current, target_params, steps)):
            # Precomputed scores (e.g. from training) describe the current shapes: valid for one cut only.
            rec = self.step(target, optimizer, group_scores if i == 0 else None, progress)
            records.append(rec)
            if on_step is not None:
                on_step(rec)
        return records

    def state_dict(self) -> dict:
        """Everything a resumed run needs besides the model: original accounting, history, RNG, layer targets."""
        return {
            "original_shapes": [asdict(sh) for sh in self.original_shapes],
            "original_prunable": self.original_prunable, "original_total": self.original_total,
            "fixed_params": self.fixed_params, "history": self.history,
            "generator": self.generator.get_state(),
            "layer_sparsity": None if self.layer_sparsity is None else self.layer_sparsity.tolist(),
            "overall_sparsity": self.overall_sparsity, "original_hidden": self.original_hidden,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore state_dict() onto a pruner built around the (already pruned) model."""
        self.original_shapes = [LayerShape(**sh) for sh in state["original_shapes"]]
        self.original_prunable, self.original_total = state["original_prunable"], state["original_total"]
        self.fixed_params = state["fixed_params"]
        self.original_hidden = state.get("original_hidden", self.adapter.hidden_size)
        self.history = state["history"]
        self.generator.set_state(state["generator"])
        layer = state.get("layer_sparsity")
        self.layer_sparsity = None if layer is None else torch.tensor(layer, dtype=torch.float32)
        self.overall_sparsity = state.get("overall_sparsity", 1.0 - self.adapter.prunable_params()
                                          / self.original_prunable)

    def target_from_sparsity(self, sparsity: float) -> int:
        """Total parameter target that removes ``sparsity`` of the original prunable parameters."""
        if not 0.0 <= sparsity < 1.0:
            raise UsageError(f"--sparsity must be in [0, 1), got {sparsity}")
        return self.original_total - int(round(sparsity * self.original_prunable))
