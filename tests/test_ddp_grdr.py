"""GRDR under real two-process DDP on CPU (gloo), launched as users launch: ``grcm fit --trainer.strategy=ddp``.

One tiny GRDR run (97 items, 2 views x 2 levels x 8 codes; the last evaluation shard is padded with a
repeated query) goes through every phase: pretrain, K-Means init + main of level 0, K-Means init + main of
level 1, fit (tokenizer frozen). It carries

* :class:`grcm.ddp.ReplicaConsistencyCheck`: both replicas' parameters, buffers (SID table, anchor codes,
  query routes) and optimizer state are identical at every epoch start and at the end;
* :class:`ComputationProbe` (below): each rank records the one-off computations it ran, so the test sees
  that query embedding, routing and every level's K-Means ran once, on rank 0 (rank 1 got them by broadcast).

The validation metrics the DDP run logged (sharded by query) must equal a one-process validation of the
checkpoint rank 0 wrote, within 1e-6.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
from test_ddp_launch import (
    DATA,
    ROOT,
    _assert_replicas_identical,
    _launch,
    _metrics,
    _no_partial_files,
    _validate,
    _vocabulary_of,
)

import grcm.retriever.grdr.routing as grdr_routing
from grcm.retriever.grdr import GRDRRetriever

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)

EPOCHS = 4  # pretrain 0 | main 0 (K-Means level 0) | main 1 (K-Means level 1) | fit 1
GRDR = [
    "-c", str(ROOT / "experiments" / "synthetic" / "grdr.yaml"), *DATA, "--data.init_args.batch_size=16",
    "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
    f"--trainer.max_epochs={EPOCHS}", f"--trainer.check_val_every_n_epoch={EPOCHS}",
    "--model.init_args.num_views=2", "--model.init_args.num_levels=2", "--model.init_args.codebook_size=8",
    "--model.init_args.d_model=16", "--model.init_args.tokenizer_hidden=16", "--model.init_args.num_heads=2",
    "--model.init_args.num_encoder_layers=1", "--model.init_args.num_decoder_layers=1",
    "--model.init_args.ffn_dim=32", "--model.init_args.beam_size=4", "--model.init_args.query_encoder=minilm_static",
    "--model.init_args.pretrain_epochs=[1,0]", "--model.init_args.main_epochs=[1,1]",
    "--model.init_args.fit_epochs=[0,1]",
]
PROBED = ("embed_queries", "cluster_routes", "facet_routes", "matched_routes", "random_routes", "nearest_view_routes")


class ComputationProbe(L.Callback):
    """Record, per rank, every call of GRDR's one-off computations; write ``<out>/rank<r>.json`` at the end.

    Wraps the routing functions GRDRRetriever calls (in :mod:`grcm.retriever.grdr.routing`) and its tokenizer's
    ``init_level`` (K-Means) in ``setup``, which runs before the module's own ``setup``.
    """

    def __init__(self, out: str) -> None:
        self.out = out
        self.calls: list[str] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for name in PROBED:
            setattr(grdr_routing, name, self._recording(name, getattr(grdr_routing, name)))
        init_level = pl_module.tokenizer.init_level

        def recorded_init_level(features, level, seed=0, per_view=False):
            self.calls.append(f"init_level {level}")
            return init_level(features, level, seed=seed, per_view=per_view)

        pl_module.tokenizer.init_level = recorded_init_level

    def _recording(self, name, function):
        def recorded(*args, **kwargs):
            self.calls.append(name)
            return function(*args, **kwargs)

        return recorded

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        Path(self.out).mkdir(parents=True, exist_ok=True)
        (Path(self.out) / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.calls))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp_grdr")
    probe = [f"--trainer.callbacks+={__name__}.ComputationProbe", "--trainer.callbacks.out=probe"]
    replicas = ["--trainer.callbacks+=grcm.ddp.ReplicaConsistencyCheck", "--trainer.callbacks.out=replicas.json"]
    with pytest.MonkeyPatch.context() as patch:  # the launched processes import the probe from tests/
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                                 os.environ.get("PYTHONPATH")])))
        _launch([sys.executable, "-m", "grcm", "fit", *GRDR, "--trainer.strategy=ddp", "--trainer.devices=2",
                 *replicas, *probe], root)
    return root


def test_grdr_ddp_replicas_identical_and_one_off_work_done_once_on_rank_zero(ddp_run):
    _assert_replicas_identical(ddp_run / "replicas.json", epochs=EPOCHS)
    rank0 = json.loads((ddp_run / "probe" / "rank0.json").read_text())
    rank1 = json.loads((ddp_run / "probe" / "rank1.json").read_text())
    # grdr.yaml's routing "matched": query groups matched to facets in setup, re-matched to the views in every
    # epoch after the first while the tokenizer trains (epochs 1 and 2 here; epoch 3 is the fit phase)
    assert rank0 == ["embed_queries", "cluster_routes", "facet_routes", "init_level 0", "matched_routes",
                     "init_level 1", "matched_routes"], rank0
    assert rank1 == [], f"rank 1 must receive these from rank 0, not compute them: {rank1}"


def test_grdr_ddp_eval_equals_one_process_and_rank_zero_wrote_the_checkpoint(ddp_run):
    run = ddp_run / "runs" / "synthetic" / "grdr"  # grdr.yaml's run directory
    _no_partial_files(run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    ddp = _metrics(run)
    assert ddp["phase/index"] == 3.0 and ddp["phase/level"] == 1.0
    model = GRDRRetriever.load_from_checkpoint(run / "checkpoints" / "last.ckpt", map_location="cpu",
                                               weights_only=True)
    assert int(model.initialised_levels) == 2 and tuple(model.sid_codes.shape) == (97, 2, 2)
    routes = model.sids.query_routes[model.sids.query_routes >= 0]
    assert routes.numel() > 0 and set(routes.tolist()) == {0, 1}
    # grdr.yaml's query vocabulary (a trained one is restored from the checkpoint)
    single = _validate(model, ckpt_path=run / "checkpoints" / "last.ckpt",
                       **_vocabulary_of(ROOT / "experiments" / "synthetic" / "grdr.yaml"))
    names = ["val/recall@1", "val/recall@5", "val/recall@10", "val/mrr@10", "val/pool_size"]
    names += [f"val/{name}@{k}" for name in ("expanded_recall", "candidate_recall") for k in (10, 50, 100)]
    # two ranks vs one process: other batch shapes, so float sums may round differently and flip a near-tie of
    # one query of the 97 (its metrics by 1/97, its pool by the size of the SIDs it swaps)
    for name in names:
        tolerance = {"abs": 1 / 97 + 1e-6} if name != "val/pool_size" else {"rel": 0.05}
        assert ddp[name] == pytest.approx(single[name], **tolerance), name
    assert 0 < ddp["val/recall@10"] and 1 <= ddp["val/pool_size"]
    # the one-process validation refreshed nothing: the checkpoint's SID table is the tokenizer's
    assert torch.equal(model.sid_codes, model.tokenizer.encode(model.sids.features, 2))
