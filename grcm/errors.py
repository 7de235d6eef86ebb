"""Errors a user can cause and fix: bad files, ids, dimensions, config values, missing checkpoints.

Raise :class:`GrcmError` (or a subclass) with a message that names the file or argument and
the fix. The ``grcm`` command prints such an error as one line, without a traceback
(the traceback is shown with ``GRCM_DEBUG=1``); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class GrcmError(Exception):
    """A problem in the user's input, with a message that names the file/argument and the fix."""


class InferenceQuantizationError(GrcmError, ValueError):
    """An ``inference_quantization`` value or device that cannot work (names the field and the fix); raised by
    :mod:`grcm.retriever.cpu_inference` and :mod:`grcm.retriever.onnx_inference`."""
