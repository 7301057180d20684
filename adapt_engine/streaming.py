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

Every sweep reads its layers through a :class:`prefetch.LayerPrefetcher` in the sweep's order: the next layer
is read (on a GPU: into pinned memory and copied host → device on a side stream) while the current one computes,
so at most two layers are resident.

The ends are not resident whole either where they are large: the embedding's rows are read on demand (only the
token ids of the batches at hand), and a head larger than :data:`HEAD_CHUNK_BYTES` is read in vocabulary chunks
for each loss (:func:`kernels.linear_cross_entropy_vocab_chunks`; it is frozen, only the gradient of the last
hidden state is needed). A head whose logits are not ``lm_head(hidden)`` (soft-capped or scaled: see
``adapters.fused_lm_head``) is loaded whole.

Memory at the peak: the resident ends, two layers (one with its gradients), one or two head chunks, and the
stored layer inputs (``layers × calibration tokens × hidden`` in the weights' dtype).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .adapters import DecoderAdapter, fused_lm_head
from .errors import AdaptEngineError
from .fsio import atomic_write_json
from .host_memory import map_large_blocks_alone
from .importance import (
    CalibPass,
    LayerSimilarity,
    SaliencyCollector,
    calib_autocast,
    calibration_batches,
    hidden_out,
)
from .kernels import linear_cross_entropy_vocab_chunks
from .lm_loss import IGNORE_INDEX, causal_lm_loss, frozen_head_weight, shifted_targets
from .precision import fp32_matmul, resolve_fp32_matmul
from .prefetch import LayerPrefetcher

LAYER_PREFIX = "model.layers."
# A head above this size is read in vocabulary chunks of this size for each loss, not held whole (an 8B
# Llama's untied head is 1 GB in bf16); below it (SmolLM2's 56 MB) the whole-head kernel runs, bit for bit.
HEAD_CHUNK_BYTES = 128 << 20


def rows_within(nbytes: int, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> int:
    """How many rows (first-dimension slices) of a ``shape`` tensor at ``dtype`` fit in ``nbytes`` (at least 1)."""
    return max(1, nbytes // max(1, math.prod(shape[1:]) * dtype.itemsize))


class StreamingError(AdaptEngineError, ValueError):
    """A model that cannot be streamed layer by layer; the message names why and the alternative."""


def placeholder(shape: torch.Size | tuple[int, ...], dtype: torch.dtype,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """A tensor of ``shape`` that owns one element: stands in for a weight that is not resident."""
    return torch.zeros((), dtype=dtype, device=device).expand(shape)


def is_placeholder(t: torch.Tensor) -> bool:
    """Whether ``t`` is a stand-in made by :func:`placeholder` (stride 0 in every dimension)."""
    return t.dim() > 0 and t.numel() > 1 and all(s == 0 for s in t.stride())


# safetensors dtype names of the floating-point weights a decoder LLM stores (what write_safetensors writes).
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


@dataclass(frozen=True)
class RowBlocks:
    """A tensor that is written block of rows by block of rows, never whole in memory."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[int, int], torch.Tensor]  # rows [start, stop) at ``dtype``
    rows: int  # rows per block

    def blocks(self) -> Iterator[torch.Tensor]:
        """The tensor's row blocks in order."""
        for start in range(0, self.shape[0], self.rows):
            yield self.read(start, min(self.shape[0], start + self.rows))


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor | RowBlocks]) -> None:
    """Write ``tensors`` as a safetensors file straight from their memory (a :class:`RowBlocks` block by block).

    ``safetensors.torch.save_file`` first copies every tensor into a bytes object, which doubles the memory
    of the largest tensor (an 8B Llama's 1 GB embedding); this writes the header, then each tensor's bytes.
    """
    names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    parts: list[torch.Tensor | RowBlocks] = []
    for name, t in tensors.items():
        if not isinstance(t, RowBlocks):
            t = t.detach().contiguous()
        shape = tuple(t.shape)
        size = math.prod(shape) * t.dtype.itemsize
        header[name] = {"dtype": names[t.dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        parts.append(t)
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for t in parts:
            for block in (t.blocks() if isinstance(t, RowBlocks) else [t]):
                if block.numel():
                    block = block.detach().cpu().contiguous()
                    fh.write(memoryview(block.view(torch.uint8).reshape(-1).numpy()))


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
                    raise self._corrupt(f, err) from err

    def _file(self, name: str) -> Path:
        if name not in self.files:
            raise StreamingError(f"{self.folder} lacks weight '{name}'; the save is incomplete")
        return self.files[name]

    def _by_file(self, names: list[str]) -> dict[Path, list[str]]:
        """``names`` grouped by the shard that holds them (each shard is then opened once)."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self._file(name), []).append(name)
        return by_file

    def _corrupt(self, f: Path, why: object) -> StreamingError:
        return StreamingError(f"{f} is corrupt or truncated ({why}); download or save the model again")

    def _locations(self, f: Path, fh) -> tuple[int, dict]:
        """(offset of the data, the header's tensor entries) of open shard ``f``."""
        try:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
        except (ValueError, UnicodeDecodeError) as err:
            raise self._corrupt(f, err) from err
        return 8 + size, header

    def load(self, names: list[str], pin: bool = False) -> dict[str, torch.Tensor]:
        """The tensors ``names`` in the file's dtype, each read (plain file reads, no mapping) into a buffer of its
        own, page-locked when ``pin``."""
        out = {}
        for f, group in self._by_file(names).items():
            with open(f, "rb", buffering=0) as fh:
                start, header = self._locations(f, fh)
                for name in group:
                    out[name] = self._read_rows(f, fh, start, header, name, 0, None, pin)
        return out

    def load_rows(self, name: str, first: int, stop: int, pin: bool = False) -> torch.Tensor:
        """Rows ``[first, stop)`` of tensor ``name`` in the file's dtype, read into a buffer of their own."""
        f = self._file(name)
        with open(f, "rb", buffering=0) as fh:
            start, header = self._locations(f, fh)
            return self._read_rows(f, fh, start, header, name, first, stop, pin)

    def _read_rows(self, f: Path, fh, start: int, header: dict, name: str, first: int, stop: int | None,
                   pin: bool) -> torch.Tensor:
        entry = header.get(name)
        if entry is None or entry.get("dtype") not in SAFETENSORS_DTYPES:
            raise self._corrupt(f, f"no floating-point entry for '{name}'")
        shape = list(entry["shape"])
        begin, end = entry["data_offsets"]
        row = math.prod(shape[1:]) * SAFETENSORS_DTYPES[entry["dtype"]].itemsize
        if shape:
            stop = shape[0] if stop is None else min(stop, shape[0])
            shape[0] = stop - first
            begin, end = begin + first * row, begin + stop * row
        out = torch.empty(shape, dtype=SAFETENSORS_DTYPES[entry["dtype"]], pin_memory=pin)
        buf = memoryview(out.view(torch.uint8).reshape(-1).numpy()) if out.numel() else memoryview(b"")
        fh.seek(start + begin)
        done = 0
        while done < end - begin:  # a read returns at most about 2 GB
            got = fh.readinto(buf[done:])
            if not got:
                raise self._corrupt(f, f"'{name}' ends after {done} of {end - begin} bytes")
            done += got
        return out

    def views(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The tensors ``names`` in the file's dtype, as views of the memory-mapped shards (each opened once):
        nothing is read until the data is touched."""
        out = {}
        for f, group in self._by_file(names).items():
            try:
                with safe_open(str(f), framework="pt") as fh:
                    for name in group:
                        out[name] = fh.get_tensor(name)
            except SafetensorError as err:
                raise self._corrupt(f, err) from err
        return out

    def read(self, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The tensors ``names`` at ``dtype`` (each shard opened once)."""
        # Tensors of the model's dtype stay backed by the file's pages (mapped copy-on-write): the kernel can
        # drop and re-read them, so they cost less resident memory than a copy would.
        return {name: t.to(dtype) for name, t in self.views(names).items()}

    def gather_rows(self, name: str, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` (1-D) of tensor ``name`` in the file's dtype; only their pages of the mapping are read."""
        f = self._file(name)
        try:
            with safe_open(str(f), framework="pt") as fh:
                return fh.get_tensor(name)[index]  # a gathered copy; the mapping goes with the view
        except SafetensorError as err:
            raise self._corrupt(f, err) from err


def _replace_with_placeholders(model: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """Every meta parameter becomes a placeholder Parameter on ``device`` (tied parameters stay one object), and
    every buffer moves to ``device`` (``model.to`` would materialise the placeholders)."""
    new: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in new:
                new[id(p)] = nn.Parameter(placeholder(p.shape, dtype, device), requires_grad=p.requires_grad)
            module._parameters[name] = new[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = b.to(device)


def build_skeleton(config, model_cls, dtype: torch.dtype, device: torch.device | str = "cpu") -> nn.Module:
    """The causal LM of ``config`` with every weight a placeholder and every buffer real (on ``device``)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = model_cls(config) if model_cls is not None else _auto_model(config)
    model.tie_weights()  # a tied head must stay the embedding's own parameter through the replacement
    _replace_with_placeholders(model, dtype, torch.device(device))
    return model.eval()


def _auto_model(config) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config)


def available_memory_bytes(device: torch.device | str = "cpu") -> int | None:
    """Free memory of ``device``: free device memory on a GPU, else MemAvailable of /proc/meminfo (None where
    there is none)."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def resolve_offload(mode: str, model: str | None, dtype: str, device: torch.device | str = "cpu") -> str:
    """``none`` or ``layer`` for ``--offload mode``; ``auto`` streams a local safetensors folder whose weights
    would take more than half of the available memory of ``device`` (the GPU's own on a GPU)."""
    if mode != "auto":
        return mode
    from .models import estimate_model_bytes

    folder = Path(model).expanduser() if model else None
    if folder is None or not folder.is_dir() or not any(folder.glob("*.safetensors")):
        return "none"
    need, free = estimate_model_bytes(str(folder), dtype), available_memory_bytes(device)
    return "layer" if need and free and need > free / 2 else "none"


def streamed_perplexity(streamed: StreamedModel, ids: torch.Tensor, seq_len: int = 512, batch_size: int = 4,
                        max_tokens: int | None = None) -> dict:
    """:func:`evaluate.perplexity` of a streamed model (the same windows and sums)."""
    from .evaluate import eval_batches, perplexity_result

    batches = eval_batches(ids, seq_len, batch_size, max_tokens)
    return perplexity_result(streamed_nll(streamed, batches), batches)


def open_streamed(folder: str | Path, dtype: torch.dtype, device: torch.device | str = "cpu",
                  prefetch: bool = True, head_chunk_bytes: int = HEAD_CHUNK_BYTES) -> StreamedModel:
    """A :class:`StreamedModel` of a transformers model folder or a saved pruned model (safetensors only), computing
    on ``device``."""
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
    return StreamedModel(build_skeleton(config, model_cls, dtype, device), store, dtype, device, prefetch,
                         head_chunk_bytes)


class StreamedModel:
    """A skeleton model whose decoder layers are loaded from a :class:`ShardStore` one at a time, and whose large
    ends (embedding, LM head) are read in pieces when they are used."""

    def __init__(self, model: nn.Module, store: ShardStore, dtype: torch.dtype, device: torch.device | str = "cpu",
                 prefetch: bool = True, head_chunk_bytes: int = HEAD_CHUNK_BYTES):
        """``prefetch`` reads the next layer in the background while one computes; a head larger than
        ``head_chunk_bytes`` is read in vocabulary chunks of that size."""
        self.model = model
        self.store = store
        self.dtype = dtype
        self.device = torch.device(device)
        self.prefetch = prefetch
        self.adapter = DecoderAdapter(model)
        self.layer_params: list[dict[str, nn.Parameter]] = [{} for _ in self.adapter.layers]
        self.end_params: dict[str, nn.Parameter] = {}
        self.kept: tuple | None = None  # calibration inputs of every layer, for replay()
        self.rewritten: dict[int, Path] = {}  # layers cut this run: their file in the scratch folder
        self._prefetcher: LayerPrefetcher | None = None
        for name, p in model.named_parameters():  # a tied parameter once, under the name the shards use
            if name.startswith(LAYER_PREFIX):
                index = int(name[len(LAYER_PREFIX):].split(".", 1)[0])
                self.layer_params[index][name] = p
            else:
                self.end_params[name] = p
        self.embed_name, self.head_name, self.head_rows = self._plan_ends(head_chunk_bytes)
        map_large_blocks_alone()
        self._load({name: p for name, p in self.end_params.items() if name not in (self.embed_name, self.head_name)})

    def _plan_ends(self, head_chunk_bytes: int) -> tuple[str | None, str | None, int]:
        """(embedding read by rows or None, head read in chunks or None, vocabulary rows per head chunk)."""
        names = {id(p): name for name, p in self.end_params.items()}
        embed = self.model.get_input_embeddings()
        out = self.model.get_output_embeddings()
        head = fused_lm_head(self.model)  # None: the family's logits are not lm_head(hidden); keep it whole
        chunked = head is not None and head.weight.numel() * self.dtype.itemsize > head_chunk_bytes
        head_name = names[id(head.weight)] if chunked else None
        rows = rows_within(head_chunk_bytes, head.weight.shape, self.dtype) if chunked else 0
        # The embedding is read by rows unless it is also a head that stays whole (tied).
        by_rows = isinstance(embed, nn.Embedding) and (chunked or out is None or out.weight is not embed.weight)
        return (names[id(embed.weight)] if by_rows else None), head_name, rows

    def _check_shape(self, name: str, t: torch.Tensor, p: nn.Parameter) -> None:
        if tuple(t.shape) != tuple(p.shape):
            raise StreamingError(f"weight '{name}' has shape {tuple(t.shape)} in {self.store.folder} but the config "
                                 f"builds {tuple(p.shape)}")

    def _load(self, params: dict[str, nn.Parameter]) -> None:
        tensors = self.store.read(list(params), self.dtype)
        for name, p in params.items():
            self._check_shape(name, tensors[name], p)
            p.data = tensors[name].to(self.device)

    def _read_layer(self, index: int, pin: bool) -> dict[str, torch.Tensor]:
        """Layer ``index``'s tensors read from the shards (the prefetcher's reader)."""
        # File reads, not the mapping: mapped pages would count in memory beside the copy until the layer is done.
        return self.store.load(list(self.layer_params[index]), pin)

    @contextlib.contextmanager
    def prefetching(self, order: Sequence[int]) -> Iterator[None]:
        """A sweep over layers ``order``: inside, :meth:`resident` must visit them in that order, and each layer is
        read while the one before it computes."""
        if self._prefetcher is not None:
            raise RuntimeError("a streamed sweep is already under way; sweeps do not nest")
        order = list(order)
        with LayerPrefetcher(self._read_layer, order, self.device, self.dtype, self.prefetch and len(order) > 1) as pf:
            self._prefetcher = pf
            try:
                yield
            finally:
                self._prefetcher = None

    @contextlib.contextmanager
    def resident(self, index: int) -> Iterator[nn.Module]:
        """Decoder layer ``index`` with its real weights while inside the block; placeholders again after (inside
        :meth:`prefetching`, the next layer of its order; outside, read now)."""
        if self._prefetcher is None:
            with self.prefetching([index]), self.resident(index) as layer:
                yield layer
            return
        params = self.layer_params[index]
        tensors = self._prefetcher.take(index)
        for name, p in params.items():
            self._check_shape(name, tensors[name], p)
            p.data = tensors[name]
        del tensors
        try:
            yield self.adapter.layers[index]
        finally:
            for p in params.values():
                p.data = placeholder(p.shape, self.dtype, self.device)
                p.grad = None

    @contextlib.contextmanager
    def embedding_rows(self, batches: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
        """``batches`` of token ids renumbered into a table of just their embedding rows, which is the embedding's
        weight while inside (read from the shard); ``batches`` unchanged when the embedding is resident."""
        if self.embed_name is None:
            yield batches
            return
        flat = torch.cat([ids.reshape(-1) for ids in batches])
        used, local = torch.unique(flat.cpu(), return_inverse=True)
        embed = self.model.get_input_embeddings()
        p = embed.weight
        table = self.store.gather_rows(self.embed_name, used)
        padding, shape = embed.padding_idx, p.shape
        p.data = table.to(self.device, self.dtype)
        # The padding row only stops gradients (none flow here) and may lie outside the smaller table.
        embed.padding_idx = None
        try:
            local = local.to(flat.device)
            yield [part.view_as(ids) for part, ids in zip(local.split([b.numel() for b in batches]), batches)]
        finally:
            embed.padding_idx = padding
            p.data = placeholder(shape, self.dtype, self.device)

    def head_chunks(self) -> Iterator[torch.Tensor]:
        """The LM head's vocabulary chunks in order, on the device (the next one read while one is used)."""
        vocab = self.end_params[self.head_name].shape[0]
        starts = list(range(0, vocab, self.head_rows))

        def read(k: int, pin: bool) -> dict[str, torch.Tensor]:
            return {"rows": self.store.load_rows(self.head_name, starts[k], starts[k] + self.head_rows, pin)}

        with LayerPrefetcher(read, range(len(starts)), self.device, self.dtype, self.prefetch) as pf:
            for k in range(len(starts)):
                yield pf.take(k)["rows"]

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
        self.rewritten[index] = path

    def _end_tensors(self) -> dict[str, torch.Tensor | RowBlocks]:
        """The ends to save: resident ones from memory, the streamed embedding and head block by block."""
        out: dict[str, torch.Tensor | RowBlocks] = {}
        for name, p in self.end_params.items():
            if name in (self.embed_name, self.head_name):
                rows = rows_within(HEAD_CHUNK_BYTES, p.shape, self.dtype)
                out[name] = RowBlocks(tuple(p.shape), self.dtype,
                                      lambda a, b, name=name: self.store.load_rows(name, a, b).to(self.dtype), rows)
            else:
                out[name] = p.data
        return out

    def _link(self, index: int, target: Path) -> bool:
        """Hard-link layer ``index``'s scratch shard as ``target``; False when it has none or cannot be linked
        (another file system, or one without hard links)."""
        path = self.rewritten.get(index)
        if path is None:
            return False
        try:
            os.link(path, target)
        except OSError:  # EXDEV, EPERM, ENOTSUP...: the caller copies the layer instead
            return False
        return True

    def write_weights(self, folder: Path) -> None:
        """Write every weight to ``folder`` as safetensors shards (one per layer, one for the rest) with an
        index, one layer in memory at a time (the layout transformers reads)."""
        n = len(self.layer_params)
        files = [f"model-{i + 1:05d}-of-{n + 1:05d}.safetensors" for i in range(n + 1)]
        weight_map = {name: files[i] for i in range(n) for name in self.layer_params[i]}
        # A layer cut this run is already a shard of the output's format in the scratch folder: it is hard-linked
        # into the output, neither read nor copied (the scratch copy stays valid until the run removes it).
        copied = [i for i in range(n) if not self._link(i, folder / files[i])]
        # Layer i+1 is read while layer i is written (host memory: no device involved).
        with LayerPrefetcher(self._read_layer, copied, "cpu", self.dtype, self.prefetch) as pf:
            for i in copied:
                write_safetensors(folder / files[i], pf.take(i))
        ends = self._end_tensors()
        write_safetensors(folder / files[n], ends)
        weight_map.update({name: files[n] for name in ends})
        total = sum((folder / f).stat().st_size for f in files)
        atomic_write_json(folder / "model.safetensors.index.json",
                          {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)


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


def _capture_all(streamed: StreamedModel, batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """Embedding outputs and per-layer keyword arguments of every micro-batch (the embedding rows they use read
    from the shard)."""
    hidden, calls = [], []
    with streamed.embedding_rows(batches) as local:
        for ids in local:
            h, c = _capture(streamed.model, ids)
            hidden.append(h)
            calls.append(c)
    return hidden, calls


@torch.no_grad()
def _forward_sweep(streamed: StreamedModel, hidden: list[torch.Tensor], calls: list[list[dict]], autocast,
                   keep_inputs: bool) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Every micro-batch through every layer, one resident layer at a time; returns the last layer's outputs
    and (``keep_inputs``) every layer's inputs."""
    inputs: list[list[torch.Tensor]] = []
    n = len(streamed.adapter.layers)
    with streamed.prefetching(range(n)):
        for j in range(n):
            if keep_inputs:
                inputs.append(hidden)
            with streamed.resident(j) as layer, autocast():
                hidden = [hidden_out(layer(x, **calls[m][j])) for m, x in enumerate(hidden)]
    return hidden, inputs


def _topped(model: nn.Module, top: torch.Tensor):
    """Inside, the decoder layers pass their input through and the last one returns ``top``."""
    n = len(model.model.layers)
    return _tapped(model, [_Tap() for _ in range(n - 1)] + [_Tap(replacement=top)])


def _head_loss(model: nn.Module, ids: torch.Tensor, top: torch.Tensor, reduction: str = "mean",
               head_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The model's own loss of ``ids`` with ``top`` as the last decoder layer's output (final norm, LM head;
    ``head_weight`` as in :func:`lm_loss.causal_lm_loss`)."""
    with _topped(model, top):
        return causal_lm_loss(model, ids, reduction=reduction, head_weight=head_weight)


def _final_hidden(model: nn.Module, ids: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """The model's last hidden state (after its final norm) with ``top`` as the last decoder layer's output."""
    with _topped(model, top):
        return model.model(input_ids=ids, use_cache=False).last_hidden_state


def _head_losses(streamed: StreamedModel, micro: list[torch.Tensor], tops: list[torch.Tensor], weights: list[float],
                 want_grad: bool, autocast, reduction: str = "mean") -> tuple[list[float], list[torch.Tensor]]:
    """Each micro-batch's loss (``reduction`` over its tokens) with ``tops`` as the last layer's outputs and, with
    ``want_grad``, the gradient of ``Σ weight·loss`` with respect to each top."""
    model = streamed.model
    losses: list[float] = []
    grads: list[torch.Tensor] = []
    if streamed.head_name is None:  # the head is resident: the model's own loss, micro-batch by micro-batch
        with autocast():
            head_weight = frozen_head_weight(model)  # a frozen head cast once, not once per micro-batch
        for ids, top, weight in zip(micro, tops, weights):
            top = top.detach().requires_grad_(want_grad)
            with autocast(), torch.set_grad_enabled(want_grad):
                loss = _head_loss(model, ids, top, reduction, head_weight)
            if want_grad:
                (loss * weight if weight != 1.0 else loss).backward()
                grads.append(top.grad)
            losses.append(float(loss.detach()))
        return losses, grads
    # The head in vocabulary chunks: one pass over it for every micro-batch's tokens at once.
    leaves, normed = [], []
    for ids, top in zip(micro, tops):
        leaves.append(top.detach().requires_grad_(want_grad))
        with autocast(), torch.set_grad_enabled(want_grad):
            normed.append(_final_hidden(model, ids, leaves[-1]))
    targets = [shifted_targets(ids).reshape(-1) for ids in micro]
    counts = [int((t != IGNORE_INDEX).sum()) for t in targets]
    per = [w / c if reduction == "mean" and c else w for w, c in zip(weights, counts)]
    scale = torch.cat([torch.full((t.numel(),), s, dtype=torch.float64, device=t.device)
                       for t, s in zip(targets, per)]) if want_grad else None
    hidden = torch.cat([h.detach().reshape(-1, h.shape[-1]) for h in normed])
    with autocast():
        token_loss, grad = linear_cross_entropy_vocab_chunks(hidden, streamed.head_chunks(), torch.cat(targets),
                                                             scale, ignore_index=IGNORE_INDEX)
    sizes = [t.numel() for t in targets]
    for part, c in zip(token_loss.split(sizes), counts):
        total = float(part.sum())
        losses.append(total / c if reduction == "mean" else total)  # 0/0: nan, as the fused loss gives
    if want_grad:
        torch.autograd.backward(normed, [g.view_as(h) for g, h in zip(grad.split(sizes), normed)])
        grads = [leaf.grad for leaf in leaves]
    return losses, grads


def streamed_nll(streamed: StreamedModel, batches: list[torch.Tensor]) -> float:
    """Summed next-token loss of ``batches`` (as ``causal_lm_loss(..., reduction='sum')``), streamed."""
    batches = [ids.to(streamed.device) for ids in batches]
    hidden, calls = _capture_all(streamed, batches)
    hidden, _ = _forward_sweep(streamed, hidden, calls, contextlib.nullcontext, keep_inputs=False)
    losses, _ = _head_losses(streamed, batches, hidden, [1.0] * len(batches), False, contextlib.nullcontext, "sum")
    return sum(losses)


def streamed_calibration_pass(streamed: StreamedModel, calib_ids: torch.Tensor, opts: CalibPass, progress=None,
                              observers: tuple = (), keep_inputs: bool = False,
                              ) -> tuple[torch.Tensor | None, object, float]:
    """:func:`importance.calibration_pass` with one decoder layer resident at a time (same results: raw layer
    importances, group saliency, mean loss). ``keep_inputs`` keeps every layer's calibration inputs on
    ``streamed`` for :meth:`StreamedModel.replay` (until ``forget_inputs``)."""
    # The whole pass, the backward sweep included (autocast covers only the forwards).
    with fp32_matmul(resolve_fp32_matmul(opts.fp32_matmul, streamed.device)):
        return _streamed_pass(streamed, calib_ids, opts, progress, observers, keep_inputs)


def _streamed_pass(streamed: StreamedModel, calib_ids: torch.Tensor, opts: CalibPass, progress, observers: tuple,
                   keep_inputs: bool) -> tuple[torch.Tensor | None, object, float]:
    """The body of :func:`streamed_calibration_pass`."""
    adapter = streamed.adapter
    autocast = calib_autocast(opts.calib_dtype, streamed.device, streamed.dtype, opts.fp32_matmul,
                              seq_len=calib_ids.shape[-1])
    batches = calibration_batches(calib_ids.to(streamed.device), opts.batch_size, opts.micro_batch_size)
    sim = LayerSimilarity(adapter, opts.similarity) if opts.similarity else None
    collector = (SaliencyCollector(adapter, opts.saliency_metric, opts.aggregate, opts.mix)
                 if opts.saliency_metric else None)
    micro = [ids for batch in batches for ids in batch]
    hidden, calls = _capture_all(streamed, micro)
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
    weights = [ids.shape[0] / sum(x.shape[0] for x in batch) for batch in batches for ids in batch]
    with collector.attached() if collector is not None else contextlib.nullcontext():
        losses, grads = _head_losses(streamed, micro, hidden, weights, collector is not None, autocast)
        del hidden
        total_loss, m = 0.0, 0
        for batch in batches:
            batch_loss = 0.0
            for _ in batch:
                batch_loss += losses[m] * weights[m]
                m += 1
            total_loss += batch_loss
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
    order = list(reversed(range(len(inputs))))
    with streamed.prefetching(order):
        for j in order:
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
