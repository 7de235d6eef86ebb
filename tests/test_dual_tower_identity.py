"""``projection_init="identity"``: a dual tower that starts as its backbone's own similarity."""

import pytest
import torch

from grcm.rerank.dual_tower import DualTower


def test_identity_projections_pass_features_and_text_states_through():
    model = DualTower(vocab_size=50, feature_dim=16, embed_dim=16, text_width=16, text_heads=2,
                      projection_init="identity")
    features = torch.randn(5, 16)
    torch.testing.assert_close(model.encode_items(features), torch.nn.functional.normalize(features, dim=-1))
    torch.testing.assert_close(model.text_tower.projection.weight, torch.eye(16))
    assert model.text_tower.projection.bias.abs().max() == 0


def test_identity_projections_need_one_square_size():
    with pytest.raises(ValueError, match="projection_init='identity' needs square projections"):
        DualTower(vocab_size=50, feature_dim=24, embed_dim=16, text_width=16, text_heads=2, projection_init="identity")
