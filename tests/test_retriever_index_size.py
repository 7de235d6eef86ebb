"""The generative index size reported at test time is the trie plus the narrow SID table."""

from __future__ import annotations

import lightning as L
import torch

from grcm.data.datamodules import SyntheticDataModule
from grcm.decoding import SIDTrie
from grcm.retriever.module import GenerativeRetriever
from grcm.tokenizers.bundle import SIDBundle


def test_index_bytes_per_item_is_logged_and_counts_trie_and_table(tmp_path):
    dm = SyntheticDataModule(num_items=40, feature_dim=8, eval_batch_size=20)
    dm.setup()
    index = torch.arange(40)
    codes = torch.stack([index % 5, index // 5], dim=1)  # 40 unique SIDs over vocab (5, 8)
    bundle_dir = SIDBundle(item_ids=dm.corpus.item_ids, codes=codes, vocab_sizes=[5, 8], codebooks={},
                           config={}, health={}).save(tmp_path / "bundle")
    torch.manual_seed(0)
    model = GenerativeRetriever(bundle_dir=str(bundle_dir), vocab_size=dm.vocab_size, d_model=16, num_heads=2,
                                num_encoder_layers=1, num_decoder_layers=1, ffn_dim=32, beam_size=4)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False)
    result = trainer.test(model, datamodule=dm, verbose=False)[0]
    trie_bytes = SIDTrie.from_codes(codes, [5, 8]).nbytes()
    table_bytes = 40 * 2  # two levels of at most 256 codes: one uint8 each
    assert abs(result["test/index_bytes_per_item"] - (trie_bytes + table_bytes) / 40) < 1e-5
    assert 0.0 <= result["test/recall@1"] <= 1.0
