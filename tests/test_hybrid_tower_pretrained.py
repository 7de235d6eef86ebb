"""Hybrid tower on a pretrained text tower: the identity start (``projection_init="identity"`` with ``mean_skip``) is
the zero-shot dual tower over the mean of the item's tokens, the zero-initialised pooled branch still learns, and
``item_lr`` trains the item tower at its own rate under the shared schedule."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from grcm.data import SyntheticDataModule
from grcm.rerank.dual_tower import DualTower
from grcm.rerank.hybrid_tower import HybridTower
from grcm.rerank.pseudo_query import HybridItemEncoder

DIM = 16
PIG_DEPTH0 = {"interaction": "pig", "pseudo_tokens": 3, "interaction_layers": 0}
ROWS = [{"use_generator": False}, PIG_DEPTH0, {"interaction": "pig", "pseudo_tokens": 3}, {}]
ROW_IDS = ["attention", "pig-depth0", "pig-depth2", "pooling"]

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def data():
    """A tiny synthetic corpus with token features (items have 4 to 6 real tokens, zero-padded)."""
    torch.manual_seed(0)
    dm = SyntheticDataModule(num_items=60, feature_dim=DIM, batch_size=32, eval_batch_size=30,
                             token_features=True, noise_tokens=2)
    dm.setup("fit")
    return dm


def _tower(dm, **kwargs) -> HybridTower:
    torch.manual_seed(0)
    return HybridTower(vocab_size=dm.vocab_size, feature_dim=DIM, embed_dim=DIM, text_layers=1, text_width=DIM,
                       text_heads=2, text_ffn=32, item_width=DIM, item_heads=2, top_k=3, dropout=0.0, **kwargs)


def _mean_token_features(corpus) -> np.ndarray:
    """``(N, D)`` L2-normalised mean of each item's real tokens (what a caption-token corpus stores as features)."""
    mask = np.arange(corpus.token_features.shape[1])[None, :] < corpus.token_lengths[:, None]
    mean = (corpus.token_features * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    return (mean / np.linalg.norm(mean, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("flags", ROWS, ids=ROW_IDS)
def test_identity_start_is_the_zero_shot_dual_tower_over_the_mean_token(data, flags):
    """At step 0 the hybrid tower scores like the identity-initialised dual tower (the zero-shot row) on the mean
    of the item's tokens: same query vectors, item vectors = the normalised mean token, whatever the padding."""
    hybrid = _tower(data, projection_init="identity", mean_skip=True, **flags).eval()
    torch.manual_seed(1)
    dual = DualTower(vocab_size=data.vocab_size, feature_dim=DIM, embed_dim=DIM, text_layers=1, text_width=DIM,
                     text_heads=2, text_ffn=32, dropout=0.0, item_projection="linear",
                     projection_init="identity").eval()
    dual.text_tower.load_state_dict(hybrid.text_tower.state_dict())  # the pretrained text tower both rows share
    corpus = data.corpus
    assert len(set(corpus.token_lengths.tolist())) > 1  # padding is exercised
    queries = data.query_batches("test")
    with torch.no_grad():
        torch.testing.assert_close(hybrid.encode_queries(queries.input_ids, queries.attention_mask),
                                   dual.encode_queries(queries.input_ids, queries.attention_mask))
    mean = _mean_token_features(corpus)
    items = hybrid.encode_corpus(corpus.features, corpus.token_features, corpus.token_lengths)
    np.testing.assert_allclose(items, dual.encode_corpus(mean), atol=1e-6)
    np.testing.assert_allclose(items, mean, atol=1e-6)
    padded = corpus.token_features.copy()
    for i, n in enumerate(corpus.token_lengths):
        padded[i, n:] = 100.0  # padding never counts in the mean
    np.testing.assert_allclose(hybrid.encode_corpus(corpus.features, padded, corpus.token_lengths), items, atol=1e-6)


def test_identity_start_needs_the_mean_skip_and_a_square_map(data):
    with pytest.raises(ValueError, match="mean_skip=true"):
        _tower(data, projection_init="identity")
    with pytest.raises(ValueError, match="mean_skip=true"):
        HybridItemEncoder(DIM, embed_dim=DIM // 2, width=DIM, num_heads=2, mean_skip=True).identity_init()
    with pytest.raises(ValueError, match="item_lr"):
        _tower(data, item_lr=0.0)


def test_mean_skip_adds_a_linear_map_of_the_mean_token_to_the_gated_pooled_branch(data):
    """``normalize(W mean(real tokens) + b + g * unit pooled vector)``: against the tower without the skip (its unit
    pooled vector, same weights) and an independent mean, for a gate of 0, 1 and 2.5."""
    torch.manual_seed(0)
    encoder = HybridItemEncoder(DIM, embed_dim=12, width=DIM, num_heads=2, top_k=3, mean_skip=True).eval()
    plain = HybridItemEncoder(DIM, embed_dim=12, width=DIM, num_heads=2, top_k=3).eval()
    plain.load_state_dict({k: v for k, v in encoder.state_dict().items() if k not in ("skip.weight", "skip.bias",
                                                                                      "branch_gate")})
    tokens = torch.randn(3, 5, DIM)
    mask = torch.arange(5)[None, :] < torch.tensor([5, 2, 4])[:, None]
    means = torch.stack([tokens[b, : int(mask[b].sum())].mean(0) for b in range(3)])
    skip = means @ encoder.skip.weight.detach().T + encoder.skip.bias.detach()
    with torch.no_grad():
        pooled = plain(tokens, mask)[0]
        for gate in (0.0, 1.0, 2.5):
            encoder.branch_gate.fill_(gate)
            expected = skip + gate * pooled
            torch.testing.assert_close(encoder(tokens, mask)[0], expected / expected.norm(dim=-1, keepdim=True),
                                       atol=1e-6, rtol=0)


def _fit(model, dm, steps: int) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    return trainer


def _parameters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def _moved(before: dict[str, torch.Tensor], module: torch.nn.Module) -> float:
    return max(float((p.detach() - before[name]).abs().max()) for name, p in module.named_parameters())


def test_item_lr_trains_the_item_tower_at_its_own_rate_from_the_identity_start(data):
    """``lr`` ~ 0 with ``item_lr`` 1e-2: the text tower and the mean skip stay put while the zero-gated pooled branch
    (its gate and the attention behind it) learns, so the item vectors leave the mean token; without ``item_lr`` the item tower
    is as frozen as the text tower. Both groups follow the same warm-up + cosine schedule."""
    model = _tower(data, projection_init="identity", mean_skip=True, lr=1e-9, item_lr=1e-2, warmup_steps=2,
                   **PIG_DEPTH0)
    text, items, skip = _parameters(model.text_tower), _parameters(model.item_tower), _parameters(model.item_tower.skip)
    trainer = _fit(model, data, steps=4)
    assert _moved(text, model.text_tower) < 1e-6
    assert _moved(skip, model.item_tower.skip) < 1e-6  # the mean skip is the dual tower's projection: at lr
    assert _moved(items, model.item_tower) > 1e-3 and abs(float(model.item_tower.branch_gate)) > 1e-3
    assert float(model.item_tower.pooling.attention.query.weight.grad.abs().max()) > 0  # the branch behind it learns
    model.eval()
    corpus = data.corpus
    vectors = model.encode_corpus(corpus.features, corpus.token_features, corpus.token_lengths)
    assert np.abs(vectors - _mean_token_features(corpus)).max() > 1e-3
    groups = trainer.optimizers[0].param_groups
    assert len(groups) == 2 and groups[1]["initial_lr"] == 1e-2
    assert groups[1]["lr"] / 1e-2 == pytest.approx(groups[0]["lr"] / 1e-9)  # one schedule for both

    frozen = _tower(data, projection_init="identity", mean_skip=True, lr=1e-9, warmup_steps=2, **PIG_DEPTH0)
    items = _parameters(frozen.item_tower)
    trainer = _fit(frozen, data, steps=4)
    assert _moved(items, frozen.item_tower) < 1e-6
    assert len(trainer.optimizers[0].param_groups) == 1
