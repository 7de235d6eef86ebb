"""Batched, sharded, resumable feature extraction.

Files are taken in sorted order and cut into shards of ``shard_size`` files. Each finished
shard is written atomically under ``<out>/shards/`` (features, ids, failures), so a killed
run resumes at the first missing shard. When all shards exist they are joined into::

    <out>/features.npy         (N, D) float16, L2-normalised rows
    <out>/feature_ids.txt      line i = the file of row i, relative to the input folder
    <out>/frame_features.npy   (N, F, D) float16 per-frame features (video, --per-frame only)
    <out>/report.json          counts, settings and every file that could not be read (with the error)

``features.npy`` + ``feature_ids.txt`` are what ``grcm prepare --features --feature-ids`` takes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from grcm.errors import GrcmError
from grcm.extract import media
from grcm.io import atomic_path, write_json_atomic

logger = logging.getLogger(__name__)
MODALITIES = ("image", "video", "audio")


@dataclass
class ExtractionResult:
    """Where the outputs are and what happened."""

    features: Path
    feature_ids: Path
    report: Path
    num_items: int
    num_failed: int


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)


def _settings(modality, model, num_frames, per_frame, files, root) -> dict:
    return {
        "modality": modality,
        "model": str(model),
        "num_frames": num_frames if modality == "video" else None,
        "per_frame": bool(per_frame and modality == "video"),
        "files": [str(f.relative_to(root)) if root.is_dir() else f.name for f in files],
    }


def extract_features(
    inputs: str | Path,
    out_dir: str | Path,
    modality: str,
    model: str,
    *,
    batch_size: int = 32,
    shard_size: int = 1024,
    num_frames: int = 8,
    per_frame: bool = False,
    max_audio_seconds: float | None = 30.0,
    device: str = "cpu",
    progress: bool = True,
    encoder=None,
) -> ExtractionResult:
    """Encode every ``modality`` file under ``inputs`` and write the outputs described in the module docstring.

    Args:
        inputs: a folder (searched recursively by extension) or one file.
        out_dir: output folder; an interrupted run with the same inputs and settings resumes there.
        modality: ``"image"``, ``"video"`` (frames through the image encoder, mean-pooled) or ``"audio"``.
        model: CLIP/SigLIP (image, video) or CLAP (audio) directory or hub name.
        batch_size: items per encoder call (video: ``batch_size`` videos x ``num_frames`` frames).
        shard_size: files per resumable shard.
        num_frames: frames sampled uniformly per video.
        per_frame: also keep the ``(F, D)`` frame features of each video.
        max_audio_seconds: audio read per file (CLAP itself truncates to its window).
        device: torch device string.
        progress: show a tqdm progress bar.
        encoder: a ready encoder (tests); built from ``model`` when None.
    """
    from tqdm.auto import tqdm

    if modality not in MODALITIES:
        raise GrcmError(f"--modality {modality!r}: use one of {', '.join(MODALITIES)}.")
    root, out = Path(inputs), Path(out_dir)
    if not root.exists():
        raise GrcmError(f"{root}: input folder not found.")
    files = media.list_media(root, modality)
    if not files:
        raise GrcmError(
            f"{root}: no {modality} files found (extensions {', '.join(media.EXTENSIONS[modality])})."
        )
    settings = _settings(modality, model, num_frames, per_frame, files, root)
    manifest = out / "shards" / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()) != settings:
        raise GrcmError(
            f"{out}: holds shards of a different extraction (other files, model or settings); "
            "choose another --out or delete its shards/ folder to start over."
        )
    write_json_atomic(manifest, settings)
    if encoder is None:
        from grcm.extract.encoders import AudioEncoder, ImageEncoder

        encoder = AudioEncoder(model, device) if modality == "audio" else ImageEncoder(model, device)

    ids = settings["files"]
    shards = range(0, len(files), shard_size)
    bar = tqdm(total=len(files), desc=f"grcm extract ({modality})", unit="file", disable=not progress)
    for start in shards:
        stem = out / "shards" / f"{start // shard_size:05d}"
        if Path(f"{stem}.done").is_file():
            bar.update(min(shard_size, len(files) - start))
            continue
        _extract_shard(files[start : start + shard_size], ids[start : start + shard_size], stem, modality,
                       encoder, batch_size, num_frames, per_frame, max_audio_seconds, bar)
    bar.close()
    return _join_shards(out, len(shards), settings)


def _load(path: Path, modality: str, num_frames: int, encoder, max_audio_seconds):
    if modality == "image":
        return media.load_image(path)
    if modality == "video":
        return media.load_video_frames(path, num_frames)
    return media.load_audio(path, encoder.sample_rate, max_audio_seconds)


def _extract_shard(files, ids, stem, modality, encoder, batch_size, num_frames, per_frame, max_audio_seconds, bar):
    kept_ids, failed, rows, frame_rows = [], [], [], []
    for start in range(0, len(files), batch_size):
        loaded, batch_ids = [], []
        for path, item_id in zip(files[start : start + batch_size], ids[start : start + batch_size]):
            try:
                loaded.append(_load(path, modality, num_frames, encoder, max_audio_seconds))
                batch_ids.append(item_id)
            except Exception as error:  # any decoder error: list the file and go on
                failed.append({"file": item_id, "error": f"{type(error).__name__}: {error}"[:300]})
            bar.update(1)
        if not loaded:
            continue
        if modality == "video":
            frames = encoder([frame for video in loaded for frame in video])
            frames = frames.reshape(len(loaded), num_frames, -1)
            pooled = frames.mean(axis=1)
            rows.append(pooled / np.linalg.norm(pooled, axis=1, keepdims=True).clip(min=1e-12))
            if per_frame:
                frame_rows.append(frames)
        else:
            rows.append(encoder(loaded))
        kept_ids += batch_ids
    dim = rows[0].shape[1] if rows else 0
    _save_npy(Path(f"{stem}.npy"), np.concatenate(rows).astype(np.float16) if rows else np.zeros((0, dim), np.float16))
    if per_frame and modality == "video":
        frames = np.concatenate(frame_rows) if frame_rows else np.zeros((0, num_frames, dim))
        _save_npy(Path(f"{stem}.frames.npy"), frames.astype(np.float16))
    write_json_atomic(Path(f"{stem}.json"), {"ids": kept_ids, "failed": failed})
    with atomic_path(Path(f"{stem}.done")) as tmp:
        tmp.write_text("")


def _join_shards(out: Path, num_shards: int, settings: dict) -> ExtractionResult:
    features, frames, ids, failed = [], [], [], []
    for shard in range(num_shards):
        stem = out / "shards" / f"{shard:05d}"
        meta = json.loads(Path(f"{stem}.json").read_text())
        rows = np.load(f"{stem}.npy")
        if rows.shape[0]:
            features.append(rows)
        ids += meta["ids"]
        failed += meta["failed"]
        if settings["per_frame"] and rows.shape[0]:
            frames.append(np.load(f"{stem}.frames.npy"))
    if not ids:
        raise GrcmError(
            f"{out}: none of the {len(failed)} file(s) could be read (first error: {failed[0]['error']}); "
            "see shards/*.json."
        )
    matrix = np.concatenate(features)
    _save_npy(out / "features.npy", matrix)
    with atomic_path(out / "feature_ids.txt") as tmp:
        tmp.write_text("".join(f"{item_id}\n" for item_id in ids))
    if settings["per_frame"]:
        _save_npy(out / "frame_features.npy", np.concatenate(frames))
    report = {
        "modality": settings["modality"],
        "model": settings["model"],
        "num_frames": settings["num_frames"],
        "files": len(settings["files"]),
        "extracted": len(ids),
        "failed": len(failed),
        "feature_dim": int(matrix.shape[1]),
        "dtype": "float16",
        "failed_files": failed,
    }
    write_json_atomic(out / "report.json", report)
    if failed:
        logger.warning("grcm extract: %d of %d file(s) could not be read and were skipped (listed in %s)",
                       len(failed), len(settings["files"]), out / "report.json")
    return ExtractionResult(out / "features.npy", out / "feature_ids.txt", out / "report.json", len(ids), len(failed))


def main(argv: list[str] | None = None) -> None:
    """``grcm extract``: command-line front end of :func:`extract_features`."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="grcm extract",
        description="Encode media files into features.npy + feature_ids.txt for grcm prepare (resumable).",
    )
    parser.add_argument("inputs", help="folder of media files (searched recursively) or one file")
    parser.add_argument("--modality", required=True, choices=MODALITIES)
    parser.add_argument("--model", required=True,
                        help="CLIP/SigLIP (image, video) or CLAP (audio): local directory or hub name when online")
    parser.add_argument("--out", required=True, help="output folder (rerun with the same arguments to resume)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=1024, help="files per resumable shard")
    parser.add_argument("--num-frames", type=int, default=8, help="video: frames sampled uniformly")
    parser.add_argument("--per-frame", action="store_true", help="video: also write frame_features.npy (N, F, D)")
    parser.add_argument("--max-audio-seconds", type=float, default=30.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    result = extract_features(
        args.inputs, args.out, args.modality, args.model, batch_size=args.batch_size, shard_size=args.shard_size,
        num_frames=args.num_frames, per_frame=args.per_frame, max_audio_seconds=args.max_audio_seconds,
        device=args.device, progress=not args.no_progress,
    )
    print(f"grcm extract: {result.num_items} item(s) -> {result.features} + {result.feature_ids}; "
          f"{result.num_failed} unreadable file(s) skipped (see {result.report})")
