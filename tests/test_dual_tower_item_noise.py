"""``DualTower(item_feature_noise=...)``: training reads noisy item features, scaled to each feature's norm;
evaluation reads them clean; 0 keeps today's training step."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from grcm.data import SyntheticDataModule
from grcm.rerank.dual_tower import DualTower


def _model(noise: float, feature_dim: int = 16, vocab_size: int = 50) -> DualTower:
    torch.manual_seed(0)
    return DualTower(vocab_size=vocab_size, feature_dim=feature_dim, embed_dim=16, text_layers=1, text_width=16,
                     text_heads=2, text_ffn=32, item_feature_noise=noise)


def test_noise_is_scaled_to_each_feature_norm_and_drawn_afresh():
    model = _model(0.5, feature_dim=64)
    torch.manual_seed(1)
    features = torch.randn(4000, 64) * torch.linspace(0.1, 10.0, 4000)[:, None]  # rows of very different norms
    first, second = model.noisy_item_features(features), model.noisy_item_features(features)
    noise = first - features
    ratio = noise.norm(dim=1) / features.norm(dim=1)  # about 0.5 on every row, whatever its norm
    assert abs(ratio.mean().item() - 0.5) < 0.01
    assert abs(ratio[:400].mean().item() - ratio[-400:].mean().item()) < 0.02
    assert noise.mean(dim=0).abs().max().item() < 0.1 * noise.std().item()  # centred
    cosine = torch.nn.functional.cosine_similarity(noise, second - features, dim=1)
    assert cosine.abs().mean().item() < 0.2  # a new draw each call
    assert torch.equal(_model(0.0).noisy_item_features(features[:, :16]), features[:, :16])


def test_training_step_reads_noisy_features_and_evaluation_clean_ones():
    dm = SyntheticDataModule(num_items=40, feature_dim=16, batch_size=32, eval_batch_size=32)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    losses = {}
    for noise in (0.0, 0.0, 1.0):
        model = _model(noise, vocab_size=dm.vocab_size)
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.strategy.connect(model)
        model.trainer, trainer.datamodule = trainer, dm
        model.log = lambda *args, **kwargs: None
        torch.manual_seed(2)
        losses.setdefault(noise, []).append(model.training_step(batch, 0).item())
        clean = model.encode_corpus(dm.corpus.features[:5])
        model.eval()
        assert (clean == model.encode_corpus(dm.corpus.features[:5])).all()  # no noise outside training
    assert losses[0.0][0] == losses[0.0][1]  # same weights and batch, no noise: the same loss
    assert abs(losses[1.0][0] - losses[0.0][0]) > 1e-3  # the noisy features reached the loss


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_negative_or_non_finite_noise_is_refused(bad):
    with pytest.raises(ValueError, match="item_feature_noise"):
        _model(bad)
