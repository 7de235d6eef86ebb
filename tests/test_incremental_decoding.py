"""Incremental (KV-cached) decoding gives the beams and scores of full recomputation."""

from __future__ import annotations

import gc
import os
import weakref

import pytest
import torch

from grcm.decoding import SIDTrie, beam_search, constrained_beam_search
from grcm.retriever.incremental import IncrementalStep, decode_precision, make_step_fn
from grcm.retriever.model import GenerativeRetrieverModel

SID_VOCABS = [6, 5, 4, 7]
NUM_QUERIES = 5


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


def _model(fusion: str, seed: int = 0, num_decoder_layers: int = 2) -> GenerativeRetrieverModel:
    torch.manual_seed(seed)
    model = GenerativeRetrieverModel(
        vocab_size=40, sid_vocab_sizes=SID_VOCABS, d_model=24, num_heads=3, num_encoder_layers=3,
        num_decoder_layers=num_decoder_layers, ffn_dim=48, dropout=0.1, fusion=fusion, max_query_len=12,
    )
    with torch.no_grad():  # spread the logits so that beams are far from ties
        for head in model.heads:
            head.weight.mul_(4.0)
    return model.eval()


def _queries(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, 40, (NUM_QUERIES, 9), generator=gen)
    lengths = torch.tensor([9, 3, 6, 1, 8])  # uneven padding
    attention_mask = torch.arange(9)[None, :] < lengths[:, None]
    return input_ids.masked_fill(~attention_mask, 0), attention_mask


def _uneven_trie(seed: int = 2) -> SIDTrie:
    """Fewer than 50 SIDs whose nodes have 1..all children: a full leaf level, a dense subtree, single paths."""
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.tensor([0, 0, 0, c]) for c in range(7)]  # one full leaf level
    rows += [torch.tensor([1, b, c, 0]) for b in range(5) for c in range(4)]  # a dense subtree
    rows += [torch.stack([torch.randint(0, v, (), generator=gen) for v in SID_VOCABS]) for _ in range(15)]
    codes = torch.unique(torch.stack(rows), dim=0)
    return SIDTrie.from_codes(codes, SID_VOCABS)


def _search(model, beam_size, incremental, trie=None, **options):
    input_ids, attention_mask = _queries()
    with torch.inference_mode():
        enc = model.encode(input_ids, attention_mask)
        step_fn = make_step_fn(model, enc, beam_size, incremental=incremental, **options)
        if trie is None:
            return beam_search(step_fn, NUM_QUERIES, beam_size, SID_VOCABS)
        return constrained_beam_search(step_fn, NUM_QUERIES, beam_size, trie, SID_VOCABS)


def _assert_same(reference, output):
    assert torch.equal(reference.sequences, output.sequences)
    finite = torch.isfinite(reference.scores)
    assert torch.equal(finite, torch.isfinite(output.scores))
    assert torch.allclose(reference.scores[finite], output.scores[finite], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fusion", ["ace", "none"])
@pytest.mark.parametrize("beam_size", [1, 5, 50])
def test_incremental_equals_full_recomputation_under_an_uneven_trie(fusion, beam_size):
    model, trie = _model(fusion), _uneven_trie()
    reference = _search(model, beam_size, incremental=False, trie=trie)
    output = _search(model, beam_size, incremental=True, trie=trie)
    _assert_same(reference, output)
    if beam_size == 50:  # more beams than valid SIDs: the -inf beams must agree too
        assert not torch.isfinite(reference.scores).all()


@pytest.mark.parametrize("fusion", ["ace", "none"])
def test_incremental_equals_full_recomputation_unconstrained(fusion):
    model = _model(fusion, seed=3)
    _assert_same(_search(model, 5, incremental=False), _search(model, 5, incremental=True))


@pytest.mark.parametrize("fusion", ["ace", "none"])
def test_decode_step_equals_decode_logits_on_every_prefix(fusion):
    model = _model(fusion, seed=4)
    input_ids, attention_mask = _queries()
    prefix = torch.stack([torch.randint(0, v, (2 * NUM_QUERIES,)) for v in SID_VOCABS], dim=1)
    with torch.inference_mode():
        enc = model.encode(input_ids, attention_mask)
        memory, cache = model.project_memory(enc), None
        for level in range(len(SID_VOCABS)):
            codes = prefix[:, level - 1 : level] if level else prefix[:, :0]
            logits, cache = model.decode_step(memory, codes, cache)
            expected = model.decode_logits(enc, prefix[:, :level])  # 2 rows per query, batch-major
            torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_cache_follows_the_beams():
    """Reordering the cache equals decoding the reordered prefixes from scratch."""
    model = _model("ace", seed=5)
    input_ids, attention_mask = _queries()
    beams = 3
    rows = NUM_QUERIES * beams
    prefix = torch.stack([torch.randint(0, v, (rows,)) for v in SID_VOCABS[:2]], dim=1)
    with torch.inference_mode():
        enc = model.encode(input_ids, attention_mask)
        step = IncrementalStep(model, enc, beams)
        step(prefix[:, :0])
        step.reorder(torch.arange(rows))
        step(prefix[:, :1])
        parents = (torch.arange(rows) // beams) * beams + torch.randint(0, beams, (rows,))  # within each query
        step.reorder(parents)
        moved = torch.cat([prefix[parents, :1], prefix[:, 1:2]], dim=1)  # parent's code, then a new one
        torch.testing.assert_close(step(moved), model.decode_logits(enc, moved), atol=1e-5, rtol=1e-5)


def test_incremental_step_refuses_training_mode_and_mismatched_rows():
    model = _model("ace")
    input_ids, attention_mask = _queries()
    enc = model.encode(input_ids, attention_mask)
    with pytest.raises(ValueError, match="evaluation mode"):
        IncrementalStep(model.train(), enc, 5)
    model.eval()
    with pytest.raises(ValueError, match="5 queries x 5 beams"):
        IncrementalStep(model, enc, 5)(torch.zeros(10, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="incremental=True"):
        make_step_fn(model, enc, 5, incremental=False, compile=True)
    with pytest.raises(ValueError, match="CUDA"):
        make_step_fn(model, enc, 5, cuda_graphs=True)
    with pytest.raises(ValueError, match="CUDA"), decode_precision("16", torch.device("cpu")):
        pass


def test_traced_step_changes_nothing():
    """Dynamo traces the step into graphs (backend "eager": no code generation, seconds)."""
    model = _model("ace", seed=6, num_decoder_layers=1)
    trie = _uneven_trie()
    reference = _search(model, 5, incremental=False, trie=trie)
    _assert_same(reference, _search(model, 5, incremental=True, trie=trie, compile=True, compile_backend="eager"))


def test_a_compiled_step_does_not_keep_its_model_alive():
    """The compiled-step cache holds no reference to a model: once unused, the model is freed."""
    model = _model("ace", seed=7, num_decoder_layers=1)
    reference = _search(model, 5, incremental=False, trie=_uneven_trie())
    _assert_same(reference, _search(model, 5, incremental=True, trie=_uneven_trie(), compile=True,
                                    compile_backend="eager"))
    freed = weakref.ref(model)
    del model
    gc.collect()
    assert freed() is None, "a compiled decode step keeps its model (and all it holds) alive"


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("GRCM_SLOW_TESTS") != "1", reason="inductor compilation takes minutes on 2 cores")
def test_compiled_step_changes_nothing_but_speed():
    model = _model("ace", seed=6, num_decoder_layers=1)
    trie = _uneven_trie()
    reference = _search(model, 5, incremental=False, trie=trie)
    _assert_same(reference, _search(model, 5, incremental=True, trie=trie, compile=True))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cuda_search(model, beam_size, trie, precision="32", **options):
    input_ids, attention_mask = (t.cuda() for t in _queries())
    with torch.inference_mode(), decode_precision(precision, torch.device("cuda")):
        enc = model.encode(input_ids, attention_mask)
        step_fn = make_step_fn(model, enc, beam_size, **options)
        return constrained_beam_search(step_fn, NUM_QUERIES, beam_size, trie, SID_VOCABS)


@cuda
@pytest.mark.parametrize("fusion", ["ace", "none"])
def test_cuda_graphs_change_nothing_but_speed(fusion):
    model, trie = _model(fusion).cuda(), _uneven_trie().to("cuda")
    reference = _cuda_search(model, 5, trie, incremental=False)
    for _ in range(3):  # capture, then replays
        _assert_same(reference, _cuda_search(model, 5, trie, cuda_graphs=True))


@cuda
@pytest.mark.parametrize("precision", ["16", "bf16"])
def test_half_precision_keeps_the_beams(precision):
    model, trie = _model("ace").cuda(), _uneven_trie().to("cuda")
    reference = _cuda_search(model, 5, trie, incremental=False)
    output = _cuda_search(model, 5, trie, precision=precision)
    assert torch.equal(reference.sequences, output.sequences)
    finite = torch.isfinite(reference.scores)
    tolerance = 5e-2 if precision == "bf16" else 1e-2
    assert torch.allclose(reference.scores[finite], output.scores[finite], atol=tolerance, rtol=tolerance)
