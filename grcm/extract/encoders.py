"""Media encoders through ``transformers``: CLIP/SigLIP for images and video frames, CLAP for audio.

A model is a local directory written by ``save_pretrained`` (model + image processor or
feature extractor) or, when online, a hub name. A path that does not exist, or a name that
cannot be loaded, is one :class:`~grcm.errors.GrcmError` naming it and the fix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from grcm.errors import GrcmError


class ModelLoadError(GrcmError):
    """The encoder model could not be found or loaded."""


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().exists() or name.count("/") > 1


def load_pretrained(name: str, loader, what: str):
    """``loader(name)`` (a ``from_pretrained``) with one clear :class:`ModelLoadError` when it fails."""
    if _looks_local(name) and not Path(name).expanduser().is_dir():
        raise ModelLoadError(
            f"--model {name}: directory not found; pass a local directory saved with save_pretrained "
            f"(model + {what}), or a hub name such as openai/clip-vit-base-patch32 when online."
        )
    try:
        return loader(str(Path(name).expanduser()) if _looks_local(name) else name)
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"--model {name}: could not load a {what} from it ({str(error).splitlines()[0]}); pass a directory "
            "saved with save_pretrained, or a hub name when online (HF_HUB_OFFLINE=1 forbids downloads)."
        ) from error


def _as_tensor(output) -> torch.Tensor:
    """``get_*_features`` returns a tensor, or (newer transformers) an output whose pooled embedding is first."""
    if isinstance(output, torch.Tensor):
        return output
    for key in ("image_embeds", "audio_embeds", "pooler_output"):
        value = getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    return output[0]


class ImageEncoder:
    """PIL images -> ``(B, D)`` float32 unit embeddings with a CLIP or SigLIP vision tower.

    Args:
        model: local directory or hub name.
        device: torch device string.
    """

    def __init__(self, model: str, device: str = "cpu"):
        from transformers import AutoImageProcessor, AutoModel

        self.processor = load_pretrained(model, AutoImageProcessor.from_pretrained, "image processor")
        self.model = load_pretrained(model, AutoModel.from_pretrained, "CLIP/SigLIP model").eval().to(device)
        if not hasattr(self.model, "get_image_features"):
            raise ModelLoadError(f"--model {model}: {type(self.model).__name__} has no image tower; use CLIP or SigLIP.")
        self.device = device

    @torch.no_grad()
    def __call__(self, images: list) -> np.ndarray:
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        features = _as_tensor(self.model.get_image_features(pixel_values=pixels))
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy()


class AudioEncoder:
    """Mono waveforms at :attr:`sample_rate` -> ``(B, D)`` float32 unit embeddings with CLAP.

    Args:
        model: local directory or hub name (model + feature extractor).
        device: torch device string.
    """

    def __init__(self, model: str, device: str = "cpu"):
        from transformers import AutoFeatureExtractor, ClapModel

        self.extractor = load_pretrained(model, AutoFeatureExtractor.from_pretrained, "audio feature extractor")
        self.model = load_pretrained(model, ClapModel.from_pretrained, "CLAP model").eval().to(device)
        self.sample_rate = int(self.extractor.sampling_rate)
        self.device = device

    @torch.no_grad()
    def __call__(self, waves: list[np.ndarray]) -> np.ndarray:
        inputs = self.extractor(waves, sampling_rate=self.sample_rate, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items() if k in ("input_features", "is_longer")}
        features = _as_tensor(self.model.get_audio_features(**inputs))
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy()
