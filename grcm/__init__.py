"""grcm: generative cross-modal retrieval on PyTorch Lightning.

A text query is decoded by a sequence-to-sequence model into the semantic ID
(SID) of an item under a trie of valid IDs; a dense model may rerank the small
recalled pool. See README.md for the pipeline.
"""

__version__ = "0.1.0"
