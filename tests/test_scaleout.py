"""Cluster switches: the SLURM example parses, and precision / gradient accumulation work for every module."""

from __future__ import annotations

import math
import os
import stat
import subprocess
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from grcm.cli import main
from grcm.data.datamodules import SyntheticDataModule
from grcm.rerank.dual_tower import DualTower
from grcm.rerank.index import gpu_available
from grcm.retriever.module import GenerativeRetriever
from grcm.tokenizers.bundle import SIDBundle
from grcm.tokenizers.module import ACETokenizer

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "experiments" / "slurm" / "ace_retriever.sbatch"


def _slurm_argv(tmp_path: Path, **env: str) -> list[str]:
    """The argv the SLURM script hands to srun (srun replaced by a stub that prints its arguments)."""
    stub = tmp_path / "bin" / "srun"
    stub.parent.mkdir()
    stub.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    environment = dict(os.environ, PATH=f"{stub.parent}{os.pathsep}{os.environ['PATH']}", SLURM_SUBMIT_DIR=str(ROOT),
                       SLURM_NTASKS_PER_NODE="4", SLURM_NNODES="2", SLURM_CPUS_PER_TASK="8", **env)
    result = subprocess.run(["bash", str(SLURM)], env=environment, capture_output=True, text=True, check=True)
    return result.stdout.splitlines()


def test_slurm_script_command_parses(tmp_path, monkeypatch, capsys):
    argv = _slurm_argv(tmp_path, PRECISION="16-mixed", ACCUMULATE="4", RUN_DIR=str(tmp_path / "run"))
    assert argv[:2] == ["grcm", "fit"] and "--ckpt_path=last" in argv
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit):
        main([*argv[1:], "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    trainer = config["trainer"]
    assert (trainer["num_nodes"], str(trainer["devices"]), trainer["strategy"]) == (2, "4", "ddp")
    assert (trainer["precision"], trainer["accumulate_grad_batches"]) == ("16-mixed", 4)
    assert config["ckpt_path"] == "last"
    # a requeued job leaves the resume to Lightning's pre-emption checkpoint
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "hpc_ckpt_1.ckpt").write_bytes(b"")
    (tmp_path / "bin" / "srun").unlink()
    (tmp_path / "bin").rmdir()
    assert "--ckpt_path=last" not in _slurm_argv(tmp_path, RUN_DIR=str(tmp_path / "run"))


def _fit(model: L.LightningModule, data: SyntheticDataModule, **trainer_args) -> L.Trainer:
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, max_epochs=1, num_sanity_val_steps=0, **trainer_args)
    trainer.fit(model, data)
    return trainer


def _bundle(tmp_path: Path, data: SyntheticDataModule) -> str:
    data.setup()
    index = torch.arange(data.corpus.num_items)
    bundle = SIDBundle(item_ids=data.corpus.item_ids, codes=torch.stack([index % 4, index // 4], 1),
                       vocab_sizes=[4, 10], codebooks={}, config={}, health={})
    return str(bundle.save(tmp_path / "bundle"))


@pytest.mark.parametrize("precision", ["bf16-mixed"])
def test_precision_and_accumulation_on_cpu(tmp_path, precision):
    switches = dict(accelerator="cpu", precision=precision, accumulate_grad_batches=2)
    queries = SyntheticDataModule(num_items=40, feature_dim=16, batch_size=20, eval_batch_size=40)
    retriever = GenerativeRetriever(bundle_dir=_bundle(tmp_path, queries), vocab_size=queries.vocab_size, d_model=16,
                                    num_heads=2, num_encoder_layers=1, num_decoder_layers=1, ffn_dim=32, beam_size=4)
    trainer = _fit(retriever, queries, **switches)
    assert trainer.global_step == math.ceil(trainer.num_training_batches / 2) == 5  # 200 captions / 20 / 2
    assert 0.0 <= float(trainer.callback_metrics["val/recall@10"]) <= 1.0
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))

    dual = DualTower(vocab_size=queries.vocab_size, feature_dim=16, embed_dim=16, text_layers=1, text_width=16,
                     text_heads=2, text_ffn=32)
    trainer = _fit(dual, SyntheticDataModule(num_items=40, feature_dim=16, batch_size=20, eval_batch_size=40),
                   **switches)
    assert trainer.global_step == 5 and math.isfinite(float(trainer.callback_metrics["val/recall@1"]))

    items = SyntheticDataModule(serve="items", num_items=64, feature_dim=16, batch_size=16, eval_batch_size=64)
    tokenizer = ACETokenizer(feature_dim=16, coarse_codebook_size=4, codebook_size=8, latent_dim=8,
                             hidden_dims=(16,), health_pairs=50)
    trainer = _fit(tokenizer, items, **switches)
    assert trainer.global_step == 2 and math.isfinite(float(trainer.callback_metrics["val/recon"]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_half_precision_and_faiss_on_gpu(tmp_path):
    data = SyntheticDataModule(num_items=40, feature_dim=16, batch_size=20, eval_batch_size=40)
    dual = DualTower(vocab_size=data.vocab_size, feature_dim=16, embed_dim=16, text_layers=1, text_width=16,
                     text_heads=2, text_ffn=32)
    trainer = _fit(dual, data, accelerator="gpu", devices=1, precision="16-mixed")
    assert math.isfinite(float(trainer.callback_metrics["val/recall@1"]))
    assert dual.dense_index.on_gpu == gpu_available()
    retriever = GenerativeRetriever(bundle_dir=_bundle(tmp_path, data), vocab_size=data.vocab_size, d_model=16,
                                    num_heads=2, num_encoder_layers=1, num_decoder_layers=1, ffn_dim=32, beam_size=4)
    trainer = _fit(retriever, SyntheticDataModule(num_items=40, feature_dim=16, batch_size=20, eval_batch_size=40),
                   accelerator="gpu", devices=1, precision="16-mixed")
    assert 0.0 <= float(trainer.callback_metrics["val/recall@10"]) <= 1.0
