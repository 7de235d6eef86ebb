"""``grcm extract`` end to end with tiny random CLIP and CLAP models: extract -> prepare -> fit."""

from __future__ import annotations

import json

import numpy as np
import pytest

av = pytest.importorskip("av")
soundfile = pytest.importorskip("soundfile")

from PIL import Image  # noqa: E402

from grcm.cli import main  # noqa: E402
from grcm.errors import GrcmError  # noqa: E402
from grcm.extract import extract_features  # noqa: E402


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Randomly initialised CLIP (32 px, 12-d) and CLAP (16 kHz, 12-d) saved with their processors."""
    from transformers import (
        ClapConfig,
        ClapFeatureExtractor,
        ClapModel,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
    )

    root = tmp_path_factory.mktemp("models")
    text = dict(vocab_size=99, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=20)
    clip = CLIPConfig(text_config=text, projection_dim=12, vision_config=dict(
        image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    CLIPModel(clip).save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "clip")
    clap = ClapConfig(text_config={**text, "projection_dim": 12}, projection_dim=12, audio_config=dict(
        spec_size=64, patch_size=4, patch_stride=[4, 4], num_mel_bins=16, window_size=4, patch_embeds_hidden_size=8,
        hidden_size=16, depths=[1, 1], num_attention_heads=[2, 2], projection_dim=12, enable_fusion=False))
    ClapModel(clap).save_pretrained(root / "clap")
    ClapFeatureExtractor(feature_size=16, sampling_rate=16000, hop_length=160, max_length_s=1, fft_window_size=400,
                         truncation="rand_trunc", padding="repeatpad").save_pretrained(root / "clap")
    return root


def _write_video(path, frames=6, seed=0):
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=6)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def test_video_extract_prepare_fit(tiny_models, tmp_path, monkeypatch):
    videos = tmp_path / "videos"
    videos.mkdir()
    names = [f"clip{i}" for i in range(6)]
    for i, name in enumerate(names):
        _write_video(videos / f"{name}.mp4", frames=2 + i, seed=i)
    (videos / "broken.mp4").write_bytes(b"not a video")
    out = tmp_path / "feats"
    main(["extract", str(videos), "--modality", "video", "--model", str(tiny_models / "clip"), "--out", str(out),
          "--num-frames", "3", "--per-frame", "--batch-size", "2", "--shard-size", "2", "--no-progress"])
    report = json.loads((out / "report.json").read_text())
    assert report["extracted"] == 6 and report["failed"] == 1
    assert report["failed_files"][0]["file"] == "broken.mp4"
    features = np.load(out / "features.npy")
    frames = np.load(out / "frame_features.npy")
    assert features.dtype == np.float16 and features.shape == (6, 12) and frames.shape == (6, 3, 12)
    pooled = frames.astype(np.float32).mean(1)
    np.testing.assert_allclose(features, pooled / np.linalg.norm(pooled, axis=1, keepdims=True), atol=2e-3)
    assert (out / "feature_ids.txt").read_text().split() == [f"{n}.mp4" for n in names]

    annotations = tmp_path / "msvd"
    annotations.mkdir()
    captions = {n: [f"a video of thing {i}", f"thing {i} moving", f"clip number {i}"] for i, n in enumerate(names)}
    (annotations / "captions_msvd.json").write_text(json.dumps(captions))
    for split, ids in {"train": names[:4], "val": names[4:5], "test": names[5:]}.items():
        (annotations / f"{split}_list.txt").write_text("\n".join(ids) + "\n")
    corpus = tmp_path / "corpus"
    main(["prepare", "msvd", "--annotation-dir", str(annotations), "--features", str(out / "features.npy"),
          "--feature-ids", str(out / "feature_ids.txt"), "--out", str(corpus)])
    monkeypatch.chdir(tmp_path)
    main(["fit", "-c", str(_repo() / "experiments/msvd/dual_tower.yaml"), f"--data.init_args.corpus_dir={corpus}",
          "--model.init_args.text_backbone=scratch", "--model.init_args.embed_dim=16", "--model.init_args.text_width=16",
          "--model.init_args.text_layers=1", "--data.init_args.batch_size=4", "--trainer.max_epochs=1",
          "--trainer.accelerator=cpu", f"--trainer.default_root_dir={tmp_path / 'run'}"])
    assert list(tmp_path.rglob("*.ckpt")), "one training epoch ran and saved a checkpoint"


def _repo():
    from pathlib import Path

    return Path(__file__).resolve().parents[1]


def test_image_and_audio_extraction_skip_corrupt_files_and_resume(tiny_models, tmp_path):
    images = tmp_path / "images" / "sub"
    images.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (40 + i, 30), (80 * i, 10, 200)).save(images / f"img{i}.jpg")
    (images / "corrupt.png").write_bytes(b"\x89PNG broken")
    result = extract_features(tmp_path / "images", tmp_path / "img_out", "image", str(tiny_models / "clip"),
                              shard_size=2, progress=False)
    assert (result.num_items, result.num_failed) == (3, 1)
    assert (tmp_path / "img_out" / "feature_ids.txt").read_text().split() == [f"sub/img{i}.jpg" for i in range(3)]

    class Refuse:  # a resumed run must not encode finished shards again
        def __call__(self, items):
            raise AssertionError("finished shards were re-encoded")

    again = extract_features(tmp_path / "images", tmp_path / "img_out", "image", str(tiny_models / "clip"),
                             shard_size=2, progress=False, encoder=Refuse())
    assert again.num_items == 3

    audio = tmp_path / "audio"
    audio.mkdir()
    rng = np.random.default_rng(0)
    for i, rate in enumerate((16000, 22050, 44100)):
        soundfile.write(audio / f"a{i}.wav", rng.normal(size=(rate // 2, 2)).astype(np.float32) * 0.1, rate)
    (audio / "bad.wav").write_bytes(b"RIFF....WAVE")
    result = extract_features(audio, tmp_path / "aud_out", "audio", str(tiny_models / "clap"), progress=False)
    assert (result.num_items, result.num_failed) == (3, 1)
    features = np.load(result.features)
    assert features.shape == (3, 12) and np.isfinite(features).all()


def test_missing_model_directory_is_one_clear_error(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    with pytest.raises(GrcmError, match="directory not found"):
        extract_features(tmp_path, tmp_path / "out", "image", str(tmp_path / "no_such_model"), progress=False)
