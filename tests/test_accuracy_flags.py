"""Accuracy-study flags: coarse gate form, pretrained MiniLM query encoder, invalid SIDs per beam rank,
synthetic generated queries (and the ``source`` column of extra_queries.csv)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grcm.data.corpus import load_corpus, save_corpus
from grcm.data.datamodules import SyntheticDataModule
from grcm.data.synthetic import generate_synthetic_corpus
from grcm.data.synthetic_queries import PERSPECTIVES, generate_synthetic_queries
from grcm.decoding.beam import BeamSearchOutput
from grcm.retriever.fusion import CoarseFusion, build_cross_block
from grcm.retriever.model import GenerativeRetrieverModel
from grcm.retriever.module import GenerativeRetriever
from grcm.tokenizers.bundle import SIDBundle

D, HEADS, S = 16, 2, 2


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


# ------------------------------------------------------------ coarse gate form
def test_coarse_gate_forms_match_their_formulas():
    torch.manual_seed(0)
    y, layers = torch.randn(2, 3, D), [torch.randn(2, 5, D) for _ in range(S)]
    printed = CoarseFusion(D, HEADS, S, dropout=0.0, gate="sigmoid").eval()
    selfgate = CoarseFusion(D, HEADS, S, dropout=0.0, gate="silu").eval()
    selfgate.load_state_dict(printed.state_dict())
    merged = printed.merge(torch.cat(layers, dim=-1))
    attended, _ = printed.attention(y, merged, merged, need_weights=False)
    torch.testing.assert_close(printed(y, layers, None), torch.sigmoid(attended) / S)
    torch.testing.assert_close(selfgate(y, layers, None), attended * torch.sigmoid(attended) / S)
    with pytest.raises(ValueError, match="coarse_gate"):
        build_cross_block("ace", D, HEADS, S, coarse_gate="tanh")


def test_model_threads_coarse_gate_to_every_decoder_layer():
    model = GenerativeRetrieverModel(30, [3, 4], d_model=D, num_heads=HEADS, num_encoder_layers=S, coarse_gate="silu")
    assert all(layer.cross.coarse.gate == "silu" for layer in model.decoder_layers)


# ------------------------------------------------------------ pretrained query encoder
@pytest.mark.parametrize("freeze", [True, False])
def test_minilm_query_encoder_keeps_pretrained_weights_and_freezes_on_request(freeze):
    from grcm.data.query_tokenizer import QueryTokenizer
    from grcm.retriever.pretrained_encoder import load_minilm

    tokenizer = QueryTokenizer.minilm()
    ids, mask = tokenizer.encode(["a dog running on a beach", "a red car"])
    model = GenerativeRetrieverModel(
        tokenizer.vocab_size, [3, 4], d_model=D, num_heads=HEADS, num_encoder_layers=S, num_decoder_layers=1,
        ffn_dim=32, query_encoder="minilm", pretrained_layers=2, freeze_query_encoder=freeze,
    ).train()
    encoder = model.pretrained_encoder
    assert len(encoder.backbone.encoder.layer) == 2 and not hasattr(model, "token_embedding")
    reference = load_minilm().embeddings.word_embeddings.weight
    torch.testing.assert_close(encoder.backbone.embeddings.word_embeddings.weight, reference)  # not re-initialised
    assert encoder.backbone.training is not freeze  # a frozen backbone stays in eval mode
    enc = model.encode(ids, mask)
    assert len(enc.layer_outputs) == S and enc.layer_outputs[0].shape == (2, ids.shape[1], D)
    assert bool((enc.layer_outputs[-1][~mask] == 0).all())
    logits = model(ids, mask, torch.tensor([[0, 1], [2, 3]]))
    sum(level.sum() for level in logits).backward()
    backbone_grad = encoder.backbone.encoder.layer[0].attention.self.query.weight.grad
    assert (backbone_grad is None) is freeze
    assert encoder.projections[0].weight.grad is not None
    with pytest.raises(ValueError, match="query_vocab=minilm"):
        GenerativeRetrieverModel(100, [3], d_model=D, num_heads=HEADS, num_encoder_layers=S, query_encoder="minilm")


# ------------------------------------------------------------ invalid SIDs per beam rank
def test_valid_sid_share_counts_every_beam_rank(tmp_path):
    codes = torch.tensor([[0, 0], [0, 1], [1, 2]])
    bundle = SIDBundle(
        item_ids=["a", "b", "c"], codes=codes, vocab_sizes=[2, 3], codebooks={}, config={}, health={}
    )
    module = GenerativeRetriever(str(bundle.save(tmp_path / "bundle")), vocab_size=10, d_model=D, num_heads=HEADS)
    sequences = torch.tensor([[[0, 1], [1, 0], [1, 2]], [[1, 2], [0, 0], [0, 2]]])  # (B=2, K=3, L=2)
    scores = torch.tensor([[-1.0, -2.0, float("-inf")], [-1.0, -2.0, -3.0]])
    share = module.valid_sid_share(BeamSearchOutput(sequences=sequences, scores=scores))
    # rank 1: both valid; rank 2: (1,0) invalid, (0,0) valid; rank 3: (1,2) has no beam (-inf), (0,2) invalid
    torch.testing.assert_close(share, torch.tensor([1.0, 0.5, 0.0]))


# ------------------------------------------------------------ synthetic generated queries
def test_synthetic_queries_are_deterministic_and_never_held_out_captions():
    corpus = generate_synthetic_corpus(60, feature_dim=16)
    items, texts = generate_synthetic_queries(corpus, per_item=4)
    again_items, again_texts = generate_synthetic_queries(corpus, per_item=4)
    assert texts == again_texts and items.tolist() == again_items.tolist()
    assert len(texts) >= 0.95 * 4 * 60 and np.bincount(items, minlength=60).max() <= 4
    held_out = {corpus.caption_text[i] for i in np.flatnonzero(corpus.caption_split != "train")}
    assert not held_out & set(texts)
    per_item = {}
    for item, text in zip(items.tolist(), texts):
        per_item.setdefault(item, []).append(text)
    assert all(len(set(queries)) == len(queries) for queries in per_item.values())
    # the first perspective names subject, action and scene: the item's subject word is in the query
    from grcm.data.synthetic import SLOT_TABLES, describe_item

    assert PERSPECTIVES[0] == ("subject", "action", "scene")
    first = per_item[7][0]
    subject = describe_item(60, 7, feature_dim=16)["subject"]
    synonyms = SLOT_TABLES["subject"].synonyms[SLOT_TABLES["subject"].names.index(subject)]
    assert any(word in first for word in synonyms)


def test_datamodule_trains_on_generated_queries_and_corpus_keeps_their_source(tmp_path):
    plain = SyntheticDataModule(num_items=40, feature_dim=16)
    plain.setup()
    dm = SyntheticDataModule(num_items=40, feature_dim=16, generated_queries_per_item=3)
    dm.setup()
    extra = len(dm.corpus.extra_text)
    assert extra > 100 and set(dm.corpus.extra_source) == {"synthetic"}
    assert len(dm.query_batches("train")) == len(plain.query_batches("train")) + extra
    assert len(dm.query_batches("test")) == len(plain.query_batches("test"))
    loaded = load_corpus(save_corpus(dm.corpus, tmp_path / "corpus"))
    assert loaded.extra_text == dm.corpus.extra_text and loaded.extra_source == dm.corpus.extra_source
    header = (tmp_path / "corpus" / "extra_queries.csv").read_text().splitlines()[0]
    assert header == "item_id,text,source"


def test_silu_gate_decodes_the_same_beams_incrementally():
    from grcm.decoding import beam_search
    from grcm.retriever.incremental import make_step_fn

    torch.manual_seed(0)
    model = GenerativeRetrieverModel(
        40, [5, 6, 4], d_model=24, num_heads=3, num_encoder_layers=3, num_decoder_layers=2, ffn_dim=48,
        coarse_gate="silu",
    ).eval()
    input_ids = torch.randint(1, 40, (3, 7))
    mask = torch.ones_like(input_ids, dtype=torch.bool)
    with torch.inference_mode():
        enc = model.encode(input_ids, mask)
        outputs = [
            beam_search(make_step_fn(model, enc, 5, incremental=flag), 3, 5, [5, 6, 4]) for flag in (False, True)
        ]
    assert torch.equal(outputs[0].sequences, outputs[1].sequences)
    torch.testing.assert_close(outputs[0].scores, outputs[1].scores, atol=1e-5, rtol=1e-5)
