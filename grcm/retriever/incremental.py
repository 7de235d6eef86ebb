"""Incremental decoding of SIDs inside a beam search: the step function and its speed options.

A beam search asks for the next level's logits of ``R = B * K`` beams once
per SID level (:data:`grcm.decoding.StepFn`). Recomputing the decoder over the
whole prefix at every level (:func:`full_recompute_step_fn`, the reference)
repeats work; :class:`IncrementalStep` instead

* projects the encoder memory once per query batch (the keys and values of
  every cross-attention and ACE's coarse merge ``Z = W[E_1..E_S] + b``,
  :meth:`GenerativeRetrieverModel.project_memory`), shared by the K beams of a query;
* computes only the newest position per level, attending to a cache of the
  earlier positions' self-attention keys and values
  (:meth:`GenerativeRetrieverModel.decode_step`);
* follows the beams: :meth:`IncrementalStep.reorder` gathers the cache rows of
  the parents the beam search kept (the search calls it after every level);
* computes level 0 once per query instead of once per beam (all K beams start
  from the same empty prefix) and broadcasts the logits.

Both paths give the same beams and scores (up to float rounding). Options
that change only speed: ``compile`` (``torch.compile`` of the step) and, on
CUDA, ``cuda_graphs`` (``torch.compile`` in ``reduce-overhead`` mode, which
replays the step as CUDA graphs) and half precision (:func:`decode_precision`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from grcm.decoding.beam import StepFn
from grcm.retriever.model import DecoderCache, DecoderMemory, EncoderOutput, GenerativeRetrieverModel

PRECISIONS = ("32", "16", "bf16")
"""Decoding precisions: float32, float16 autocast (CUDA), bfloat16 autocast (CUDA)."""

DecodeStep = Callable[[DecoderMemory, Tensor, "DecoderCache | None"], tuple[Tensor, DecoderCache]]

#: ``torch.compile`` of :func:`_decode_step` per (mode, backend). The model is an argument of the compiled
#: function, never part of the cached object: a cache entry that held ``model.decode_step`` (a bound method)
#: would keep its model, and everything the model holds, alive for the life of the process.
_COMPILED: dict[tuple[str, str], Callable[..., tuple[Tensor, DecoderCache]]] = {}


def _decode_step(
    model: GenerativeRetrieverModel, memory: DecoderMemory, codes: Tensor, cache: DecoderCache | None
) -> tuple[Tensor, DecoderCache]:
    """``model.decode_step(memory, codes, cache)``, with the model as an argument (what gets compiled)."""
    return model.decode_step(memory, codes, cache)


def compiled_decode_step(
    model: GenerativeRetrieverModel, cuda_graphs: bool = False, backend: str = "inductor"
) -> DecodeStep:
    """``torch.compile`` of ``model.decode_step``, compiled once per mode and backend, then reused.

    The compiled function is shared by every model (Dynamo re-specialises it for a model of another
    shape); the returned step binds ``model`` for one search and is not cached, so a model that is no
    longer used is freed (nothing here refers to it).

    Args:
        model: the network (its weights are read at call time; compiling does not copy them).
        cuda_graphs: compile in ``reduce-overhead`` mode, which captures the step as CUDA graphs and
            replays them (CUDA only; one graph per SID level and batch shape).
        backend: ``torch.compile`` backend; "inductor" generates fused kernels, "eager" only
            traces (quick to build, no speed-up: for tests).
    """
    mode = "reduce-overhead" if cuda_graphs else "default"
    key = (mode, backend)
    if key not in _COMPILED:
        if backend == "inductor":
            _COMPILED[key] = torch.compile(_decode_step, mode=mode, dynamic=False)
        else:
            _COMPILED[key] = torch.compile(_decode_step, backend=backend, dynamic=False)
    return functools.partial(_COMPILED[key], model)


class IncrementalStep:
    """Beam-search step function over a KV cache (see the module docstring).

    Args:
        model: the network, in evaluation mode (the cached path has no dropout).
        enc: encoder output of B queries.
        beam_size: K; the search passes ``B * K`` batch-major rows (row ``b*K + j`` is beam j of query b).
        step: the per-level function, ``model.decode_step`` or a compiled version of it.
        mark_cuda_graph_steps: tell CUDA-graph trees that a new step begins before each call
            (needed with ``cuda_graphs``: the previous step's outputs are then consumed).
    """

    def __init__(
        self,
        model: GenerativeRetrieverModel,
        enc: EncoderOutput,
        beam_size: int,
        step: DecodeStep | None = None,
        mark_cuda_graph_steps: bool = False,
    ) -> None:
        if model.training:
            raise ValueError(
                "incremental decoding runs without dropout: put the model in evaluation mode (model.eval()) "
                "or decode with incremental=False."
            )
        self.model = model
        self.beam_size = beam_size
        self.memory = model.project_memory(enc)
        self.step = model.decode_step if step is None else step
        self.mark_cuda_graph_steps = mark_cuda_graph_steps
        self.cache: DecoderCache | None = None

    def _run(self, codes: Tensor) -> Tensor:
        if self.mark_cuda_graph_steps:
            torch.compiler.cudagraph_mark_step_begin()
        logits, cache = self.step(self.memory, codes, self.cache)
        if self.mark_cuda_graph_steps:  # graph outputs are overwritten by the next replay: own them
            logits = logits.clone()
            cache = tuple((keys.clone(), values.clone()) for keys, values in cache)
        self.cache = cache
        return logits

    def __call__(self, prefix: Tensor) -> Tensor:
        """``prefix`` (B*K, t) -> (B*K, V_t) logits; reads only the last column (the cache holds the rest)."""
        rows, level = prefix.shape
        batch = self.memory.batch_size
        if rows != batch * self.beam_size:
            raise ValueError(
                f"IncrementalStep was built for {batch} queries x {self.beam_size} beams but got {rows} rows."
            )
        cached = 0 if self.cache is None else self.cache[0][0].shape[2]
        if cached != level:
            raise ValueError(f"IncrementalStep holds {cached} decoded positions but the prefix has {level}.")
        if level == 0:  # every beam of a query starts from the same empty prefix
            logits = self._run(prefix[:batch])
            return logits.repeat_interleave(self.beam_size, dim=0)
        return self._run(prefix[:, -1:])

    def reorder(self, rows: Tensor) -> None:
        """Follow the beams: new row r continues old row ``rows[r]``; ``rows`` (B*K,) long."""
        if self.cache is None:
            return
        if self.cache[0][0].shape[0] != rows.shape[0]:  # level 0 was computed once per query
            rows = rows // self.beam_size
        self.cache = tuple((keys.index_select(0, rows), values.index_select(0, rows)) for keys, values in self.cache)


def full_recompute_step_fn(model: GenerativeRetrieverModel, enc: EncoderOutput) -> StepFn:
    """The reference step function: the whole decoder over the whole prefix at every level."""
    return lambda prefix: model.decode_logits(enc, prefix)


def make_step_fn(
    model: GenerativeRetrieverModel,
    enc: EncoderOutput,
    beam_size: int,
    incremental: bool = True,
    compile: bool = False,
    cuda_graphs: bool = False,
    compile_backend: str = "inductor",
) -> StepFn:
    """The step function a beam search over ``model`` uses.

    Args:
        model: the network (evaluation mode for ``incremental``).
        enc: encoder output of the B queries.
        beam_size: K.
        incremental: KV-cached decoding (:class:`IncrementalStep`); False recomputes the full prefix
            every level (the reference).
        compile: ``torch.compile`` the incremental step.
        cuda_graphs: replay the incremental step as CUDA graphs (CUDA only; implies compiling).
        compile_backend: ``torch.compile`` backend for ``compile`` (see :func:`compiled_decode_step`).
    """
    if not incremental:
        if compile or cuda_graphs:
            raise ValueError("compile and cuda_graphs apply to incremental decoding; set incremental=True.")
        return full_recompute_step_fn(model, enc)
    if cuda_graphs and enc.attention_mask.device.type != "cuda":
        raise ValueError(
            f"cuda_graphs needs the model on a CUDA device, it is on {enc.attention_mask.device}; "
            "unset cuda_graphs."
        )
    step = compiled_decode_step(model, cuda_graphs, compile_backend) if (compile or cuda_graphs) else None
    return IncrementalStep(model, enc, beam_size, step=step, mark_cuda_graph_steps=cuda_graphs)


@contextlib.contextmanager
def decode_precision(precision: str, device: torch.device) -> Iterator[None]:
    """Autocast for decoding: ``"32"`` (no change), ``"16"`` or ``"bf16"`` (CUDA only).

    Beam scores stay float32 either way: the search casts logits to float32 before ``log_softmax``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"decode precision must be one of {PRECISIONS}, got {precision!r}.")
    if precision == "32":
        yield
        return
    if device.type != "cuda":
        raise ValueError(
            f"decode precision {precision!r} is for CUDA devices; the model is on {device}. Use precision '32'."
        )
    dtype = torch.float16 if precision == "16" else torch.bfloat16
    with torch.autocast(device_type="cuda", dtype=dtype):
        yield
