"""CPU inference options of the generative retrievers: int8 dynamic quantisation and bfloat16 weights.

``inference_quantization`` (a flag of :class:`~grcm.retriever.module.GenerativeRetriever` and
:class:`~grcm.retriever.grdr.retriever.GRDRRetriever`) chooses how the network runs while decoding:

* ``"none"``: float32, the reference;
* ``"int8"``: int8 dynamic quantisation of every linear layer (:class:`Int8DynamicLinears`): each
  weight matrix is quantised once per output channel (symmetric int8, scale ``max|w_row| / 127``),
  each activation per call (per tensor, affine uint8), and the product runs in integer arithmetic
  (``torch.ops.quantized.linear_dynamic``, fbgemm / oneDNN). The projections that the network calls
  as ``F.linear`` on slices of an attention's packed ``in_proj_weight`` are quantised too: the mode
  intercepts ``F.linear`` and looks the weight up by storage, shape and bias. Lossy;
* ``"bf16"``: a bfloat16 copy of the network (weights and activations; beam scores stay float32
  because the search casts logits to float32 before ``log_softmax``). Lossy;
* ``"onnx"``: the float32 network exported to ONNX and run by ONNX Runtime
  (:class:`~grcm.retriever.onnx_inference.OnnxNetwork`): the same beams as float32 up to rounding,
  faster on CPU. Needs the optional ``onnxruntime`` and ``onnx`` packages (``pip install -e .[onnx]``);
* ``"onnx_int8"``: the same graphs with ONNX Runtime's dynamic int8 quantisation of every weight
  product. Lossy; the same packages.

Every option but "none" is CPU only; the lossy options' accuracy cost on the demo and every option's speed
are measured by
``benchmarks/efficiency.py`` (``--candidates``) and reported in ``docs/benchmarks.md``.
The prepared network is cached against the weights' identity and version counters
(:class:`PreparedNetwork`), so training between two evaluations re-prepares it.

Everything here leaves the float32 model untouched.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from grcm.errors import InferenceQuantizationError

INFERENCE_QUANTIZATIONS = ("none", "int8", "bf16", "onnx", "onnx_int8")
"""Values of ``inference_quantization``: float32, int8 dynamic quantisation, bfloat16 weights, float32 and int8
under ONNX Runtime."""

_LINEAR_FUNCTIONS = (F.linear, torch._C._nn.linear)


def check_inference_quantization(value: str, field: str = "model.inference_quantization") -> str:
    """``value`` if it is one of :data:`INFERENCE_QUANTIZATIONS`, else :class:`InferenceQuantizationError`."""
    if value not in INFERENCE_QUANTIZATIONS:
        raise InferenceQuantizationError(
            f"{field} must be one of {list(INFERENCE_QUANTIZATIONS)}, got {value!r}; "
            "'none' decodes in float32, the others are CPU speed options ('onnx' and 'onnx_int8' need "
            "`pip install -e .[onnx]`)."
        )
    return value


def available_inference_quantizations() -> tuple[str, ...]:
    """The values of :data:`INFERENCE_QUANTIZATIONS` whose optional packages are installed here."""
    onnx_ready = all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))
    return tuple(value for value in INFERENCE_QUANTIZATIONS if onnx_ready or not value.startswith("onnx"))


def _key(weight: Tensor, bias: Tensor | None) -> tuple:
    """Identity of a weight (view) and its bias: storage address, shape, strides."""
    bias_key = None if bias is None else (bias.data_ptr(), tuple(bias.shape))
    return weight.data_ptr(), tuple(weight.shape), tuple(weight.stride()), bias_key


def _pack_int8(weight: Tensor, bias: Tensor | None) -> torch.ScriptObject:
    """Per-output-channel symmetric int8 quantisation of ``weight`` (out, in), packed for linear_dynamic."""
    weight = weight.detach().float().contiguous()
    scales = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-8).double()
    zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
    quantized = torch.quantize_per_channel(weight, scales, zero_points, 0, torch.qint8)
    return torch.ops.quantized.linear_prepack(quantized, None if bias is None else bias.detach().float())


def _linear_weights(model: nn.Module) -> list[tuple[Tensor, Tensor | None]]:
    """Every (weight, bias) pair the network passes to ``F.linear``: ``nn.Linear`` modules and the packed
    attention projections, whole and as their query / key / value thirds."""
    pairs: list[tuple[Tensor, Tensor | None]] = []
    for module in model.modules():
        if isinstance(module, nn.Linear):
            pairs.append((module.weight, module.bias))
        elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            weight, bias = module.in_proj_weight, module.in_proj_bias
            pairs.append((weight, bias))
            width = module.embed_dim
            for part in range(3):
                rows = slice(part * width, (part + 1) * width)
                pairs.append((weight[rows], None if bias is None else bias[rows]))
    return pairs


class Int8DynamicLinears(TorchFunctionMode):
    """While active, ``F.linear(x, w, b)`` with a weight of ``model`` runs as an int8 dynamic-quantised product.

    ``x`` (..., in) float32 on CPU, ``w`` (out, in), ``b`` (out,) or None -> (..., out) float32, as ``F.linear``.

    Args:
        model: the float32 network; its linear weights are quantised once, here (float32 weights kept).
        reduce_range: quantise activations to 7 bits (fbgemm's overflow guard on CPUs without VNNI).

    Inputs other than float32 CPU tensors, and weights not of ``model``, run unchanged. With the mode
    active ``nn.TransformerEncoderLayer`` takes its ordinary (non-fused) path, whose products are
    quantised as well.
    """

    def __init__(self, model: nn.Module, reduce_range: bool = False) -> None:
        super().__init__()
        self.reduce_range = reduce_range
        with torch.inference_mode(False), torch.no_grad():
            self.packed = {_key(w, b): _pack_int8(w, b) for w, b in _linear_weights(model)}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        kwargs = kwargs or {}
        if func in _LINEAR_FUNCTIONS:
            x = args[0] if args else kwargs["input"]
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            packed = self.packed.get(_key(weight, bias))
            if packed is not None and x.dtype == torch.float32 and x.device.type == "cpu":
                return torch.ops.quantized.linear_dynamic(x.contiguous(), packed, self.reduce_range)
        return func(*args, **kwargs)


def _weights_signature(model: nn.Module) -> tuple:
    """Changes whenever a parameter is replaced or updated in place (optimizer step, load_state_dict)."""
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


class PreparedNetwork:
    """The network to decode with under ``inference_quantization``, prepared once per set of weights.

    Not an ``nn.Module``: a LightningModule may hold it as an attribute without registering the copy.
    """

    def __init__(self) -> None:
        self._signature: tuple | None = None
        self._network: nn.Module | Int8Network | None = None

    @contextlib.contextmanager
    def use(self, model: nn.Module, quantization: str, device: torch.device) -> Iterator[nn.Module]:
        """Yield the network to decode with: ``model`` itself for "none", else its prepared form."""
        check_inference_quantization(quantization)
        if quantization == "none":
            yield model
            return
        if device.type != "cpu":
            raise InferenceQuantizationError(
                f"model.inference_quantization={quantization!r} is a CPU option; the model is on {device}. "
                "Set it to 'none' (on CUDA use model.decode_precision for half precision)."
            )
        signature = (quantization, _weights_signature(model))
        if self._network is None or self._signature != signature:
            self._network = prepare(model, quantization)
            self._signature = signature
        yield self._network


class Int8Network:
    """A :class:`~grcm.retriever.model.GenerativeRetrieverModel` whose every network call runs under
    :class:`Int8DynamicLinears` (the search between the calls does not pay for the mode).

    Offers what decoding calls: ``encode``, ``project_memory``, ``decode_step``, ``decode_logits``,
    ``training`` (always False) and, read through, every other attribute of the model.
    """

    training = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.mode = Int8DynamicLinears(model)

    def __getattr__(self, name: str):  # noqa: ANN204 - anything else is the model's
        return getattr(self.model, name)

    def _call(self, method: str, *args):  # noqa: ANN002, ANN202
        with self.mode:
            return getattr(self.model, method)(*args)

    def encode(self, input_ids: Tensor, attention_mask: Tensor):  # noqa: ANN201
        return self._call("encode", input_ids, attention_mask)

    def project_memory(self, enc):  # noqa: ANN001, ANN201
        return self._call("project_memory", enc)

    def decode_step(self, memory, codes: Tensor, cache):  # noqa: ANN001, ANN201
        return self._call("decode_step", memory, codes, cache)

    def decode_logits(self, enc, sid_prefix: Tensor) -> Tensor:  # noqa: ANN001
        return self._call("decode_logits", enc, sid_prefix)


def prepare(model: nn.Module, quantization: str) -> nn.Module | Int8Network:
    """The network to decode with: ``model`` ("none"), a bfloat16 copy ("bf16"), :class:`Int8Network` or,
    for "onnx" / "onnx_int8", :class:`~grcm.retriever.onnx_inference.OnnxNetwork`."""
    check_inference_quantization(quantization)
    if quantization in ("onnx", "onnx_int8"):
        from grcm.retriever.onnx_inference import OnnxNetwork  # optional dependency, imported on use

        return OnnxNetwork(model, int8=quantization == "onnx_int8")
    if quantization == "bf16":
        with torch.inference_mode(False):
            return copy.deepcopy(model).to(torch.bfloat16).eval()
    if quantization == "int8":
        return Int8Network(model)
    return model
