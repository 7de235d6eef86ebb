"""GRDR: multi-view query-guided SIDs whose codebooks are the generative retriever's vocabulary, trained jointly.

One LightningModule, :class:`GRDRRetriever` (:mod:`grcm.retriever.grdr.retriever`), holds a
:class:`~grcm.tokenizers.multiview.MultiViewTokenizer` and a
:class:`~grcm.retriever.model.GenerativeRetrieverModel`. With ``shared_codebook`` the tokenizer's
level-l codebook ``E_l`` (K, d) *is* the decoder's level-l input embedding table and its output
head computes ``s * cos(h, E_l)`` with a learned ``s`` clamped to [20, 100]
(:class:`~grcm.retriever.grdr.heads.CosineCodeHead`); one Parameter, trained by both the tokenizer
losses and the retrieval loss.

Training follows :mod:`grcm.retriever.phases` (level by level: pre-train, K-Means init of the new
codebook, main, fit with the tokenizer frozen), with the losses of :mod:`grcm.retriever.grdr.losses`.
A train query of item i routed to view v (:mod:`grcm.tokenizers.query_routing`) is trained to decode
the current SID of (i, v); targets are recomputed from the tokenizer on every step, so they follow
the codebooks while those train. ``train/code_drift`` is the share of items whose earlier-level
codes changed since the previous epoch.

Decoding is the SID-retrieval path GRDR shares with ACE
(:class:`~grcm.retriever.sid_retrieval.SIDRetrievalModule`: evaluation + inference mode, KV-cached
incremental decoding, beams -> items, metrics, predict output). The trie holds all V SIDs of every
item (``N * V`` rows, :class:`~grcm.retriever.grdr.state.GRDRState`); a decoded SID expands to all
its items. Ranking tie-break: items are ordered by the score of the best beam that reaches them; the
items of one SID share its score and are listed in ascending item index (the trie's leaf order); an
item recalled through several views keeps its best position. With the two-stage callback the dense
score resolves these ties. Metrics are item-level only: ``recall@k``/``mrr@k`` over the ranked items
(the first ``eval_max_items``), ``expanded_recall@{10,50,100}`` (the gold item is among the first k
items the beams expand to, the whole expanded pool, not cut at ``eval_max_items``; logged for one
more release under its former name ``candidate_recall@k`` too, which the two-stage callback uses for
"gold anywhere in the recalled pool") and ``pool_size`` (distinct items the beams expand to).

The SID table, routes, item ids and health travel inside every checkpoint: a checkpoint alone
decodes (``GRDRRetriever.load_from_checkpoint(path).retrieve(...)``). The phase follows from the
epoch; the built levels, anchor codes, routes and the codes ``train/code_drift`` compares with are
checkpointed, so a fit resumed with ``--ckpt_path`` continues in the same phase with the same
frozen parameters.

DDP: the query embeddings and routes (in ``setup``), each level's K-Means initialisation and the
``nearest`` re-routing are computed on rank 0 and broadcast, so every replica holds the same state
(:class:`grcm.ddp.ReplicaConsistencyCheck`). Phases freeze parameter groups and some phases leave
parameters out of the loss, so under a DDP strategy the module turns on DDP's
``find_unused_parameters`` unless the strategy sets it. Evaluation is sharded by query; every
metric, ``pool_size`` included, counts each query id once (DDP pads the last shard with repeats).
"""

from grcm.retriever.grdr.heads import CosineCodeHead
from grcm.retriever.grdr.retriever import GRDRRetriever
from grcm.retriever.grdr.state import GRDRState

__all__ = ["CosineCodeHead", "GRDRRetriever", "GRDRState"]
