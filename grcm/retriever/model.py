"""Encoder-decoder transformer that maps a text query to the SID of its item.

Layout (pre-LN throughout: every sub-layer is ``x = x + Dropout(f(LayerNorm(x)))``):

- Encoder: ``sqrt(d) * token embedding + learned position embedding``, then S
  ``nn.TransformerEncoderLayer(norm_first=True)`` layers. The output of every
  layer passes its own LayerNorm (pre-LN residual streams are not normalised)
  and padding positions are zeroed; the S results are kept, because ACE
  fusion reads all of them (:class:`~grcm.retriever.encoder_output.EncoderOutput`).
- Decoder input for levels ``0..t``: position 0 is a learned BOS vector,
  position j >= 1 is ``sqrt(d) * code_embedding[j-1](code_{j-1})``; each level
  has its own embedding table, and a learned level embedding is added per
  position. Causal self-attention over the SID prefix, then the cross block
  chosen by ``fusion`` (see :mod:`grcm.retriever.fusion`), then a feed-forward
  sub-layer. Position j feeds the level-j output head, whose logits cover only
  the level-j codes ``[0, sid_vocab_sizes[j])``.

All weight matrices are Xavier-uniform initialised (as in ACE); biases are zero.

Two decoding paths give the same logits in evaluation mode:

- :meth:`GenerativeRetrieverModel.decode_logits` recomputes the decoder over
  the whole prefix at every level (the reference; training uses the same
  teacher-forced pass);
- :meth:`GenerativeRetrieverModel.project_memory` once per query batch, then
  :meth:`GenerativeRetrieverModel.decode_step` once per level: only the newest
  position is computed, attending to the cached self-attention keys/values of
  the earlier positions (:data:`DecoderCache`) and to the pre-projected encoder
  memory (:class:`DecoderMemory`). :class:`grcm.retriever.incremental.IncrementalStep`
  drives it inside a beam search.

Codes enter the decoder only through ``code_embeddings[l]`` and leave it only
through ``heads[l]``, in both paths.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from grcm.retriever.encoder_output import DecoderCache, DecoderMemory, EncoderOutput
from grcm.retriever.fusion import FUSION_CHOICES, build_cross_block, merge_heads, split_heads
from grcm.retriever.pretrained_encoder import PRETRAINED_CHOICES, PretrainedQueryEncoder


class FusionDecoderLayer(nn.Module):
    """Pre-LN decoder layer: causal self-attention, cross block (fusion), feed-forward.

    The cross block's output (for ACE: coarse + fine) is added to the residual
    stream, and the layer's output is the next layer's input.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        ffn_dim: int,
        dropout: float,
        fusion: str,
        num_encoder_layers: int,
        coarse_gate: str = "sigmoid",
    ) -> None:
        super().__init__()
        self.self_norm = nn.LayerNorm(d_model)
        self.self_attention = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.cross_norm = nn.LayerNorm(d_model)
        self.cross = build_cross_block(fusion, d_model, num_heads, num_encoder_layers, dropout, coarse_gate)
        self.ffn_norm = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, ffn_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_dim, d_model)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, y: Tensor, enc: EncoderOutput) -> Tensor:
        """``y`` (B', t, d) decoder states -> (B', t, d).

        ``B'`` is either ``enc.batch_size`` or a multiple ``k * enc.batch_size``
        with batch-major rows (row ``b*k + j`` reads query b). In the latter case
        the k rows of a query are folded into the query-length axis for the cross
        block, which is exact because cross-attention and the fusion gates act
        on every decoder position independently; the encoder memory is then never
        copied k times.
        """
        rows, length, width = y.shape
        causal = torch.ones(length, length, dtype=torch.bool, device=y.device).triu(1)
        h = self.self_norm(y)
        attended, _ = self.self_attention(h, h, h, attn_mask=causal, need_weights=False)
        y = y + self.dropout(attended)

        h = self.cross_norm(y)
        batch = enc.batch_size
        if rows % batch != 0:
            raise ValueError(
                f"decoder batch of {rows} rows is not a multiple of the encoder batch of {batch} queries."
            )
        group = rows // batch
        h = h.reshape(batch, group * length, width)
        fused = self.cross(h, enc.layer_outputs, enc.key_padding_mask).reshape(rows, length, width)
        y = y + self.dropout(fused)

        return y + self.dropout(self.ffn(self.ffn_norm(y)))

    def step(
        self,
        y: Tensor,
        past_keys: Tensor | None,
        past_values: Tensor | None,
        memory: tuple[Tensor, ...],
        attn_mask: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The newest decoder position only, as :meth:`forward` computes it in evaluation mode.

        Args:
            y: (R, 1, d) this layer's input at the newest position; ``R = G * B`` batch-major rows.
            past_keys, past_values: (R, h, t, d/h) self-attention keys/values of the t earlier
                positions, or None when this is the first position.
            memory: ``self.cross.project_memory`` of the B queries.
            attn_mask: (B, 1, 1, T) bool, True = real query token.

        Returns:
            (R, 1, d) output, and keys/values (R, h, t + 1, d/h) including the newest position.
        """
        attention = self.self_attention
        h = self.self_norm(y)
        queries, keys, values = F.linear(h, attention.in_proj_weight, attention.in_proj_bias).chunk(3, dim=-1)
        keys, values = split_heads(keys, attention.num_heads), split_heads(values, attention.num_heads)
        if past_keys is not None:
            keys, values = torch.cat([past_keys, keys], dim=2), torch.cat([past_values, values], dim=2)
        # the newest position may attend to every cached one: the causal mask holds by construction
        attended = F.scaled_dot_product_attention(split_heads(queries, attention.num_heads), keys, values)
        y = y + attention.out_proj(merge_heads(attended))

        rows, _, width = y.shape
        batch = attn_mask.shape[0]
        h = self.cross_norm(y).reshape(batch, rows // batch, width)
        y = y + self.cross.forward_cached(h, memory, attn_mask).reshape(rows, 1, width)
        return y + self.ffn(self.ffn_norm(y)), keys, values


class GenerativeRetrieverModel(nn.Module):
    """Seq2seq model: query tokens (B, T) -> per-level SID logits.

    Args:
        vocab_size: size of the query tokenizer's vocabulary.
        sid_vocab_sizes: codes per SID level, length L (level-l codes lie in ``[0, sid_vocab_sizes[l])``).
        d_model: width d.
        num_heads: attention heads.
        num_encoder_layers: S (ACE Table 3: 1..5, best 3).
        num_decoder_layers: decoder depth.
        ffn_dim: hidden width of the feed-forward sub-layers.
        dropout: dropout everywhere (attention weights, residual branches, FFN).
        fusion: "ace" (coarse-to-fine fusion of all encoder layers) or "none"
            (standard cross-attention to the last encoder layer).
        max_query_len: number of learned query positions; longer queries are rejected.
        pad_token_id: the query tokenizer's padding id (only used to document inputs;
            padding is taken from ``attention_mask``).
        coarse_gate: ACE coarse-fusion gate, "sigmoid" (as printed) or "silu" (self-gating).
        query_encoder: "scratch" (the encoder above, trained from nothing) or "minilm" (the
            pretrained MiniLM encoder, :mod:`grcm.retriever.pretrained_encoder`; its last S layers
            feed the decoder).
        pretrained_layers: for "minilm", keep only its first layers (None: all 6).
        freeze_query_encoder: for "minilm", keep the pretrained weights fixed.
    """

    def __init__(
        self,
        vocab_size: int,
        sid_vocab_sizes: list[int],
        d_model: int = 256,
        num_heads: int = 4,
        num_encoder_layers: int = 3,
        num_decoder_layers: int = 3,
        ffn_dim: int = 1024,
        dropout: float = 0.1,
        fusion: str = "ace",
        max_query_len: int = 64,
        pad_token_id: int = 0,
        coarse_gate: str = "sigmoid",
        query_encoder: str = "scratch",
        pretrained_layers: int | None = None,
        freeze_query_encoder: bool = False,
    ) -> None:
        super().__init__()
        if query_encoder not in ("scratch", *PRETRAINED_CHOICES):
            raise ValueError(f"query_encoder must be 'scratch' or one of {PRETRAINED_CHOICES}, got {query_encoder!r}.")
        if fusion not in FUSION_CHOICES:
            raise ValueError(f"fusion must be one of {FUSION_CHOICES}, got {fusion!r}.")
        if not sid_vocab_sizes or any(int(v) < 1 for v in sid_vocab_sizes):
            raise ValueError(f"sid_vocab_sizes must be a non-empty list of positive ints, got {sid_vocab_sizes}.")
        if d_model % num_heads != 0:
            raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads}.")
        if num_encoder_layers < 1 or num_decoder_layers < 1:
            raise ValueError("num_encoder_layers and num_decoder_layers must be at least 1.")
        self.sid_vocab_sizes = [int(v) for v in sid_vocab_sizes]
        self.num_levels = len(self.sid_vocab_sizes)
        self.d_model = d_model
        self.max_query_len = max_query_len
        self.pad_token_id = pad_token_id
        self.fusion = fusion
        self.embed_scale = math.sqrt(d_model)

        self.embedding_dropout = nn.Dropout(dropout)
        self.pretrained_encoder: PretrainedQueryEncoder | None = None
        if query_encoder == "scratch":
            self.token_embedding = nn.Embedding(vocab_size, d_model)
            self.position_embedding = nn.Embedding(max_query_len, d_model)
            self.encoder_layers = nn.ModuleList(
                nn.TransformerEncoderLayer(
                    d_model, num_heads, ffn_dim, dropout, activation="gelu", batch_first=True, norm_first=True
                )
                for _ in range(num_encoder_layers)
            )
            self.encoder_norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(num_encoder_layers))

        self.bos = nn.Parameter(torch.empty(1, d_model))  # (1, d): 2-d so Xavier init applies
        self.code_embeddings = nn.ModuleList(nn.Embedding(v, d_model) for v in self.sid_vocab_sizes)
        self.level_embedding = nn.Embedding(self.num_levels, d_model)
        self.decoder_layers = nn.ModuleList(
            FusionDecoderLayer(d_model, num_heads, ffn_dim, dropout, fusion, num_encoder_layers, coarse_gate)
            for _ in range(num_decoder_layers)
        )
        self.decoder_norm = nn.LayerNorm(d_model)
        self.heads = nn.ModuleList(nn.Linear(d_model, v) for v in self.sid_vocab_sizes)
        self.reset_parameters()
        if query_encoder != "scratch":  # built after the Xavier re-initialisation, which would erase it
            self.pretrained_encoder = PretrainedQueryEncoder(
                d_model, num_encoder_layers, pretrained_layers, freeze_query_encoder, vocab_size
            )

    def reset_parameters(self) -> None:
        """Xavier-uniform for every matrix (embeddings included), zeros for biases, LayerNorm to identity."""
        for name, param in self.named_parameters():
            if param.dim() > 1:
                nn.init.xavier_uniform_(param)
            elif name.endswith("bias"):
                nn.init.zeros_(param)
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # ----------------------------------------------------------------- encoder
    def query_mask(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The (B, T) bool mask of a query batch, after checking it: ``input_ids`` and ``attention_mask`` both
        (B, T), T <= ``max_query_len``, every row with at least one real token (else ValueError naming the fix)."""
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"input_ids and attention_mask must both be (B, T); got {tuple(input_ids.shape)} "
                f"and {tuple(attention_mask.shape)}."
            )
        if input_ids.shape[1] > self.max_query_len:
            raise ValueError(
                f"queries of {input_ids.shape[1]} tokens exceed max_query_len={self.max_query_len}; "
                "raise max_query_len or truncate queries in the data module."
            )
        mask = attention_mask.bool()
        if not bool(mask.any(dim=1).all()):
            raise ValueError("every query needs at least one real token (an attention_mask row is all False).")
        return mask

    def encode(self, input_ids: Tensor, attention_mask: Tensor) -> EncoderOutput:
        """Encode queries.

        Args:
            input_ids: (B, T) long token ids.
            attention_mask: (B, T) bool, True = real token; every row needs at least one.

        Returns:
            :class:`EncoderOutput` with S layer outputs (B, T, d).
        """
        mask = self.query_mask(input_ids, attention_mask)
        length = input_ids.shape[1]
        if self.pretrained_encoder is not None:
            return self.pretrained_encoder(input_ids, mask)
        positions = torch.arange(length, device=input_ids.device)
        x = self.token_embedding(input_ids) * self.embed_scale + self.position_embedding(positions)
        x = self.embedding_dropout(x)
        keep = mask.unsqueeze(-1)
        padding = ~mask
        outputs = []
        for layer, norm in zip(self.encoder_layers, self.encoder_norms):
            x = layer(x, src_key_padding_mask=padding)
            x = x.masked_fill(~keep, 0.0)
            outputs.append(norm(x).masked_fill(~keep, 0.0))
        return EncoderOutput(layer_outputs=tuple(outputs), attention_mask=mask)

    # ----------------------------------------------------------------- decoder
    def _decoder_inputs(self, sid_prefix: Tensor) -> Tensor:
        """``sid_prefix`` (B', t) codes of levels 0..t-1 -> decoder inputs (B', t+1, d)."""
        rows, t = sid_prefix.shape
        pieces = [self.bos.expand(rows, -1).unsqueeze(1)]
        for level in range(t):
            pieces.append(self.code_embeddings[level](sid_prefix[:, level]).unsqueeze(1) * self.embed_scale)
        x = torch.cat(pieces, dim=1)
        return x + self.level_embedding.weight[: t + 1]

    def _decode_states(self, enc: EncoderOutput, sid_prefix: Tensor) -> Tensor:
        """Decoder states (B', t+1, d) after the final LayerNorm."""
        y = self.embedding_dropout(self._decoder_inputs(sid_prefix))
        for layer in self.decoder_layers:
            y = layer(y, enc)
        return self.decoder_norm(y)

    def decode_logits(self, enc: EncoderOutput, sid_prefix: Tensor) -> Tensor:
        """Logits of the next SID level given a prefix.

        Args:
            enc: encoder output for B queries.
            sid_prefix: (B', t) long codes of levels 0..t-1, 0 <= t < L. ``B'`` equals B
                (e.g. after ``enc.repeat_interleave(k)``) or ``k * B`` with
                batch-major rows (row ``b*k + j`` is beam j of query b).

        Returns:
            (B', V_t) logits over the level-t codes.
        """
        if sid_prefix.dim() != 2:
            raise ValueError(f"sid_prefix must be (B', t); got shape {tuple(sid_prefix.shape)}.")
        level = sid_prefix.shape[1]
        if level >= self.num_levels:
            raise ValueError(f"sid_prefix has {level} levels; a SID has only {self.num_levels} (t must be < L).")
        states = self._decode_states(enc, sid_prefix.long())
        return self.heads[level](states[:, -1])

    # ------------------------------------------------------- incremental decoder
    def project_memory(self, enc: EncoderOutput) -> DecoderMemory:
        """Project the encoder memory for every decoder layer's cross block, once per query batch."""
        layers = tuple(layer.cross.project_memory(enc.layer_outputs) for layer in self.decoder_layers)
        return DecoderMemory(layers=layers, attn_mask=enc.attention_mask[:, None, None, :])

    def decode_step(
        self, memory: DecoderMemory, codes: Tensor, cache: DecoderCache | None
    ) -> tuple[Tensor, DecoderCache]:
        """Logits of the next SID level from the newest prefix position and the cache of the earlier ones.

        Equal (up to float rounding) to :meth:`decode_logits` on the whole prefix, in evaluation mode.

        Args:
            memory: :meth:`project_memory` of B queries.
            codes: (R, 1) long code of the previous level for every row, or (R, 0) at level 0;
                ``R = G * B`` batch-major rows (row ``b*G + j`` reads query b).
            cache: the :data:`DecoderCache` of the t earlier positions; None at level 0.

        Returns:
            (R, V_t) logits over the level-t codes and the cache extended by the newest position.
        """
        level = 0 if cache is None else cache[0][0].shape[2]
        rows = codes.shape[0]
        if level == 0:
            y = self.bos.expand(rows, -1)
        else:
            y = self.code_embeddings[level - 1](codes[:, -1]) * self.embed_scale
        y = (y + self.level_embedding.weight[level]).unsqueeze(1)
        new_cache = []
        for index, (layer, layer_memory) in enumerate(zip(self.decoder_layers, memory.layers)):
            past = (None, None) if cache is None else cache[index]
            y, keys, values = layer.step(y, *past, layer_memory, memory.attn_mask)
            new_cache.append((keys, values))
        return self.heads[level](self.decoder_norm(y[:, 0])), tuple(new_cache)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, sids: Tensor) -> list[Tensor]:
        """Teacher-forced logits for every level in one pass.

        Args:
            input_ids: (B, T) long; attention_mask: (B, T) bool, True = real token.
            sids: (B, L) long target SIDs.

        Returns:
            L tensors; entry l is (B, V_l), the level-l logits given ``sids[:, :l]``.
        """
        if sids.dim() != 2 or sids.shape[1] != self.num_levels:
            raise ValueError(f"sids must be (B, {self.num_levels}); got shape {tuple(sids.shape)}.")
        enc = self.encode(input_ids, attention_mask)
        states = self._decode_states(enc, sids[:, :-1].long())
        return [head(states[:, level]) for level, head in enumerate(self.heads)]

    def share_codebooks(self, codebooks: Sequence[nn.Parameter], heads: Sequence[nn.Module]) -> None:
        """Make ``codebooks[l]`` (V_l, d) the level-l input embedding table and ``heads[l]`` the level-l head.

        GRDR's shared codebook: a tokenizer's level-l codebook becomes the decoder's level-l
        vocabulary (the same ``Parameter``, not a copy); ``heads[l]`` maps (B', d) states to
        (B', V_l) logits (e.g. scaled cosine similarity to the same codebook). Call after
        construction: :meth:`reset_parameters` would re-initialise the shared tensors.
        """
        if len(codebooks) != self.num_levels or len(heads) != self.num_levels:
            raise ValueError(f"share_codebooks needs {self.num_levels} codebooks and heads, one per SID level.")
        for level, (codebook, head) in enumerate(zip(codebooks, heads)):
            if tuple(codebook.shape) != (self.sid_vocab_sizes[level], self.d_model):
                raise ValueError(
                    f"level-{level} codebook has shape {tuple(codebook.shape)}; the decoder needs "
                    f"({self.sid_vocab_sizes[level]}, {self.d_model})."
                )
            self.code_embeddings[level].weight = codebook
            self.heads[level] = head
