"""W&B offline mode: the offline run directory (where docs/scale-out.md says) holds the metrics, the resolved
config and the SID tables/plot; a CSV log sits beside it; fit's last line names the best checkpoint."""

from __future__ import annotations

import csv
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = str(ROOT / "experiments" / "synthetic" / "ace_tokenizer.yaml")
WANDB = str(ROOT / "experiments" / "loggers" / "wandb.yaml")
BLOCK, HEADER = 32768, 7


def read_wandb_records(path: Path) -> list:
    """Protobuf records of an offline ``run-*.wandb`` log (LevelDB log format after a 7-byte ':W&B' header)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    position, pending, records = HEADER, b"", []
    while position + HEADER <= len(data):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < HEADER:  # a block's tail too short for a record header is padding
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + HEADER])
        if kind == 0 and length == 0:
            break
        pending += data[position + HEADER : position + HEADER + length]
        position += HEADER + length
        if kind in (1, 4):  # a FULL record, or the LAST piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_offline_run_holds_metrics_config_and_sid_health(tmp_path):
    pytest.importorskip("wandb")
    # its own process: W&B keeps process-wide state (settings, service) from any earlier run in this one
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env.pop("WANDB_RUN_ID", None)
    command = [
        sys.executable, "-m", "grcm",
        "fit", "-c", TOKENIZER, "-c", WANDB, f"--trainer.default_root_dir={tmp_path / 'wandb_runs'}",
        "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--data.init_args.num_items=120", "--data.init_args.feature_dim=16", "--data.init_args.batch_size=60",
        "--data.init_args.eval_batch_size=120", "--model.init_args.coarse_codebook_size=4",
        "--model.init_args.codebook_size=8", "--model.init_args.latent_dim=8",
        "--model.init_args.hidden_dims=[16]", "--model.init_args.health_pairs=100",
        "--model.init_args.bundle_dir=bundle",
    ]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    # docs/scale-out.md says where an offline run lands; that is where it is
    documented = re.search(r"`<run dir>/(wandb/[^`]+)`", (ROOT / "docs" / "scale-out.md").read_text()).group(1)
    (run,) = (tmp_path / "wandb_runs").glob(documented)
    # a local CSV log beside W&B, holding the config and the same metrics
    csv_log = tmp_path / "wandb_runs" / "logs" / "version_0"
    assert (csv_log / "config_fit.yaml").is_file()
    with (csv_log / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert any(row.get("val/recon") for row in rows) and any(row.get("sid/collision_rate") for row in rows)
    # the last line printed names the run directory and the best checkpoint with its metric
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith(f"grcm fit: run directory {tmp_path / 'wandb_runs'};") and "(val/recon=" in last, last
    records = read_wandb_records(next(run.glob("run-*.wandb")))
    history: dict[str, object] = {}
    config: dict[str, object] = {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    for name in ("val/recon", "sid/collision_rate", "sid/gini", "sid/level0_utilisation"):
        assert isinstance(history.get(name), (int, float)), name
    # the resolved CLI config (with the command-line overrides) and the model's hyperparameters
    assert config["model"]["class_path"] == "grcm.tokenizers.module.ACETokenizer"
    assert config["model"]["init_args"]["codebook_size"] == 8
    assert config["data"]["init_args"]["num_items"] == 120
    assert config["feature_dim"] == 16  # linked from the data module
    # rank 0's tables and plot, stored in the run directory for `wandb sync`
    assert history["sid/health/_type"] == "table-file" and history["val/results/_type"] == "table-file"
    health = json.loads((run / "files" / history["sid/health/path"]).read_text())
    assert health["columns"] == ["metric", "value"]
    assert dict(health["data"])["sid/collision_rate"] == pytest.approx(history["sid/collision_rate"])
    assert list((run / "files").glob("media/images/sid/coarse_tokens*.png"))
