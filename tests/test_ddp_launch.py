"""Real two-process DDP on CPU (gloo), launched as users launch: torchrun and Lightning's own launcher.

One tiny pipeline (97 items, so the last evaluation shard is padded with a repeated query):

1. ``python -m grcm fit --trainer.strategy=ddp --trainer.devices=2`` (Lightning launches the second
   process) the dual tower,
2. ``torchrun --standalone --nproc_per_node=2 -m grcm fit`` the ACE tokenizer (K-Means init + dead-code
   restarts),
3. docs/scale-out.md's ``torchrun`` command for the generative retriever on that bundle, with tiny sizes
   appended, evaluated two-stage with the dual tower.

Every run carries :class:`grcm.ddp.ReplicaConsistencyCheck`, which compares the two replicas' parameters,
buffers and optimizer state at every epoch start and at the end. The tests then compare with one process.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
import yaml

from grcm.cli import main
from grcm.data.datamodules import SyntheticDataModule
from grcm.rerank.dual_tower import DualTower
from grcm.rerank.index import DenseIndex
from grcm.rerank.two_stage import TwoStageEvaluation
from grcm.retriever.module import GenerativeRetriever
from grcm.tokenizers.bundle import SIDBundle

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments" / "synthetic"
DATA = ["--data.init_args.num_items=97", "--data.init_args.feature_dim=32", "--data.init_args.eval_batch_size=25"]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.max_epochs=2"]
DDP = ["--trainer.strategy=ddp", "--trainer.devices=2"]
TOKENIZER = [
    "-c", str(EXPERIMENTS / "ace_tokenizer.yaml"), *DATA, *QUIET, "--data.init_args.batch_size=16",
    "--model.init_args.coarse_codebook_size=8", "--model.init_args.codebook_size=16",
    "--model.init_args.latent_dim=8", "--model.init_args.hidden_dims=[32,16]",
    "--model.init_args.dead_code_min_usage=4", "--model.init_args.health_pairs=200",
]
DUAL_TOWER = [
    "-c", str(EXPERIMENTS / "dual_tower.yaml"), *DATA, *QUIET, "--model.init_args.embed_dim=16",
    "--model.init_args.text_width=16", "--model.init_args.text_layers=1", "--model.init_args.text_ffn=32",
    "--model.init_args.warmup_steps=2", "--model.init_args.dropout=0.0",
    "--model.init_args.index_path=runs/synthetic/dual_tower/index.faiss",
]
RETRIEVER = [  # appended to docs/scale-out.md's command, which names the config
    *DATA, *QUIET, "--data.init_args.batch_size=16",
    "--trainer.check_val_every_n_epoch=1", "--model.init_args.d_model=16", "--model.init_args.num_heads=2",
    "--model.init_args.num_encoder_layers=1", "--model.init_args.num_decoder_layers=1",
    "--model.init_args.ffn_dim=32", "--model.init_args.beam_size=5", "--model.init_args.restart_period=1",
]
DENSE_CHECKPOINT = "runs/synthetic/dual_tower/checkpoints/last.ckpt"
TWO_STAGE = [
    "--trainer.callbacks+=grcm.rerank.two_stage.TwoStageEvaluation",
    f"--trainer.callbacks.dense_checkpoint={DENSE_CHECKPOINT}", "--trainer.callbacks.beam_size=5",
]


def _replica_check(out: str) -> list[str]:
    return ["--trainer.callbacks+=grcm.ddp.ReplicaConsistencyCheck", f"--trainer.callbacks.out={out}"]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("MASTER_PORT", None)  # Lightning's launcher picks a free port
    return env


def _launch(command: list[str], cwd: Path) -> None:
    result = subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "grcm", *args]


def _metrics(run_dir: Path) -> dict[str, float]:
    """The last logged value of every metric in a run's CSV log."""
    (path,) = run_dir.glob("logs/version_*/metrics.csv")
    last: dict[str, float] = {}
    for row in csv.DictReader(path.open()):
        last.update({key: float(value) for key, value in row.items() if value not in ("", None)})
    return last


def _readme_torchrun() -> list[str]:
    """docs/scale-out.md's torchrun command for the retriever, as written (torchrun run as
    ``python -m torch.distributed.run``)."""
    lines = [line.strip() for line in (ROOT / "docs" / "scale-out.md").read_text().splitlines()]
    (command,) = [line for line in lines if line.startswith("torchrun ") and "ace_retriever" in line]
    argv = shlex.split(command)
    config = argv.index("-c") + 1
    argv[config] = str(ROOT / argv[config])  # the docs run from the project root
    return [sys.executable, "-m", "torch.distributed.run", *argv[1:]]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    lightning_launcher = [sys.executable, "-m", "grcm", "fit"]
    _launch([*lightning_launcher, *DUAL_TOWER, *DDP, "--data.init_args.batch_size=16", *_replica_check("dual.json")],
            root)
    _launch(_torchrun("fit", *TOKENIZER, *DDP, *_replica_check("tokenizer.json")), root)
    # docs/scale-out.md's command, with tiny sizes appended (later overrides win)
    _launch([*_readme_torchrun(), *RETRIEVER, *_replica_check("retriever.json"), *TWO_STAGE], root)
    return root


def _assert_replicas_identical(path: Path, epochs: int = 2) -> list[dict]:
    records = json.loads(path.read_text())
    assert [r["when"] for r in records] == ["epoch_start"] * epochs + ["train_end"]
    assert all(r["world_size"] == 2 and r["mismatched"] == [] for r in records), records
    return records


def _no_partial_files(directory: Path) -> None:
    leftovers = [p for p in directory.rglob("*") if p.name.endswith(".tmp") or ".old-" in p.name]
    assert not leftovers, leftovers


def test_tokenizer_kmeans_and_restarts_identical_on_both_ranks(ddp_runs, tmp_path, monkeypatch):
    records = _assert_replicas_identical(ddp_runs / "tokenizer.json")
    run = ddp_runs / "runs/synthetic/ace_tokenizer"
    metrics = _metrics(run)
    # dead-code restarts ran (and were broadcast: the replicas above stayed identical)
    restarted = [row for row in csv.DictReader(next(run.glob("logs/version_*/metrics.csv")).open())
                 if float(row.get("sid/level1_restarted") or 0) + float(row.get("sid/level2_restarted") or 0) > 0]
    assert restarted, "the tiny config must exercise dead-code restarts"
    bundle = SIDBundle.load(run / "bundle")  # written once, by rank 0, atomically
    assert bundle.num_items == 97
    assert (run / "checkpoints" / "last.ckpt").is_file()
    _no_partial_files(run)

    # one process, same config and the ranks' thread count (rank 0 fits K-Means on every item's features, so
    # the layout does not enter): identical K-Means initialisation; training then differs by summation order
    _launch([sys.executable, "-m", "grcm", "fit", *TOKENIZER, "--data.init_args.batch_size=32",  # global batch
             *_replica_check("single.json")], tmp_path)
    single = json.loads((tmp_path / "single.json").read_text())
    assert single[0]["fingerprint"] == records[0]["fingerprint"], "K-Means init under DDP differs from one process"
    single_metrics = _metrics(tmp_path / "runs/synthetic/ace_tokenizer")
    # same global batch (2 x 16 vs 32) and the same samples per step: equal up to float summation order
    assert metrics["val/recon"] == pytest.approx(single_metrics["val/recon"], rel=0.02)
    assert abs(metrics["sid/collision_rate"] - single_metrics["sid/collision_rate"]) <= 0.03


def _vocabulary_of(config: Path) -> dict:
    """The query-vocabulary arguments of a config's data module."""
    data = yaml.safe_load(config.read_text())["data"]["init_args"]
    return {key: data[key] for key in ("query_vocab", "wordpiece_vocab_size", "compact_vocab_size") if key in data}


def _validate(model: L.LightningModule, callbacks=(), ckpt_path=None, **data_args) -> dict[str, float]:
    """One-process validation on the launches' corpus (``data_args``: e.g. the config's query vocabulary;
    ``ckpt_path``: restore the data module's state, a trained vocabulary, from that checkpoint)."""
    data = SyntheticDataModule(num_items=97, feature_dim=32, eval_batch_size=25, max_val_queries=500, **data_args)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=list(callbacks))
    metrics = trainer.validate(model, data, verbose=False, ckpt_path=ckpt_path)[0]
    return {key: float(value) for key, value in metrics.items()}


def test_dual_tower_ddp_eval_equals_one_process_and_training_matches(ddp_runs, tmp_path, monkeypatch):
    _assert_replicas_identical(ddp_runs / "dual.json")
    run = ddp_runs / "runs/synthetic/dual_tower"
    _no_partial_files(run)
    ddp = _metrics(run)
    model = DualTower.load_from_checkpoint(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    single_eval = _validate(model, **_vocabulary_of(EXPERIMENTS / "dual_tower.yaml"))
    # the FAISS index rank 0 wrote is the index of the final item tower
    index = DenseIndex.load(run / "index.faiss")
    data = SyntheticDataModule(num_items=97, feature_dim=32)
    data.setup()
    items = model.eval().encode_corpus(data.corpus.features)
    assert index.num_items == 97
    assert index.search(items[:5], 1)[1][:, 0].tolist() == [0, 1, 2, 3, 4]  # each item finds itself
    # two ranks vs one process (other batch shapes and threads): a near-tie of one query of 97 may flip
    for name in ("val/recall@1", "val/recall@5", "val/recall@10", "val/mrr@10"):
        assert ddp[name] == pytest.approx(single_eval[name], abs=1 / 97 + 1e-6), name

    # one process with the global batch (2 x 16): DDP gathers negatives, so it trains the same loss on the
    # same samples per step (the DDP shards interleave one permutation); equal up to float summation order
    monkeypatch.chdir(tmp_path)
    main(["fit", *DUAL_TOWER, "--data.init_args.batch_size=32"])
    single = _metrics(tmp_path / "runs/synthetic/dual_tower")
    for name in ("val/recall@1", "val/recall@5", "val/recall@10"):
        assert abs(ddp[name] - single[name]) <= 0.02, (name, ddp[name], single[name])
    assert ddp["train/loss"] == pytest.approx(single["train/loss"], rel=0.01)


def test_retriever_and_two_stage_ddp_eval_equal_one_process(ddp_runs, monkeypatch):
    monkeypatch.chdir(ddp_runs)  # the checkpoint names its bundle by the launch's relative path
    _assert_replicas_identical(ddp_runs / "retriever.json")
    run = ddp_runs / "runs/synthetic/ace_retriever_ddp"  # the docs command's own run directory
    _no_partial_files(run)
    ddp = _metrics(run)
    model = GenerativeRetriever.load_from_checkpoint(
        run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True
    )
    single = _validate(model, [TwoStageEvaluation(str(ddp_runs / DENSE_CHECKPOINT), beam_size=5)],
                       ckpt_path=run / "checkpoints/last.ckpt", **_vocabulary_of(EXPERIMENTS / "ace_retriever.yaml"))
    names = ["val/recall@1", "val/recall@5", "val/recall@10", "val/mrr@10"]
    names += [f"val/two_stage/{m}" for m in ("recall@1", "recall@10", "mrr@10", "candidate_recall@5",
                                              "candidates_per_query", "full_dense_recall@10")]
    # two ranks vs one process: a near-tie of one query of 97 may flip (its pool by the size of the SIDs it swaps)
    for name in names:
        tolerance = {"rel": 0.05} if name.endswith("candidates_per_query") else {"abs": 1 / 97 + 1e-6}
        assert ddp[name] == pytest.approx(single[name], **tolerance), name
    assert torch.equal(model.sid_codes, SIDBundle.load(ddp_runs / "runs/synthetic/ace_tokenizer/bundle").codes)
