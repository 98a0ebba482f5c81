"""The T2I side's own embeddings: image codes (decoupled vocabulary) and the caption embedder with its
learned null caption (classifier-free guidance)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..vision.understanding import FusedMLPProjector


class ImageTokenEmbedding(nn.Module):
    """Image-code embedding of the official release: a table, then a fused GELU MLP."""

    def __init__(self, codebook_size: int, d_model: int):
        super().__init__()
        self.word_embeddings = nn.Embedding(codebook_size, d_model)
        self.project_in = FusedMLPProjector(d_model, d_model)
        nn.init.normal_(self.word_embeddings.weight, std=0.02)

    def forward(self, codes: Tensor) -> Tensor:
        return self.project_in(self.word_embeddings(codes))


class CaptionEmbedder(nn.Module):
    """MLP over the caption's text embeddings (LlamaGen/AiM style); dropped captions become a learned
    null caption, one vector per caption position, which is what classifier-free guidance conditions on."""

    def __init__(self, d_model: int, max_caption_tokens: int, learned_null: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_model, bias=False)
        self.fc2 = nn.Linear(d_model, d_model, bias=False)
        # The official release has none: its unconditional caption is a text ("A picture").
        self.null_caption = (nn.Parameter(torch.randn(max_caption_tokens, d_model) / d_model ** 0.5)
                             if learned_null else None)

    def forward(self, embeds: Tensor, caption_mask: Tensor, drop: Tensor | None) -> Tensor:
        """embeds (b, P, d); caption_mask (b, P) True on caption tokens; drop (b,) True to drop."""
        # In training (drop given) the null caption joins the graph even when no caption is dropped here, so its
        # gradient is zeros rather than None: under FSDP2 a parameter with a gradient on one process and none on
        # another desynchronises the processes' collectives (seen: 2 GPUs hung at step 1 when one process's share
        # of the batch had no dropped caption). Inference (drop None) skips it.
        if drop is not None and (self.null_caption is not None or bool(drop.any())):
            if self.null_caption is None:
                from ..errors import UserError

                raise UserError("this model has no learned null caption (official conventions): guidance runs "
                                "its unconditional rows on the null prompt's text instead")
            # position of each caption token within its caption: 0, 1, 2, ...
            idx = (caption_mask.long().cumsum(1) - 1).clamp(min=0)
            null = self.null_caption[idx]
            replace = caption_mask & drop[:, None]
            embeds = torch.where(replace[..., None], null.to(embeds.dtype), embeds)
        return self.fc2(F.gelu(self.fc1(embeds), approximate="tanh"))
