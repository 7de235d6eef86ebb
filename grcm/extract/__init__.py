"""``grcm extract``: media files -> the ``(N, D)`` feature matrix + id list that ``grcm prepare`` joins.

- :mod:`grcm.extract.media`: reading images (Pillow), videos (PyAV, uniform frame sampling)
  and audio (soundfile, resampled with scipy).
- :mod:`grcm.extract.encoders`: CLIP/SigLIP image encoders and the CLAP audio encoder through
  ``transformers``, from a local directory or a hub name when online.
- :mod:`grcm.extract.runner`: batched, sharded, resumable extraction with a report of the
  files that could not be read.
"""

from grcm.extract.runner import ExtractionResult, extract_features

__all__ = ["ExtractionResult", "extract_features"]
