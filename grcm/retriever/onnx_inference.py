"""ONNX Runtime inference of the generative retriever's network (``inference_quantization: onnx | onnx_int8``).

The network is exported once per set of weights (:class:`OnnxNetwork`) as ``1 + L`` ONNX graphs and run by
ONNX Runtime's CPU provider, whose kernels and per-operator overhead are leaner than eager PyTorch's on the
small matrices of a decode step (d = 128, a few hundred beam rows):

* the *front* graph: query tokens (B, T) and mask -> the S encoder layer outputs (B, T, d) and every decoder
  layer's projected cross-block memory (:meth:`~grcm.retriever.model.GenerativeRetrieverModel.project_memory`),
  i.e. the encoder and the memory projection in one call;
* one *step* graph per SID level ``l``: the B queries' memory, the previous level's codes (R,) and the cached
  self-attention keys / values (R, h, l, d/h) of every decoder layer -> the level-l logits (R, V_l) and the
  cache extended by one position (:meth:`~grcm.retriever.model.GenerativeRetrieverModel.decode_step`).

Batch size, query length and beam rows are dynamic axes. ``onnx`` runs the float32 graphs: the PyTorch
network's computation (its attention written as plain operations, :func:`_explicit_attention`, the memory
keys kept transposed), so the same beams up to float rounding (tested, and counted by
``benchmarks/efficiency.py``'s ``same_beams_as_float32``). ``onnx_int8`` additionally quantises every
weight matrix product dynamically with ONNX Runtime's quantiser (int8 weights per output channel, uint8
activations per call; products between two activations, the attention scores, stay float32): lossy, its
accuracy cost measured on the demo like the other lossy options.

Needs the optional packages ``onnxruntime`` and ``onnx`` (``pip install -e .[onnx]``); without them the
option raises :class:`~grcm.errors.InferenceQuantizationError` naming the install command,
and nothing else in grcm imports them. Only the scratch query encoder is exported (``query_encoder:
scratch``); a pretrained encoder raises the same error.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import tempfile
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from grcm.errors import InferenceQuantizationError
from grcm.retriever.encoder_output import DecoderCache, DecoderMemory, EncoderOutput
from grcm.retriever.fusion import merge_heads, split_heads
from grcm.retriever.model import GenerativeRetrieverModel

ONNX_OPSET = 17


@contextlib.contextmanager
def _explicit_attention():
    """While tracing, ``F.scaled_dot_product_attention`` as plain operations.

    ``softmax(q k^T / sqrt(d_h) + mask) v``: the exporter's own translation recomputes the scale from the
    shapes at run time, guards fully masked rows (never present here: every query has a real token and a
    decoder position attends to itself) and transposes the keys itself; these plain operations let ONNX
    Runtime cancel that transpose against the pre-transposed memory keys (:class:`OnnxNetwork`).
    """
    original = F.scaled_dot_product_attention

    def attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                  dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None) -> Tensor:
        if dropout_p or is_causal:
            raise ValueError("the exported attention has no dropout and no causal mask (evaluation decoding).")
        scale = float(query.shape[-1]) ** -0.5 if scale is None else scale
        if query.shape[-2] == 1 and attn_mask is None:  # one position (a decode step's self-attention): no
            # batch of (1 x d/h) @ (d/h x t) products, which cost more per call than the arithmetic
            weights = torch.softmax(((query * scale) * key).sum(-1), dim=-1)  # (..., t)
            return (weights.unsqueeze(-1) * value).sum(-2, keepdim=True)
        scores = torch.matmul(query * scale, key.transpose(-2, -1))
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
                else scores + attn_mask
        return torch.matmul(torch.softmax(scores, dim=-1), value)

    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _require_onnxruntime(quantization: str) -> None:
    """Raise a clear error when the optional packages of ``quantization`` are missing."""
    needed = ["onnxruntime", "onnx"]  # the exporter's graph checks and the int8 quantiser read onnx
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise InferenceQuantizationError(
            f"model.inference_quantization={quantization!r} needs the optional package(s) {missing}: "
            "install them with `pip install -e .[onnx]`, or set inference_quantization to 'int8' or 'none'."
        )


def encode_for_export(model: GenerativeRetrieverModel, input_ids: Tensor, mask: Tensor) -> EncoderOutput:
    """:meth:`GenerativeRetrieverModel.encode` of the scratch encoder written with exportable operations.

    ``nn.TransformerEncoderLayer`` runs a fused kernel in inference that the ONNX exporter cannot read, and
    its attention bakes the traced query length into reshapes; this is the same pre-LN computation
    (self-attention, then feed-forward, each on a LayerNorm of the residual stream) in plain operations.

    Args:
        input_ids: (B, T) long; mask: (B, T) bool, True = real token.

    Returns:
        :class:`EncoderOutput` with S layer outputs (B, T, d), padding positions zero.
    """
    length = input_ids.shape[1]
    x = model.token_embedding(input_ids) * model.embed_scale + model.position_embedding.weight[:length]
    keep = mask.unsqueeze(-1).to(x.dtype)  # zeroing padding by a product: one multiplication, no select
    additive = torch.zeros(mask.shape, dtype=x.dtype).masked_fill(~mask, float("-inf"))[:, None, None, :]
    outputs = []
    for layer, norm in zip(model.encoder_layers, model.encoder_norms):
        attention = layer.self_attn
        heads = attention.num_heads
        queries, keys, values = F.linear(layer.norm1(x), attention.in_proj_weight, attention.in_proj_bias).chunk(
            3, dim=-1
        )
        attended = F.scaled_dot_product_attention(
            split_heads(queries, heads), split_heads(keys, heads), split_heads(values, heads), attn_mask=additive
        )
        x = x + attention.out_proj(merge_heads(attended))
        x = x + layer.linear2(layer.activation(layer.linear1(layer.norm2(x))))
        x = x * keep
        outputs.append(norm(x) * keep)
    return EncoderOutput(layer_outputs=tuple(outputs), attention_mask=mask)


def _key_slots(per_layer: int) -> range:
    """Positions of the attention keys in a decoder layer's memory tuple: every cross block's
    ``project_memory`` returns (keys, values) pairs (:func:`~grcm.retriever.fusion.project_keys_values`)."""
    return range(0, per_layer, 2)


class _FrontGraph(nn.Module):
    """(B, T) tokens and mask -> S encoder layer outputs (B, T, d), then every decoder layer's memory tensors,
    keys transposed to (B, h, d/h, T) (the layout the attention multiplies with), values (B, h, T, d/h)."""

    def __init__(self, model: GenerativeRetrieverModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, mask: Tensor) -> tuple[Tensor, ...]:
        enc = encode_for_export(self.model, input_ids, mask)
        memory = self.model.project_memory(enc)
        keys = set(_key_slots(len(memory.layers[0])))
        flat = tuple(t.transpose(-2, -1) if i in keys else t for layer in memory.layers for i, t in enumerate(layer))
        return enc.layer_outputs + flat


class _StepGraph(nn.Module):
    """One SID level of :meth:`GenerativeRetrieverModel.decode_step` over flat tensor inputs.

    Inputs: mask (B, T) bool, codes (R,) long, the memory tensors (``per_layer`` per decoder layer), then at
    levels > 0 the cache (keys, values per decoder layer). Outputs: logits (R, V_level), then the new cache.
    """

    def __init__(self, model: GenerativeRetrieverModel, level: int, per_layer: int) -> None:
        super().__init__()
        self.model, self.level, self.per_layer = model, level, per_layer

    def forward(self, mask: Tensor, codes: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
        depth, per_layer = len(self.model.decoder_layers), self.per_layer
        keys = set(_key_slots(per_layer))  # given transposed: back to (B, h, T, d/h) (ONNX Runtime cancels the pair)
        layers = tuple(
            tuple(t.transpose(-2, -1) if j in keys else t for j, t in enumerate(tensors[i * per_layer:(i + 1) * per_layer]))
            for i in range(depth)
        )
        memory = DecoderMemory(layers=layers, attn_mask=mask[:, None, None, :])
        past = tensors[depth * per_layer:]
        cache = tuple((past[2 * i], past[2 * i + 1]) for i in range(depth)) if self.level > 0 else None
        logits, new_cache = self.model.decode_step(memory, codes[:, None], cache)
        return (logits,) + tuple(t for keys_values in new_cache for t in keys_values)


def _session_options(threads: int):  # noqa: ANN202 - onnxruntime.SessionOptions (optional import)
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads cost no CPU time
    options.log_severity_level = 3
    return options


def _quantize_int8(graph: bytes) -> bytes:
    """ONNX Runtime's dynamic int8 quantisation of the products with a constant weight (per output channel)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as folder:
        source, target = os.path.join(folder, "float32.onnx"), os.path.join(folder, "int8.onnx")
        with open(source, "wb") as handle:
            handle.write(graph)
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)  # the quantiser's advice to pre-process the graph, once per graph
        try:
            quantize_dynamic(source, target, per_channel=True, weight_type=QuantType.QInt8,
                             extra_options={"MatMulConstBOnly": True})
        finally:
            logging.disable(previous)
        with open(target, "rb") as handle:
            return handle.read()


def _export(module: nn.Module, args: tuple, inputs: list[str], outputs: list[str], axes: dict) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shapes read as Python ints
        torch.onnx.export(module, args, buffer, dynamo=False, input_names=inputs, output_names=outputs,
                          dynamic_axes=axes, opset_version=ONNX_OPSET)
    return buffer.getvalue()


class OnnxNetwork:
    """The network as ONNX Runtime sessions, offering what decoding calls (as
    :class:`~grcm.retriever.cpu_inference.Int8Network` does): ``encode``, ``project_memory``,
    ``decode_step``, ``decode_logits`` (the PyTorch model's full-recomputation path), ``training`` (False)
    and, read through, every other attribute of the model.

    Args:
        model: a :class:`GenerativeRetrieverModel` with the scratch query encoder, on CPU.
        int8: quantise the weight products (``onnx_int8``).
        threads: ONNX Runtime intra-op threads (default: ``torch.get_num_threads()``).
    """

    training = False

    def __init__(self, model: GenerativeRetrieverModel, int8: bool = False, threads: int | None = None) -> None:
        quantization = "onnx_int8" if int8 else "onnx"
        _require_onnxruntime(quantization)
        if model.pretrained_encoder is not None or not all(layer.norm_first for layer in model.encoder_layers):
            raise InferenceQuantizationError(
                f"model.inference_quantization={quantization!r} exports the scratch pre-LN query encoder only; "
                "this model has another encoder (query_encoder other than 'scratch'): use 'int8' or 'none'."
            )
        import onnxruntime

        self.model = model
        self.num_levels = model.num_levels
        options = _session_options(torch.get_num_threads() if threads is None else threads)
        depth = len(model.decoder_layers)
        heads = model.decoder_layers[0].self_attention.num_heads
        width = model.d_model // heads
        with torch.inference_mode(False), torch.no_grad(), _explicit_attention():
            ids = torch.ones(2, 3, dtype=torch.long)
            mask = torch.ones(2, 3, dtype=torch.bool)
            front = _FrontGraph(model).eval()
            example = front(ids, mask)
            self.num_encoder_outputs = len(model.encoder_layers)
            memory_names = [f"memory{i}" for i in range(len(example) - self.num_encoder_outputs)]
            self.per_layer = len(memory_names) // depth
            keys = set(_key_slots(self.per_layer))
            memory_axes = {name: {0: "B", 3 if i % self.per_layer in keys else 2: "T"}
                           for i, name in enumerate(memory_names)}
            encoder_names = [f"encoder{i}" for i in range(self.num_encoder_outputs)]
            axes = {"input_ids": {0: "B", 1: "T"}, "mask": {0: "B", 1: "T"},
                    **{name: {0: "B", 1: "T"} for name in encoder_names},
                    **memory_axes}
            sessions = [_export(front, (ids, mask), ["input_ids", "mask"], encoder_names + memory_names, axes)]
            cache_names = [f"past{i}" for i in range(2 * depth)]
            new_names = [f"cache{i}" for i in range(2 * depth)]
            for level in range(self.num_levels):
                rows = 2 if level == 0 else 4
                past = [torch.zeros(rows, heads, level, width) for _ in range(2 * depth)] if level else []
                inputs = ["mask", "codes"] + memory_names + cache_names[: len(past)]
                axes = {"mask": {0: "B", 1: "T"}, "codes": {0: "R"}, "logits": {0: "R"},
                        **memory_axes,
                        **{name: {0: "R"} for name in cache_names + new_names}}
                step = _StepGraph(model, level, self.per_layer).eval()
                codes = torch.zeros(rows, dtype=torch.long)
                sessions.append(_export(step, (mask, codes, *example[self.num_encoder_outputs:], *past),
                                        inputs, ["logits"] + new_names, axes))
        if int8:
            sessions = [_quantize_int8(graph) for graph in sessions]
        built = [onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"]) for graph in sessions]
        self.front, self.steps = built[0], built[1:]
        self.memory_names, self.cache_names = memory_names, cache_names

    def __getattr__(self, name: str):  # noqa: ANN204 - anything else is the model's
        return getattr(self.model, name)

    def encode(self, input_ids: Tensor, attention_mask: Tensor) -> EncoderOutput:
        """Encoder and memory projection in one call: an :class:`EncoderOutput` (S layer outputs (B, T, d))
        that also holds the projected memory (``projected``) for :meth:`project_memory`."""
        mask = self.model.query_mask(input_ids, attention_mask)
        outputs = self.front.run(None, {"input_ids": input_ids.long().numpy(), "mask": mask.numpy()})
        tensors = [torch.from_numpy(array) for array in outputs]
        enc = _ProjectedEncoderOutput(
            layer_outputs=tuple(tensors[: self.num_encoder_outputs]), attention_mask=mask
        )
        flat = tensors[self.num_encoder_outputs:]
        per_layer, keys = self.per_layer, set(_key_slots(self.per_layer))
        layers = tuple(  # keys come transposed: kept as (B, h, T, d/h) views of that storage
            tuple(t.transpose(-2, -1) if j in keys else t for j, t in enumerate(flat[i * per_layer:(i + 1) * per_layer]))
            for i in range(len(flat) // per_layer)
        )
        enc.projected = DecoderMemory(layers=layers, attn_mask=mask[:, None, None, :])
        return enc

    def project_memory(self, enc: EncoderOutput) -> DecoderMemory:
        """The memory :meth:`encode` projected (the PyTorch model's projection for another encoder output)."""
        projected = getattr(enc, "projected", None)
        return projected if projected is not None else self.model.project_memory(enc)

    def decode_step(self, memory: DecoderMemory, codes: Tensor, cache: DecoderCache | None) -> tuple[Tensor, DecoderCache]:
        """:meth:`GenerativeRetrieverModel.decode_step` through the level's ONNX Runtime session."""
        level = 0 if cache is None else cache[0][0].shape[2]
        feed = {"mask": memory.attn_mask[:, 0, 0, :].numpy(),
                "codes": (codes[:, -1] if level else codes.new_zeros(codes.shape[0])).long().numpy()}
        keys = set(_key_slots(self.per_layer))
        flat = [t.transpose(-2, -1) if j in keys else t for layer in memory.layers for j, t in enumerate(layer)]
        feed.update((name, tensor.contiguous().numpy()) for name, tensor in zip(self.memory_names, flat))
        if cache is not None:
            past = [t for keys_values in cache for t in keys_values]
            feed.update((name, tensor.contiguous().numpy()) for name, tensor in zip(self.cache_names, past))
        outputs = [torch.from_numpy(array) for array in self.steps[level].run(None, feed)]
        new_cache = tuple((outputs[1 + 2 * i], outputs[2 + 2 * i]) for i in range((len(outputs) - 1) // 2))
        return outputs[0], new_cache

    def decode_logits(self, enc: EncoderOutput, sid_prefix: Tensor) -> Tensor:
        """The PyTorch model's full-recomputation logits (the reference path; not exported)."""
        return self.model.decode_logits(enc, sid_prefix)


class _ProjectedEncoderOutput(EncoderOutput):
    """An :class:`EncoderOutput` that also carries its projected decoder memory (set by :meth:`OnnxNetwork.encode`)."""

    projected: DecoderMemory | None = None
