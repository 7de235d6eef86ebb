"""Reading media files: images (Pillow), videos (PyAV, uniform frame sampling), audio (soundfile + scipy).

Every reader raises on a file it cannot decode; the runner records the error and skips the file.
"""

from __future__ import annotations

from math import gcd
from pathlib import Path

import numpy as np

EXTENSIONS = {
    "image": (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"),
    "video": (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".3gp", ".flv"),
    "audio": (".wav", ".flac", ".ogg", ".mp3", ".m4a", ".aiff", ".aif"),
}


def list_media(root: str | Path, modality: str) -> list[Path]:
    """All files under ``root`` (recursively) with a ``modality`` extension, sorted; ``root`` may be one file."""
    root = Path(root)
    if root.is_file():
        return [root]
    suffixes = EXTENSIONS[modality]
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)


def load_image(path: Path):
    """An RGB ``PIL.Image`` (fully decoded, so truncated files fail here, not later)."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")


def load_video_frames(path: Path, num_frames: int) -> list:
    """``num_frames`` RGB ``PIL.Image`` frames sampled uniformly over the video (the last frame repeats
    when the video is shorter). Decodes sequentially and keeps only the sampled frames."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        total = stream.frames
        if total <= 0:  # unknown length: decode everything once (short clips)
            frames = [frame.to_image() for frame in container.decode(stream)]
            total = len(frames)
            if not frames:
                raise ValueError("no decodable frames")
            picks = np.linspace(0, total - 1, num_frames).round().astype(int)
            return [frames[i] for i in picks]
        picks = np.linspace(0, total - 1, num_frames).round().astype(int).tolist()
        wanted: dict[int, int] = {}
        for i in picks:
            wanted[i] = wanted.get(i, 0) + 1
        out = []
        for index, frame in enumerate(container.decode(stream)):
            if index in wanted:
                out += [frame.to_image()] * wanted[index]
            if len(out) == num_frames:
                break
    if not out:
        raise ValueError("no decodable frames")
    return out + [out[-1]] * (num_frames - len(out))


def load_audio(path: Path, sample_rate: int, max_seconds: float | None = None) -> np.ndarray:
    """Mono float32 waveform ``(T,)`` at ``sample_rate`` (polyphase resampling), cut at ``max_seconds``."""
    import soundfile
    from scipy.signal import resample_poly

    wave, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    if wave.size == 0:
        raise ValueError("empty audio")
    wave = wave.mean(axis=1)
    if max_seconds is not None:
        wave = wave[: int(max_seconds * rate)]
    if rate != sample_rate:
        divisor = gcd(int(rate), int(sample_rate))
        wave = resample_poly(wave, sample_rate // divisor, int(rate) // divisor).astype(np.float32)
    return wave
