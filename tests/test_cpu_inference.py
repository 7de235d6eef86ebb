"""CPU inference options (grcm.retriever.cpu_inference): int8 beams close to float32's, the flag's validation,
re-preparation after a weight change, and the hook in the retrievers' decode path (CPU, and CUDA where present).

Tolerance of the int8 (and bf16) path on the tiny model below: every beam's score (sum of the 3 levels'
log-probabilities) is within 0.5 nats of float32's score of the same SID; at least 80% of the queries keep
float32's best beam and the others' best beam scores (in float32) within 0.5 nats of float32's best (a near tie).
Seen on four seeds: at most 0.40 nats (int8) and 0.21 (bf16), 83-100% identical best beams.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from grcm.decoding import SIDTrie, constrained_beam_search
from grcm.retriever.cpu_inference import (
    InferenceQuantizationError,
    Int8DynamicLinears,
    PreparedNetwork,
    check_inference_quantization,
)
from grcm.retriever.incremental import make_step_fn
from grcm.retriever.model import GenerativeRetrieverModel
from grcm.retriever.module import GenerativeRetriever
from grcm.retriever.sid_retrieval import RetrieverConfigError
from grcm.tokenizers.bundle import SIDBundle

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py

SID_VOCABS = [6, 5, 4]
SCORE_TOLERANCE = 0.5  # nats, per beam (sum over 3 levels)
SAME_BEST_SHARE = 0.8
CPU = torch.device("cpu")


def _model(seed: int = 0) -> GenerativeRetrieverModel:
    torch.manual_seed(seed)
    model = GenerativeRetrieverModel(vocab_size=50, sid_vocab_sizes=SID_VOCABS, d_model=32, num_heads=4,
                                     num_encoder_layers=2, num_decoder_layers=2, ffn_dim=64, dropout=0.0,
                                     max_query_len=16)
    with torch.no_grad():  # spread the logits so that beams are far from ties
        for head in model.heads:
            head.weight.mul_(4.0)
    return model.eval()


def _codes() -> torch.Tensor:
    grid = torch.cartesian_prod(*(torch.arange(v) for v in SID_VOCABS))
    return grid[torch.randperm(len(grid), generator=torch.Generator().manual_seed(3))[:60]]


def _queries(count: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, 50, (count, 10), generator=gen)
    mask = torch.arange(10)[None, :] < torch.randint(1, 11, (count,), generator=gen)[:, None]
    return input_ids.masked_fill(~mask, 0), mask


def _search(network, trie: SIDTrie, beam: int = 4):
    input_ids, mask = _queries()
    enc = network.encode(input_ids, mask)
    return constrained_beam_search(make_step_fn(network, enc, beam), input_ids.shape[0], beam, trie, SID_VOCABS)


def _float32_scores(model: GenerativeRetrieverModel, sequences: torch.Tensor) -> torch.Tensor:
    """Float32 score of each beam's SID (teacher-forced sum of the levels' log-probabilities), (B, K)."""
    input_ids, mask = _queries()
    rows, beams, levels = sequences.shape
    logits = model(input_ids.repeat_interleave(beams, 0), mask.repeat_interleave(beams, 0),
                   sequences.reshape(rows * beams, levels))
    flat = sequences.reshape(rows * beams, levels)
    scores = sum(F.log_softmax(level, -1).gather(1, flat[:, [i]])[:, 0] for i, level in enumerate(logits))
    return scores.reshape(rows, beams)


def _assert_close(output, reference, float32_scores: torch.Tensor) -> None:
    """``output``'s beams against the float32 search ``reference``; ``float32_scores``: float32 scores of its SIDs."""
    assert (output.scores - float32_scores).abs().max() <= SCORE_TOLERANCE
    same_best = (output.sequences[:, 0] == reference.sequences[:, 0]).all(-1)
    assert same_best.float().mean() >= SAME_BEST_SHARE
    assert (reference.scores[:, 0] - float32_scores[:, 0]).abs().max() <= SCORE_TOLERANCE


def test_int8_beams_are_close_to_float32_and_really_quantised():
    model, trie = _model(), SIDTrie.from_codes(_codes(), SID_VOCABS)
    with torch.inference_mode():
        reference = _search(model, trie)
        with PreparedNetwork().use(model, "int8", CPU) as network:
            quantised = _search(network, trie)
        float32_of_int8_beams = _float32_scores(model, quantised.sequences)
    _assert_close(quantised, reference, float32_of_int8_beams)
    assert not torch.equal(quantised.scores, reference.scores)  # the products did run in int8


def test_int8_mode_covers_attention_projection_slices_and_leaves_other_weights_alone():
    model = _model()
    attention = model.decoder_layers[0].self_attention
    width = attention.embed_dim
    keys_weight, keys_bias = attention.in_proj_weight[width:2 * width], attention.in_proj_bias[width:2 * width]
    x = torch.randn(7, width)
    foreign = torch.randn(width, width)
    with torch.inference_mode():
        exact = F.linear(x, keys_weight, keys_bias)
        with Int8DynamicLinears(model):
            quantised = F.linear(x, keys_weight, keys_bias)
            untouched = F.linear(x, foreign)
    assert not torch.equal(quantised, exact)
    assert (quantised - exact).abs().max() <= 0.05 * exact.abs().max()
    assert torch.equal(untouched, F.linear(x, foreign))


def test_bf16_beams_are_close_to_float32():
    model, trie = _model(), SIDTrie.from_codes(_codes(), SID_VOCABS)
    with torch.inference_mode():
        reference = _search(model, trie)
        with PreparedNetwork().use(model, "bf16", CPU) as network:
            half = _search(network, trie)
        float32_of_bf16_beams = _float32_scores(model, half.sequences)
    _assert_close(half, reference, float32_of_bf16_beams)


def test_prepared_network_follows_weight_updates():
    """An in-place update (an optimizer step) between two decodes re-quantises the weights."""
    model, trie = _model(), SIDTrie.from_codes(_codes(), SID_VOCABS)
    prepared = PreparedNetwork()
    with torch.inference_mode():
        with prepared.use(model, "int8", CPU) as network:
            before = _search(network, trie)
    with torch.no_grad():
        model.heads[0].weight.mul_(-1.0)  # level 0's ranking reverses
    with torch.inference_mode():
        with prepared.use(model, "int8", CPU) as network:
            after = _search(network, trie)
        with PreparedNetwork().use(model, "int8", CPU) as network:
            fresh = _search(network, trie)
    assert torch.equal(after.sequences, fresh.sequences)
    assert not torch.equal(after.sequences[:, 0, 0], before.sequences[:, 0, 0])


@pytest.mark.parametrize("value", ["fp16", "INT8", "", "float32"])
def test_bad_values_are_refused_with_the_field_and_the_choices(value):
    with pytest.raises(InferenceQuantizationError, match=r"model\.inference_quantization.*'none', 'int8', 'bf16'"):
        check_inference_quantization(value)


def _retriever(tmp_path, **options) -> GenerativeRetriever:
    codes = _codes()
    bundle = SIDBundle(item_ids=[f"item{i}" for i in range(len(codes))], codes=codes, vocab_sizes=SID_VOCABS,
                       codebooks={}, config={}, health={}).save(tmp_path / "bundle")
    torch.manual_seed(0)
    return GenerativeRetriever(bundle_dir=str(bundle), vocab_size=50, d_model=32, num_heads=4, num_encoder_layers=2,
                               num_decoder_layers=2, ffn_dim=64, dropout=0.0, max_query_len=16, beam_size=4,
                               **options)


def test_retriever_flag_validates_and_combinations_are_refused(tmp_path):
    with pytest.raises(InferenceQuantizationError, match="model.inference_quantization"):
        _retriever(tmp_path, inference_quantization="int4")
    with pytest.raises(RetrieverConfigError, match="compile_decoder"):
        _retriever(tmp_path, inference_quantization="int8", compile_decoder=True)


def test_retriever_decodes_through_the_flag(tmp_path):
    """The LightningModule's decode path uses the flag: int8 beams close to float32, float32 untouched."""
    module = _retriever(tmp_path)
    input_ids, mask = _queries()
    reference = module.decode(input_ids, mask)
    module.hparams.inference_quantization = "int8"
    quantised = module.decode(input_ids, mask)
    module.hparams.inference_quantization = "none"
    assert torch.equal(module.decode(input_ids, mask).scores, reference.scores)
    assert not torch.equal(quantised.scores, reference.scores)
    same_sid = (quantised.sequences[:, :, None, :] == reference.sequences[:, None, :, :]).all(-1)  # (B, K, K)
    paired = (quantised.scores[:, :, None] - reference.scores[:, None, :]).abs()[same_sid]
    assert paired.numel() >= quantised.scores.numel() // 2 and paired.max() <= SCORE_TOLERANCE


def test_quantisation_is_refused_on_cuda_devices_before_any_work():
    with pytest.raises(InferenceQuantizationError, match="CPU option"):
        with PreparedNetwork().use(_model(), "int8", torch.device("cuda")):
            pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_decoding_with_the_default_flag_matches_cpu(tmp_path):
    """GPU throughput path: the default (float32) flag decodes on CUDA with the CPU's beams."""
    module = _retriever(tmp_path)
    input_ids, mask = _queries()
    cpu = module.decode(input_ids, mask)
    module = module.cuda()
    gpu = module.decode(input_ids.cuda(), mask.cuda())
    assert torch.equal(gpu.sequences.cpu()[:, 0], cpu.sequences[:, 0])
    assert torch.allclose(gpu.scores.cpu(), cpu.scores, atol=1e-3)
