"""ONNX Runtime inference (grcm.retriever.onnx_inference): ``onnx`` returns the float32 beams on batch sizes and
query lengths other than the export's, for both fusion blocks and through the retriever's decode path;
``onnx_int8`` really quantises and stays close to float32; a missing package is named with its install command.

Skipped where the optional ``onnxruntime`` / ``onnx`` packages are not installed (``pip install -e .[onnx]``),
except the missing-package error, which is tested everywhere.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from grcm.decoding import SIDTrie, constrained_beam_search
from grcm.retriever.cpu_inference import InferenceQuantizationError, PreparedNetwork
from grcm.retriever.incremental import make_step_fn
from grcm.retriever.model import GenerativeRetrieverModel

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py

SID_VOCABS = [6, 5, 4]
CPU = torch.device("cpu")
needs_onnxruntime = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None,
    reason="needs the optional onnxruntime and onnx packages (pip install -e .[onnx])",
)


def _model(fusion: str = "ace") -> GenerativeRetrieverModel:
    torch.manual_seed(0)
    model = GenerativeRetrieverModel(vocab_size=50, sid_vocab_sizes=SID_VOCABS, d_model=32, num_heads=4,
                                     num_encoder_layers=2, num_decoder_layers=2, ffn_dim=64, dropout=0.0,
                                     max_query_len=16, fusion=fusion)
    with torch.no_grad():  # spread the logits so that beams are far from ties
        for head in model.heads:
            head.weight.mul_(4.0)
    return model.eval()


def _trie() -> SIDTrie:
    grid = torch.cartesian_prod(*(torch.arange(v) for v in SID_VOCABS))
    codes = grid[torch.randperm(len(grid), generator=torch.Generator().manual_seed(3))[:60]]
    return SIDTrie.from_codes(codes, SID_VOCABS)


def _queries(count: int, length: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, 50, (count, length), generator=gen)
    mask = torch.arange(length)[None, :] < torch.randint(1, length + 1, (count,), generator=gen)[:, None]
    return input_ids.masked_fill(~mask, 0), mask


def _search(network, trie: SIDTrie, queries: tuple[torch.Tensor, torch.Tensor], beam: int):
    input_ids, mask = queries
    enc = network.encode(input_ids, mask)
    return constrained_beam_search(make_step_fn(network, enc, beam), input_ids.shape[0], beam, trie, SID_VOCABS)


@needs_onnxruntime
@pytest.mark.parametrize("fusion", ["ace", "none"])
def test_onnx_returns_the_float32_beams_on_other_batch_sizes_and_lengths(fusion):
    """The graphs are exported on a (2, 3) example; other batches, lengths and beam widths run on the same graphs.
    The front graph's encoder outputs and projected memory equal the torch encoder's."""
    model, trie = _model(fusion), _trie()
    prepared = PreparedNetwork()
    input_ids, mask = _queries(5, 9)
    with torch.inference_mode():
        with prepared.use(model, "onnx", CPU) as network:
            enc = network.encode(input_ids, mask)
            memory = network.project_memory(enc)
        reference_enc = model.encode(input_ids, mask)
        reference_memory = model.project_memory(reference_enc)
        for output, expected in zip(enc.layer_outputs, reference_enc.layer_outputs, strict=True):
            assert torch.allclose(output, expected, atol=1e-5)
        flat = [t for layer in memory.layers for t in layer]
        expected_flat = [t for layer in reference_memory.layers for t in layer]
        assert len(flat) == len(expected_flat)
        for output, expected in zip(flat, expected_flat):
            assert torch.allclose(output, expected, atol=1e-5)
        for count, length, beam in ((7, 5, 3), (12, 10, 4), (1, 16, 2)):
            queries = _queries(count, length)
            reference = _search(model, trie, queries, beam)
            with prepared.use(model, "onnx", CPU) as network:
                output = _search(network, trie, queries, beam)
            assert torch.equal(output.sequences, reference.sequences)
            live = torch.isfinite(reference.scores)
            assert torch.equal(live, torch.isfinite(output.scores))
            assert torch.allclose(output.scores[live], reference.scores[live], atol=1e-4)


@needs_onnxruntime
def test_onnx_int8_quantises_and_stays_close_to_float32():
    model, trie = _model(), _trie()
    queries = _queries(12, 10)
    with torch.inference_mode():
        reference = _search(model, trie, queries, 4)
        with PreparedNetwork().use(model, "onnx_int8", CPU) as network:
            enc = network.encode(*queries)
            logits, _ = network.decode_step(network.project_memory(enc), torch.zeros(12, 0, dtype=torch.long), None)
            quantised = _search(network, trie, queries, 4)
        exact, _ = model.decode_step(model.project_memory(model.encode(*queries)),
                                     torch.zeros(12, 0, dtype=torch.long), None)
    assert not torch.equal(logits, exact)  # the products did run in int8
    assert (logits - exact).abs().max() <= 0.1 * exact.abs().max()
    same_best = (quantised.sequences[:, 0] == reference.sequences[:, 0]).all(-1)
    assert same_best.float().mean() >= 0.8


@needs_onnxruntime
def test_retriever_decodes_through_the_onnx_flag(tmp_path):
    from test_cpu_inference import _retriever

    module = _retriever(tmp_path)
    input_ids, mask = _queries(9, 12)
    reference = module.decode(input_ids, mask)
    module.hparams.inference_quantization = "onnx"
    output = module.decode(input_ids, mask)
    assert torch.equal(output.sequences, reference.sequences)
    assert torch.allclose(output.scores, reference.scores, atol=1e-4)


def test_missing_onnxruntime_is_named_with_the_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "onnxruntime" else real_find_spec(name, *args))
    with pytest.raises(InferenceQuantizationError, match=r"onnxruntime.*pip install -e \.\[onnx\]"):
        with PreparedNetwork().use(_model(), "onnx", CPU):
            pass
