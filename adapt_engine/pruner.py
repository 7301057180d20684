"""Adapt-Pruner (Algorithm 1): calibrate → layer importance → per-layer sparsity → group saliency →
surgery, repeated for T sub-steps until the model reaches its parameter target."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from .adapters import DecoderAdapter, LayerShape, count_params
from .allocation import (
    ALLOCATIONS,
    LAYER_UPDATES,
    LayerCosts,
    budget_shape,
    incremental_sparsities,
    plan_budgets,
    step_targets,
)
from .compensation import COMPENSATIONS, InputStatistics, check_compensation, compensate_plan
from .errors import UsageError
from .groups import ATTENTION_MODES, GroupScores, LayerKeep, choose_attention_keep, choose_mlp_keep
from .importance import (
    CALIB_DTYPES,
    GRADIENT_IMPORTANCES,
    IMPORTANCES,
    SIMILARITIES,
    calibration_pass,
    magnitude_scores,
    random_scores,
)
from .importance_scale import IMPORTANCE_SCALES, scale_importance
from .settings import check_bounds, setting
from .surgery import apply_plan

__all__ = ["PruneSettings", "AdaptPruner", "count_params"]

SPLITS = ("saliency", "proportional")



@dataclass
class PruneSettings:
    """Knobs of Adapt-Pruner (defaults are the paper's); each field is one flag of `prune` and `accel`."""

    amplitude: float = setting(0.02, minimum=0.0, maximum=1.0,
                               help="A in the per-layer shift A*I_j (paper default 0.02; 0 = uniform)")
    steps: int = setting(50, minimum=1, help="sub-steps T of Algorithm 1 (default 50)")
    allocation: str = setting("adaptive", choices=ALLOCATIONS,
                              help="per-layer sparsity: adaptive (from layer importance) or uniform")
    layer_update: str = setting(
        "incremental", choices=LAYER_UPDATES,
        help="per-layer sparsity at each sub-step: move it by the step's increment minus A*I_j, as the authors' "
        "code does (default), or set it to S_cur - A*I_j (the paper's Eq. 6)")
    importance: str = setting("taylor", choices=IMPORTANCES, help="group saliency (default taylor = |dL/dW * W|)")
    similarity: str = setting("cosine", choices=SIMILARITIES,
                              help="layer importance from the similarity of each layer's input and output")
    attention: str = setting("query", choices=ATTENTION_MODES,
                             help="attention granularity: same number of query heads per KV group, or whole KV groups")
    round_to: int = setting(1, minimum=1, help="make every MLP width a multiple of K (1 = no rounding)")
    split: str = setting("saliency", choices=SPLITS,
                         help="inside a layer, remove attention units only where they are less salient than the MLP "
                         "channels they would spare (default), or give attention its proportional share")
    calib_batch_size: int = setting(32, minimum=1, help="calibration sequences per scored gradient")
    # Activations of 8 sequences at a time, not 32 (README: peak RSS); the batch's scores are the same.
    calib_micro_batch: int = setting(8, minimum=1, help="sequences per forward/backward inside a calibration batch "
                                     "(same scores, activations of one micro-batch)")
    calib_dtype: str = setting("float32", choices=CALIB_DTYPES,
                               help="calibration forward/backward under bf16 autocast (fp32 weights and saliency); "
                               "auto: bf16 where the device runs it fast")
    seed: int = setting(0, help="random seed (calibration sample, data order, random importance)")
    # Issue-18 quality levers (docs/quality.md has the ablation that chose these defaults).
    compensate: str = setting("lstsq", choices=COMPENSATIONS,
                              help="after each cut, refit the kept columns of o_proj/down_proj by ridge least squares "
                              "on the calibration activations (lstsq, default), FLAP-style bias compensation (bias: "
                              "models with o/down biases only), or plain removal (none)")
    # 1 (not 0.01): a strong ridge transfers better from 64x64 calibration tokens (docs/quality.md sweep).
    compensate_damp: float = setting(1.0, minimum=0.0,
                                     help="ridge of --compensate lstsq, relative to the mean Gram diagonal")
    calib_resample: bool = setting(False, help="draw fresh calibration windows every sub-step (seed + sub-step)")
    importance_scale: str = setting("max", choices=IMPORTANCE_SCALES,
                                    help="layer-importance normalisation: divide by max |I| (paper), robust "
                                    "(median/MAD, clipped) or rank")

    def validate(self) -> None:
        """Raise UsageError naming the flag for any out-of-range setting."""
        check_bounds(self)

    @property
    def needs_calibration(self) -> bool:
        """Whether these settings read calibration data (gradient saliency or adaptive allocation)."""
        return self.importance in GRADIENT_IMPORTANCES or self.allocation == "adaptive" or self.compensate != "none"


class AdaptPruner:
    """Prunes a model in place towards parameter targets, one Algorithm-1 sub-step at a time."""

    def __init__(self, model, settings: PruneSettings, calib_ids: torch.Tensor | None,
                 calib_sampler: Callable[[int], torch.Tensor] | None = None):
        """``calib_sampler(i)`` gives sub-step i's calibration windows under ``calib_resample``
        (sub-step 0 uses ``calib_ids``)."""
        settings.validate()
        self.model = model
        self.settings = settings
        self.adapter = DecoderAdapter(model)
        self.calib_ids = calib_ids
        self.calib_sampler = calib_sampler
        if settings.calib_resample and calib_sampler is None:
            raise UsageError("calib_resample needs a calib_sampler that draws fresh windows for each sub-step")
        check_compensation(self.adapter, settings.compensate, settings.compensate_damp)
        self.original_shapes = self.adapter.shapes()
        self.original_prunable = self.adapter.prunable_params()
        self.original_total = count_params(model)
        # Parameters that pruning never touches (embeddings, norms, LM head).
        self.fixed_params = self.original_total - self.original_prunable
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.history: list[dict] = []
        # --layer-update incremental: per-layer sparsity targets carried from sub-step to sub-step, and
        # the overall sparsity they were last moved to (relative to the original prunable parameters).
        self.layer_sparsity: torch.Tensor | None = None
        self.overall_sparsity = 0.0
        if settings.needs_calibration and (calib_ids is None or calib_ids.numel() == 0):
            raise UsageError("this importance/allocation/compensation needs calibration data; pass calib_ids "
                             "(or use compensate='none' with magnitude/random importance and uniform allocation)")

    def min_params(self) -> int:
        """Smallest reachable size: one attention unit and one MLP channel (or round_to) per layer."""
        a = self.adapter
        total = self.fixed_params
        step = self.settings.round_to
        for j, s in enumerate(self.original_shapes):
            kv = s.num_kv_heads if self.settings.attention == "query" else 1
            q = kv if self.settings.attention == "query" else s.num_heads // s.num_kv_heads
            total += q * a.params_per_query_head(j) + kv * a.params_per_kv_head(j)
            total += min(step, s.intermediate_size) * a.params_per_channel(j)
        return total

    def _scores(self, progress: Callable[[int], None] | None,
                observers: tuple = ()) -> tuple[torch.Tensor, GroupScores, float | None]:
        s = self.settings
        adaptive = s.allocation == "adaptive"
        gradient = s.importance in GRADIENT_IMPORTANCES
        raw, scores, loss = None, None, None
        if adaptive or gradient or observers:
            raw, scores, loss = calibration_pass(
                self.adapter, self.calib_ids, s.calib_batch_size,
                s.similarity if adaptive else None, s.importance if gradient else None, progress,
                calib_dtype=s.calib_dtype, micro_batch_size=s.calib_micro_batch, observers=observers,
            )
        if s.importance == "magnitude":
            scores = magnitude_scores(self.adapter)
        elif s.importance == "random":
            scores = random_scores(self.adapter, self.generator)
        scores = self._reduce_across_ranks(scores)
        n = len(self.adapter.layers)
        if raw is None:
            raw = torch.zeros(n, dtype=torch.float64)
        return raw, scores, loss

    @staticmethod
    def _reduce_across_ranks(scores: GroupScores) -> GroupScores:
        # Under torchrun every rank sees other data: sum the saliency so all ranks decide identically.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for t in scores.all_tensors():
                torch.distributed.all_reduce(t)
        return scores

    def step(self, target_params: int, optimizer=None, group_scores: GroupScores | None = None,
             progress: Callable[[int], None] | None = None) -> dict:
        """One sub-step: score, allocate per-layer widths for ``target_params`` total, cut. Returns a record."""
        t0 = time.perf_counter()
        s = self.settings
        if s.calib_resample and self.history:
            self.calib_ids = self.calib_sampler(len(self.history))
        stats = InputStatistics(self.adapter, s.compensate) if s.compensate != "none" else None
        observers = (stats,) if stats is not None else ()
        if group_scores is not None and (s.allocation == "adaptive" or observers):
            raw, _, loss = calibration_pass(self.adapter, self.calib_ids, s.calib_batch_size,
                                            s.similarity if s.allocation == "adaptive" else None, None, progress,
                                            calib_dtype=s.calib_dtype, micro_batch_size=s.calib_micro_batch,
                                            observers=observers)
            if raw is None:
                raw = torch.zeros(len(self.adapter.layers), dtype=torch.float64)
            scores = group_scores
        elif group_scores is not None:
            raw, scores, loss = torch.zeros(len(self.adapter.layers), dtype=torch.float64), group_scores, None
        else:
            raw, scores, loss = self._scores(progress, observers)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            raw = raw.to(next(self.model.parameters()).device, torch.float64)
            torch.distributed.all_reduce(raw)
            raw = raw.cpu() / torch.distributed.get_world_size()
        adaptive = s.allocation == "adaptive"
        importance = scale_importance(raw.float(), s.importance_scale) if adaptive else torch.zeros(len(raw))
        amplitude = s.amplitude if s.allocation == "adaptive" else 0.0
        target_prunable = max(0, target_params - self.fixed_params)
        s_cur = 1.0 - target_prunable / self.original_prunable
        targets = None
        if s.layer_update == "incremental":
            previous = self.layer_sparsity
            if previous is None:
                previous = torch.full((len(raw),), self.overall_sparsity)
            targets = incremental_sparsities(previous, s_cur - self.overall_sparsity, importance, amplitude)
            self.layer_sparsity = targets
        self.overall_sparsity = s_cur
        costs = self._layer_costs(scores) if s.split == "saliency" else None
        budgets, sparsity = plan_budgets(
            self.adapter, self.original_shapes, self.original_prunable, target_prunable,
            importance, amplitude, s.attention, s.round_to, costs, targets,
        )
        plan = []
        for j, budget in enumerate(budgets):
            cur = self.adapter.layer_shape(j)
            new = budget_shape(self.original_shapes[j], budget, s.attention)
            keep = LayerKeep()
            if new.num_heads < cur.num_heads:
                units = budget.attention_units
                keep.q_heads, kv = choose_attention_keep(scores.q_heads[j], scores.kv_heads[j], cur.num_kv_heads,
                                                         units, s.attention)
                if new.num_kv_heads < cur.num_kv_heads:
                    keep.kv_heads = kv
            if new.intermediate_size < cur.intermediate_size:
                keep.mlp = choose_mlp_keep(scores.mlp[j], new.intermediate_size)
            plan.append(keep)
        if stats is not None:
            stats.reduce_across_ranks()
            compensate_plan(self.adapter, plan, stats, s.compensate_damp)
        apply_plan(self.adapter, plan, optimizer)
        record = {
            "target_params": int(target_params),
            "params": count_params(self.model),
            "calib_loss": loss,
            "layer_importance_raw": [float(x) for x in raw],
            "layer_importance": [float(x) for x in importance],
            "layer_sparsity": [float(x) for x in sparsity],
            "widths": [asdict(sh) for sh in self.adapter.shapes()],
            "seconds": time.perf_counter() - t0,
        }
        self.history.append(record)
        return record

    def _layer_costs(self, scores: GroupScores) -> list[LayerCosts]:
        """Cumulative saliency of removing the cheapest attention units and MLP channels, per layer."""
        out = []
        for j in range(len(self.adapter.layers)):
            shape = self.adapter.layer_shape(j)
            q = scores.q_heads[j].double().cpu().view(shape.num_kv_heads, -1)
            if self.settings.attention == "query":
                unit = q.sort(dim=1).values.sum(0)  # r-th unit = r-th cheapest query head of every group
            else:
                unit = (q.sum(1) + scores.kv_heads[j].double().cpu()).sort().values
            mlp = scores.mlp[j].double().cpu().sort().values
            zero = torch.zeros(1, dtype=torch.float64)
            out.append(LayerCosts(torch.cat([zero, unit.cumsum(0)])[:-1], torch.cat([zero, mlp.cumsum(0)])[:-1]))
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
                f"(one attention unit and one MLP channel per layer, embeddings kept); ask for fewer removed"
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
            "overall_sparsity": self.overall_sparsity,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore state_dict() onto a pruner built around the (already pruned) model."""
        self.original_shapes = [LayerShape(**sh) for sh in state["original_shapes"]]
        self.original_prunable, self.original_total = state["original_prunable"], state["original_total"]
        self.fixed_params = state["fixed_params"]
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
