"""Layer-streamed calibration: the saliency and layer importances of a model that is never whole in memory.

The model is built as a skeleton whose decoder-layer weights are placeholders (a zero-byte expanded view
with the weight's shape, so shapes, parameter counts and the pruning plan all work), and only "the ends"
(embedding, final norm, LM head) are loaded. Weights come from the folder's safetensors shards, which are
memory-mapped: one decoder layer is resident at a time.

The pass runs layer-major instead of batch-major and computes what :func:`importance.calibration_pass`
computes, in the same order for each layer:

1. **capture**: the model's own forward runs with every decoder layer replaced by a tap, which records the
   layer's keyword arguments (masks, rotary embeddings: whatever the family passes) and the embedding
   output. Family differences (embedding scaling, masks, sliding windows) stay the model's own code.
2. **forward sweep**: layer j is loaded, every calibration micro-batch goes through it (layer-similarity
   and compensation hooks watch, as in the in-memory pass), its inputs are kept for the backward sweep,
   and the layer is released.
3. **loss**: the model's own head (final norm, LM head, fused loss) runs on the last layer's output, whose
   gradient starts the backward sweep.
4. **backward sweep**, from the last layer down: layer j is loaded, its forward is recomputed from the
   stored input, the stored output gradient is back-propagated, the weight gradients are reduced to group
   scores by the same collector hooks (batch by batch, micro-batches summed), and the input gradient is
   handed down.

Memory at the peak: the ends, one layer with its gradients, and the stored layer inputs
(``layers × calibration tokens × hidden × 4`` bytes in float32).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .adapters import DecoderAdapter
from .errors import AdaptEngineError
from .fsio import atomic_write_json
from .importance import (
    CalibPass,
    LayerSimilarity,
    SaliencyCollector,
    calib_autocast,
    calibration_batches,
    hidden_out,
)
from .lm_loss import causal_lm_loss
from .precision import fp32_matmul, resolve_fp32_matmul

LAYER_PREFIX = "model.layers."


class StreamingError(AdaptEngineError, ValueError):
    """A model that cannot be streamed layer by layer; the message names why and the alternative."""


def placeholder(shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor of ``shape`` that owns one element: stands in for a weight that is not resident."""
    return torch.zeros((), dtype=dtype).expand(shape)


def is_placeholder(t: torch.Tensor) -> bool:
    """Whether ``t`` is a stand-in made by :func:`placeholder` (stride 0 in every dimension)."""
    return t.dim() > 0 and t.numel() > 1 and all(s == 0 for s in t.stride())


# safetensors dtype names of the floating-point weights a decoder LLM stores (what write_safetensors writes).
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` as a safetensors file straight from their memory.

    ``safetensors.torch.save_file`` first copies every tensor into a bytes object, which doubles the memory
    of the largest tensor (an 8B Llama's 1 GB embedding); this writes the header, then each tensor's bytes.
    """
    names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    parts = []
    for name, t in tensors.items():
        t = t.detach().contiguous()
        size = t.numel() * t.element_size()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        parts.append(t)
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for t in parts:
            if t.numel():
                fh.write(memoryview(t.view(torch.uint8).reshape(-1).numpy()))


class ShardStore:
    """The tensors of a model folder's safetensors shards, read group by group (memory-mapped)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.folder / f for name, f in weight_map.items()}
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                raise StreamingError(f"{self.folder} has no safetensors weights; streaming reads safetensors "
                                     f"shards (convert the model, or prune without streaming)")
            self.files = {}
            for f in files:
                try:
                    with safe_open(str(f), framework="pt") as fh:
                        self.files.update({name: f for name in fh.keys()})
                except SafetensorError as err:
                    raise StreamingError(f"{f} is corrupt or truncated ({err}); download or save the model "
                                         f"again") from err

    def read(self, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The tensors ``names`` at ``dtype`` (each shard opened once)."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.files:
                raise StreamingError(f"{self.folder} lacks weight '{name}'; the save is incomplete")
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for f, group in by_file.items():
            try:
                # Tensors of the model's dtype stay backed by the file's pages (mapped copy-on-write): the kernel
                # can drop and re-read them, so they cost less resident memory than a copy would.
                with safe_open(str(f), framework="pt") as fh:
                    for name in group:
                        out[name] = fh.get_tensor(name).to(dtype)
            except SafetensorError as err:
                raise StreamingError(f"{f} is corrupt or truncated ({err}); download or save the model again") from err
        return out


def _replace_with_placeholders(model: nn.Module, dtype: torch.dtype) -> None:
    """Every meta parameter becomes a placeholder Parameter (tied parameters stay one object)."""
    new: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in new:
                new[id(p)] = nn.Parameter(placeholder(p.shape, dtype), requires_grad=p.requires_grad)
            module._parameters[name] = new[id(p)]


def build_skeleton(config, model_cls, dtype: torch.dtype) -> nn.Module:
    """The causal LM of ``config`` with every weight a placeholder and every buffer real."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = model_cls(config) if model_cls is not None else _auto_model(config)
    model.tie_weights()  # a tied head must stay the embedding's own parameter through the replacement
    _replace_with_placeholders(model, dtype)
    return model.eval()


def _auto_model(config) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config)


def available_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def resolve_offload(mode: str, model: str | None, dtype: str) -> str:
    """``none`` or ``layer`` for ``--offload mode``; ``auto`` streams a local safetensors folder whose weights
    would take more than half of the available memory."""
    if mode != "auto":
        return mode
    from .models import estimate_model_bytes

    folder = Path(model).expanduser() if model else None
    if folder is None or not folder.is_dir() or not any(folder.glob("*.safetensors")):
        return "none"
    need, free = estimate_model_bytes(str(folder), dtype), available_memory_bytes()
    return "layer" if need and free and need > free / 2 else "none"


def streamed_perplexity(streamed: StreamedModel, ids: torch.Tensor, seq_len: int = 512, batch_size: int = 4,
                        max_tokens: int | None = None) -> dict:
    """:func:`evaluate.perplexity` of a streamed model (the same windows and sums)."""
    from .evaluate import eval_batches, perplexity_result

    batches = eval_batches(ids, seq_len, batch_size, max_tokens)
    return perplexity_result(streamed_nll(streamed, batches), batches)


def open_streamed(folder: str | Path, dtype: torch.dtype) -> StreamedModel:
    """A :class:`StreamedModel` of a transformers model folder or a saved pruned model (safetensors only)."""
    from .models import is_pruned_dir

    folder = Path(folder)
    if not folder.is_dir():
        raise StreamingError(f"streaming reads a model folder with safetensors shards; '{folder}' is not a folder "
                             f"(a .gguf file or hub id loads whole: use --offload none)")
    store = ShardStore(folder)  # first: a folder without safetensors is refused for what streaming needs
    if is_pruned_dir(folder):
        from .saving import pruned_config

        model_cls, config = pruned_config(folder)
    else:
        from .models import folder_config

        model_cls, config = None, folder_config(folder, need_tokenizer=False)  # the caller loads the tokenizer
    return StreamedModel(build_skeleton(config, model_cls, dtype), store, dtype)


class StreamedModel:
    """A skeleton model whose decoder layers are loaded from a :class:`ShardStore` one at a time."""

    def __init__(self, model: nn.Module, store: ShardStore, dtype: torch.dtype):
        self.model = model
        self.store = store
        self.dtype = dtype
        self.adapter = DecoderAdapter(model)
        self.layer_params: list[dict[str, nn.Parameter]] = [{} for _ in self.adapter.layers]
        self.end_params: dict[str, nn.Parameter] = {}
        self.kept: tuple | None = None  # calibration inputs of every layer, for replay()
        for name, p in model.named_parameters():  # a tied parameter once, under the name the shards use
            if name.startswith(LAYER_PREFIX):
                index = int(name[len(LAYER_PREFIX):].split(".", 1)[0])
                self.layer_params[index][name] = p
            else:
                self.end_params[name] = p
        self._load(self.end_params)

    def _load(self, params: dict[str, nn.Parameter]) -> None:
        tensors = self.store.read(list(params), self.dtype)
        for name, p in params.items():
            if tuple(tensors[name].shape) != tuple(p.shape):
                raise StreamingError(f"weight '{name}' has shape {tuple(tensors[name].shape)} in "
                                     f"{self.store.folder} but the config builds {tuple(p.shape)}")
            p.data = tensors[name]

    def replay(self, index: int) -> None:
        """Run resident layer ``index`` on its kept calibration inputs (its forward hooks watch)."""
        if self.kept is None:
            raise RuntimeError("no calibration inputs kept: run streamed_calibration_pass(..., keep_inputs=True)")
        inputs, calls, autocast = self.kept
        layer = self.adapter.layers[index]
        with torch.no_grad(), autocast():
            for m, x in enumerate(inputs[index]):
                layer(x, **calls[m][index])

    def forget_inputs(self) -> None:
        """Free the kept calibration inputs."""
        self.kept = None

    def rewrite(self, index: int, scratch: Path) -> None:
        """Persist resident layer ``index`` (after surgery) to ``scratch``; later loads read it from there."""
        # Surgery may have replaced modules (a removed attention sub-layer has no parameters): list them anew.
        layer = self.adapter.layers[index]
        params = {f"{LAYER_PREFIX}{index}.{name}": p for name, p in layer.named_parameters()}
        self.layer_params[index] = params
        path = scratch / f"layer-{index:05d}.safetensors"
        tmp = path.with_suffix(".tmp")
        write_safetensors(tmp, {name: p.data for name, p in params.items()})
        tmp.replace(path)  # scratch of this run only: a rename is enough, no fsync
        self.store.files.update({name: path for name in params})

    def write_weights(self, folder: Path) -> None:
        """Write every weight to ``folder`` as safetensors shards (one per layer, one for the rest) with an
        index, one layer in memory at a time (the layout transformers reads)."""
        n = len(self.layer_params)
        files = [f"model-{i + 1:05d}-of-{n + 1:05d}.safetensors" for i in range(n + 1)]
        weight_map: dict[str, str] = {}
        for i, params in enumerate([*self.layer_params, self.end_params]):
            # The ends are resident: written from memory, not read a second time.
            tensors = ({name: p.data for name, p in params.items()} if params is self.end_params
                       else self.store.read(list(params), self.dtype))
            write_safetensors(folder / files[i], tensors)
            weight_map.update({name: files[i] for name in tensors})
            del tensors
        total = sum((folder / f).stat().st_size for f in files)
        atomic_write_json(folder / "model.safetensors.index.json",
                          {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)

    @contextlib.contextmanager
    def resident(self, index: int) -> Iterator[nn.Module]:
        """Decoder layer ``index`` with its real weights while inside the block; placeholders again after."""
        params = self.layer_params[index]
        self._load(params)
        try:
            yield self.adapter.layers[index]
        finally:
            for p in params.values():
                p.data = placeholder(p.shape, self.dtype)
                p.grad = None


class _Tap(nn.Module):
    """Stands in for a decoder layer: records its call, and returns ``replacement`` or its input."""

    def __init__(self, record: Callable[[torch.Tensor, dict], None] | None = None,
                 replacement: torch.Tensor | None = None):
        super().__init__()
        self.record = record
        self.replacement = replacement

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.record is not None:
            self.record(hidden_states, kwargs)
        return self.replacement if self.replacement is not None else hidden_states


@contextlib.contextmanager
def _tapped(model: nn.Module, taps: list[nn.Module]) -> Iterator[None]:
    layers = model.model.layers
    saved = list(layers)
    try:
        for i, tap in enumerate(taps):
            layers[i] = tap
        yield
    finally:
        for i, layer in enumerate(saved):
            layers[i] = layer


def _capture(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
    """(embedding output, keyword arguments of every decoder layer) of one micro-batch."""
    n = len(model.model.layers)
    calls: list[dict] = [{} for _ in range(n)]
    first: list[torch.Tensor] = []

    def recorder(i: int):
        def record(hidden: torch.Tensor, kwargs: dict) -> None:
            if i == 0:
                first.append(hidden.detach())
            calls[i] = kwargs

        return record

    with _tapped(model, [_Tap(recorder(i)) for i in range(n)]), torch.no_grad():
        model.model(input_ids=ids, use_cache=False)
    return first[0], calls


def _capture_all(model: nn.Module, batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """Embedding outputs and per-layer keyword arguments of every micro-batch."""
    hidden, calls = [], []
    for ids in batches:
        h, c = _capture(model, ids)
        hidden.append(h)
        calls.append(c)
    return hidden, calls


@torch.no_grad()
def _forward_sweep(streamed: StreamedModel, hidden: list[torch.Tensor], calls: list[list[dict]], autocast,
                   keep_inputs: bool) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Every micro-batch through every layer, one resident layer at a time; returns the last layer's outputs
    and (``keep_inputs``) every layer's inputs."""
    inputs: list[list[torch.Tensor]] = []
    for j in range(len(streamed.adapter.layers)):
        if keep_inputs:
            inputs.append(hidden)
        with streamed.resident(j) as layer, autocast():
            hidden = [hidden_out(layer(x, **calls[m][j])) for m, x in enumerate(hidden)]
    return hidden, inputs


def _head_loss(model: nn.Module, ids: torch.Tensor, top: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The model's own loss of ``ids`` with ``top`` as the last decoder layer's output (final norm, LM head)."""
    n = len(model.model.layers)
    with _tapped(model, [_Tap() for _ in range(n - 1)] + [_Tap(replacement=top)]):
        return causal_lm_loss(model, ids, reduction=reduction)


def streamed_nll(streamed: StreamedModel, batches: list[torch.Tensor]) -> float:
    """Summed next-token loss of ``batches`` (as ``causal_lm_loss(..., reduction='sum')``), streamed."""
    hidden, calls = _capture_all(streamed.model, batches)
    hidden, _ = _forward_sweep(streamed, hidden, calls, contextlib.nullcontext, keep_inputs=False)
    with torch.no_grad():
        return sum(float(_head_loss(streamed.model, ids, h, "sum")) for ids, h in zip(batches, hidden))


def streamed_calibration_pass(streamed: StreamedModel, calib_ids: torch.Tensor, opts: CalibPass, progress=None,
                              observers: tuple = (), keep_inputs: bool = False,
                              ) -> tuple[torch.Tensor | None, object, float]:
    """:func:`importance.calibration_pass` with one decoder layer resident at a time (same results: raw layer
    importances, group saliency, mean loss). ``keep_inputs`` keeps every layer's calibration inputs on
    ``streamed`` for :meth:`StreamedModel.replay` (until ``forget_inputs``)."""
    # The whole pass, the backward sweep included (autocast covers only the forwards).
    with fp32_matmul(resolve_fp32_matmul(opts.fp32_matmul, "cpu")):
        return _streamed_pass(streamed, calib_ids, opts, progress, observers, keep_inputs)


def _streamed_pass(streamed: StreamedModel, calib_ids: torch.Tensor, opts: CalibPass, progress, observers: tuple,
                   keep_inputs: bool) -> tuple[torch.Tensor | None, object, float]:
    """The body of :func:`streamed_calibration_pass`."""
    model, adapter = streamed.model, streamed.adapter
    autocast = calib_autocast(opts.calib_dtype, "cpu", streamed.dtype, opts.fp32_matmul)
    batches = calibration_batches(calib_ids, opts.batch_size, opts.micro_batch_size)
    sim = LayerSimilarity(adapter, opts.similarity) if opts.similarity else None
    collector = (SaliencyCollector(adapter, opts.saliency_metric, opts.aggregate, opts.mix)
                 if opts.saliency_metric else None)
    hidden, calls = _capture_all(model, [ids for batch in batches for ids in batch])
    with contextlib.ExitStack() as stack:
        if sim is not None:
            stack.enter_context(sim.attached())
        for observer in observers:
            stack.enter_context(observer.attached())
        # The backward sweep recomputes each layer from its inputs; a replay at the cut reads them too.
        hidden, inputs = _forward_sweep(streamed, hidden, calls, autocast,
                                        keep_inputs=keep_inputs or collector is not None)
    raw = sim.importance() if sim is not None else None
    if keep_inputs:
        streamed.kept = (inputs, calls, autocast)
    # Loss through the model's own head; its gradient starts the backward sweep. The collector freezes every
    # weight but the prunable ones (which sit in taps here), so only the top hidden state gets a gradient.
    total_loss, grads, m = 0.0, [], 0
    with collector.attached() if collector is not None else contextlib.nullcontext():
        for batch in batches:
            rows = sum(ids.shape[0] for ids in batch)
            batch_loss = 0.0
            for ids in batch:
                top = hidden[m].detach().requires_grad_(collector is not None)
                with autocast(), torch.set_grad_enabled(collector is not None):
                    loss = _head_loss(model, ids, top)
                weight = ids.shape[0] / rows
                if collector is not None:
                    (loss * weight if weight != 1.0 else loss).backward()
                    grads.append(top.grad)
                batch_loss += float(loss.detach()) * weight
                m += 1
            total_loss += batch_loss
        del hidden
        if collector is not None:
            _backward_sweep(streamed, collector, batches, inputs, calls, grads, autocast, progress,
                            free=not keep_inputs)
        elif progress is not None:
            for batch in batches:
                progress(sum(ids.shape[0] for ids in batch))
    return raw, (collector.scores if collector is not None else None), total_loss / max(len(batches), 1)


def _backward_sweep(streamed: StreamedModel, collector: SaliencyCollector, batches, inputs, calls, grads,
                    autocast, progress, free: bool) -> None:
    """Layers from the last down: recompute each micro-batch's forward, back-propagate its output gradient
    (the collector scores each batch's weight gradients), and hand the input gradient down."""
    for j in reversed(range(len(inputs))):
        with streamed.resident(j) as layer:
            m = 0
            new_grads = []
            for batch in batches:
                for k in range(len(batch)):
                    x = inputs[j][m].detach().requires_grad_(j > 0)
                    with autocast():
                        out = hidden_out(layer(x, **calls[m][j]))
                    collector.accumulating = k < len(batch) - 1
                    out.backward(grads[m])
                    new_grads.append(x.grad)
                    m += 1
                collector.end_micro_batch()
                if j == 0 and progress is not None:
                    progress(sum(ids.shape[0] for ids in batch))
        grads = new_grads
        if free:
            inputs[j] = []  # this layer's inputs are no longer needed
