"""OmniMamba (paper section 3): one Mamba-2 backbone for understanding (MMU) and generation (T2I).

    backbone            Mamba-2 (state-spaces layout), every in_proj carrying an MMU and a T2I LoRA route
    lm_head             text head over the text vocabulary (+ special tokens)
    projector           Prismatic fused GELU MLP: understanding features -> d_model
    understanding       DINOv2 + SigLIP (timm), CLIP, or the tiny conv encoder; frozen after stage 0
    image_embedding     image-code embedding: word_embeddings (K, d) -> project_in MLP (official release)
    image_head          head over the K image codes (decoupled vocabularies, section 3.3)
    t2i_pos_embed       learned positions over the T2I sequence (official release)
    caption_embed       MLP over the caption's text embeddings, with a learned null caption for CFG
    mmu_pos_embed       learned positions over the MMU sequence (official release; config.mmu_positions)
    vq                  the LlamaGen VQ tokenizer (frozen): images <-> codes

Ablation switches (Table 4): `decoupled_vocab=False` puts image codes into the text vocabulary (one
embedding, one head, trained with one cross-entropy over text and image ids, so the model has to learn which
modality to emit; sampling masks the other modality, the post-processing the paper says such a model needs);
`task_lora=False` drops the LoRA routes.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from ..decoding import StepRunnerPool
from ..errors import UserError
from ..lora import TaskLoRALinear, add_task_lora, check_task
from ..mamba2 import Mamba2Cache
from ..mamba2.model import Mamba2Backbone, init_mamba2_backbone_
from ..ops import load_backend, resolve_backend_name
from ..sequence import IGNORE_INDEX, MMUBatch, SpecialIds, T2IBatch, mmu_prefix_ids
from ..vision.understanding import FusedMLPProjector, build_understanding_encoder, merge_patches
from ..vision.vq import VQModel
from .checkpoint import CheckpointMixin
from .config import OmniMambaConfig
from .embeddings import CaptionEmbedder, ImageTokenEmbedding
from .generate import GenerationMixin
from .loss import token_loss


class OmniMamba(GenerationMixin, CheckpointMixin, nn.Module):
    def __init__(self, config: OmniMambaConfig, backend: str = "auto"):
        super().__init__()
        self.config = config
        c, d = config, config.backbone.d_model
        self.backend = resolve_backend_name(backend)
        self.backbone = Mamba2Backbone(c.backbone, load_backend(self.backend))
        if c.task_lora:
            add_task_lora(self.backbone, rank=c.lora_rank, alpha=c.lora_alpha, dropout=c.lora_dropout)
        self.lm_head = nn.Linear(d, c.backbone.padded_vocab_size, bias=False)
        self.understanding = build_understanding_encoder(c.understanding, c.vq)
        merge = c.understanding.spatial_merge
        self.projector = FusedMLPProjector(self.understanding.feature_dim * merge * merge, d)
        if c.decoupled_vocab:
            self.image_embedding = ImageTokenEmbedding(c.vq.codebook_size, d)
            self.image_head = nn.Linear(d, c.vq.codebook_size, bias=False)
        self.t2i_pos_embed = nn.Parameter(torch.randn(1, c.t2i_length, d) * 0.02)
        self.caption_embed = CaptionEmbedder(d, c.max_caption_tokens,
                                             learned_null=c.conventions == "omnimamba")
        if c.mmu_positions:
            self.mmu_pos_embed = nn.Parameter(torch.randn(1, c.mmu_positions, d) * 0.02)
        self.vq = VQModel(c.vq)
        self.vq.requires_grad_(False)
        self._init_backbone()
        self.tie_weights()
        self._runners = StepRunnerPool()  # captured decode steps, see _step_runner
        self._decode_routes: dict[str, int] = {}  # route -> generations running with merged weights

    @torch.no_grad()
    def _init_backbone(self) -> None:
        init_mamba2_backbone_(self.backbone, self.config.backbone)
        nn.init.normal_(self.lm_head.weight, std=0.02)

    def tie_weights(self) -> None:
        if self.config.backbone.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight
            if self.config.decoupled_vocab:
                self.image_head.weight = self.image_embedding.word_embeddings.weight

    def set_backend(self, backend: str) -> None:
        """Switch every mixer to another kernel backend ('auto', 'reference', 'fla')."""
        self.backend = resolve_backend_name(backend)
        self.backbone.set_kernels(load_backend(self.backend))
        self._runners.clear()  # captured steps launch the old backend's kernels

    # --- vocabularies -----------------------------------------------------------------------------------
    @property
    def special(self) -> SpecialIds:
        return self.config.special

    def _image_ids(self, codes: Tensor) -> Tensor:
        """Unified-vocabulary ablation: image code c is text-vocabulary id text_vocab_size + c."""
        return codes + self.config.text_vocab_size

    def embed_image_codes(self, codes: Tensor) -> Tensor:
        if self.config.decoupled_vocab:
            return self.image_embedding(codes)
        return self.backbone.embedding(self._image_ids(codes))

    def image_logits(self, hidden: Tensor) -> Tensor:
        """(..., d) -> (..., K) logits over image codes only: T2I mode cannot emit a text token."""
        if self.config.decoupled_vocab:
            return self.image_head(hidden)
        # Unified vocabulary: one head over text + image ids; restricting it to the image ids is the
        # post-processing the paper reports such a model needs (section 4.6).
        start = self.config.text_vocab_size
        return self.lm_head(hidden)[..., start:start + self.config.vq.codebook_size]

    def unified_logits(self, hidden: Tensor) -> Tensor:
        """Unified-vocabulary ablation: (..., d) -> (..., text_vocab + K) logits over every text and image id,
        what its training cross-entropy is taken over."""
        return self.lm_head(hidden)[..., : self.config.text_vocab_size + self.config.vq.codebook_size]

    def text_logits(self, hidden: Tensor) -> Tensor:
        """(..., d) -> (..., text_vocab) logits over text tokens only (no padding rows, no image codes)."""
        return self.lm_head(hidden)[..., : self.config.text_vocab_size]

    # --- MMU ----------------------------------------------------------------------------------------
    @property
    def image_positions(self) -> int:
        """Sequence positions an image takes in MMU: the encoder's patches after spatial merging."""
        return self.understanding.num_patches // self.config.understanding.spatial_merge ** 2

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """(b, 3, H, W) in [0, 1] -> projected image embeddings (b, n_patches, d_model). The pixels take the
        encoders' dtype (a bf16 model is given float32 pixels by a loader that knows nothing of it)."""
        pixel_values = pixel_values.to(next(self.understanding.parameters()).dtype)
        features = merge_patches(self.understanding(pixel_values), self.config.understanding.spatial_merge)
        return self.projector(features)

    def mmu_embeddings(self, pixel_values: Tensor, text_ids: Tensor, text_mask: Tensor | None = None) -> Tensor:
        """[MMU][SOI]{image}[EOI][SOT]{text} as embeddings (b, 4 + n + T, d), with the learned MMU positions
        for a model that has them (config.mmu_positions). `text_mask` (b, T) marks the text's real tokens:
        padding takes no position, so each row's positions are those it has alone."""
        before, after = mmu_prefix_ids(self.special)
        b = text_ids.size(0)
        emb = self.backbone.embedding
        pre = emb(torch.tensor(before, device=text_ids.device)).expand(b, -1, -1)
        mid = emb(torch.tensor(after, device=text_ids.device)).expand(b, -1, -1)
        image = self.encode_images(pixel_values).to(pre.dtype)
        x = torch.cat([pre, image, mid, emb(text_ids)], dim=1)
        if not self.config.mmu_positions:
            return x
        if text_mask is None:
            self.check_mmu_length(x.size(1))
            return x + self.mmu_pos_embed[0, : x.size(1)].to(x.dtype)
        mask = torch.cat([text_mask.new_ones(b, x.size(1) - text_ids.size(1)), text_mask], 1)
        position = mask.cumsum(1) - 1
        self.check_mmu_length(int(position.max()) + 1)
        return x + (self.mmu_positions(position.clamp(min=0)) * mask[..., None]).to(x.dtype)

    def mmu_length(self, n_text: int) -> int:
        """Tokens in [MMU][SOI]{image}[EOI][SOT]{text} for n_text text tokens: where the answer starts."""
        before, after = mmu_prefix_ids(self.special)
        return len(before) + self.image_positions + len(after) + n_text

    def check_mmu_length(self, length: int) -> None:
        """An MMU sequence of `length` tokens (image, prompt and answer) must fit the learned positions."""
        n = self.config.mmu_positions
        if n and length > n:
            raise UserError(f"MMU sequence of {length} tokens is longer than the model's {n} positions (image, "
                            f"prompt and answer together); shorten the prompt or max_new_tokens")

    def mmu_positions(self, positions: Tensor) -> Tensor:
        """Learned MMU position embeddings at `positions` (any shape; unchecked: see check_mmu_length)."""
        return self.mmu_pos_embed[0][positions]

    def forward_mmu(self, batch: MMUBatch, reduction: str = "mean") -> tuple[Tensor, ...]:
        """(logits over the text part (b, T, text_vocab), mean loss on the answer tokens); with
        reduction='sum': (logits, summed loss, number of target tokens)."""
        self._check_text_ids(batch.text_ids)
        x = self.mmu_embeddings(batch.pixel_values, batch.text_ids)
        hidden = self.backbone(x, task=self._route("mmu"))
        T = batch.text_ids.size(1)
        # The hidden state before text token t predicts it: positions -T-1 .. -2.
        if self.config.decoupled_vocab:
            return self._loss(hidden[:, -T - 1:-1], self.text_logits, batch.labels, reduction)
        return self._loss(hidden[:, -T - 1:-1], self.unified_logits, batch.labels, reduction,
                          own=slice(0, self.config.text_vocab_size))

    # --- T2I ----------------------------------------------------------------------------------------
    def t2i_prefix_embeddings(self, prefix_ids: Tensor, prefix_mask: Tensor, caption_mask: Tensor,
                              drop: Tensor | None) -> Tensor:
        x = self.caption_embed(self.backbone.embedding(prefix_ids), caption_mask, drop)
        return x + self._t2i_positions(prefix_mask, 0)

    @property
    def t2i_image_start(self) -> int:
        """Position of the first image code: [T2I][SOT], max_caption_tokens caption slots, [EOT][SOI]."""
        return 4 + self.config.max_caption_tokens

    def _t2i_positions(self, prefix_mask: Tensor, offset: int, length: int | None = None) -> Tensor:
        """Positional embeddings in the official release's fixed layout, whatever a caption's length: [T2I]
        and [SOT] at 0 and 1, the caption right-aligned in its max_caption_tokens slots, [EOT][SOI] just
        before image code j at t2i_image_start + j. Rows are left-padded (mask 0 on padding), so a code's
        position, and so its place in the image grid, never depends on the caption.
        length None: the prefix's own positions (b, P); else `length` image positions from code `offset`."""
        if length is None:
            k = prefix_mask.long().cumsum(1) - 1  # index of each real token within its row
            shift = self.t2i_image_start - prefix_mask.long().sum(1, keepdim=True)
            pos = torch.where(k < 2, k, k + shift).clamp(min=0)
        else:
            pos = self.t2i_image_start + offset + torch.arange(length, device=prefix_mask.device)
        if int(pos.max()) >= self.config.t2i_length:
            raise UserError(f"T2I sequence longer than the model's {self.config.t2i_length} positions")
        return self.t2i_pos_embed[0][pos]

    def forward_t2i(self, batch: T2IBatch, drop: Tensor | None = None, reduction: str = "mean") -> tuple[Tensor, ...]:
        """(logits over image codes (b, N, K), mean loss on the codes); reduction='sum' as forward_mmu.
        `drop` (b,) marks captions replaced by the null caption; None draws them at `caption_dropout` in
        training mode."""
        self._check_text_ids(batch.prefix_ids)
        b, N = batch.image_codes.shape
        if N != self.config.image_tokens:
            raise UserError(f"expected {self.config.image_tokens} image codes per image, got {N}")
        if drop is None:
            drop = batch.drop
        if drop is None and self.training and self.config.caption_dropout > 0:
            drop = torch.rand(b, device=batch.image_codes.device) < self.config.caption_dropout
        prefix = self.t2i_prefix_embeddings(batch.prefix_ids, batch.prefix_mask, batch.caption_mask, drop)
        eoi = self.backbone.embedding(torch.full((b, 1), self.special.eoi, device=prefix.device))
        image = torch.cat([self.embed_image_codes(batch.image_codes), eoi], dim=1)
        image = image + self._t2i_positions(batch.prefix_mask, 0, N + 1)
        x = torch.cat([prefix, image.to(prefix.dtype)], dim=1)
        mask = torch.cat([batch.prefix_mask, torch.ones(b, N + 1, dtype=batch.prefix_mask.dtype,
                                                         device=prefix.device)], dim=1)
        hidden = self.backbone(x, mask=mask, task=self._route("t2i"))
        P = batch.prefix_ids.size(1)
        if self.config.decoupled_vocab:
            return self._loss(hidden[:, P - 1:P - 1 + N], self.image_logits, batch.image_codes, reduction)
        codes = batch.image_codes
        targets = torch.where(codes == IGNORE_INDEX, codes, self._image_ids(codes))
        return self._loss(hidden[:, P - 1:P - 1 + N], self.unified_logits, targets, reduction,
                          own=slice(self.config.text_vocab_size, None))

    # --- helpers ------------------------------------------------------------------------------------
    # Tokens per chunk of the output head and cross-entropy in training: 0 applies the head to every position
    # at once (and returns the logits); N > 0 only to positions with a target, N at a time, each chunk's logits
    # recomputed in the backward (memory: one chunk's logits instead of (tokens, vocabulary) in float32; the
    # forward then returns no logits). Set by the training config's run.loss_chunk.
    loss_chunk: int = 0

    def _loss(self, hidden: Tensor, head, targets: Tensor, reduction: str,
              own: slice | None = None) -> tuple[Tensor | None, ...]:
        """(logits or None, summed loss, target count) for reduction 'sum'; (logits or None, mean loss). `own`:
        the part of the head's vocabulary the logits returned keep (a unified vocabulary's task modality)."""
        logits, loss, tokens = token_loss(hidden, head, targets, self.loss_chunk)
        if own is not None and logits is not None:
            logits = logits[..., own]
        if reduction == "sum":
            return logits, loss, tokens
        return logits, loss / tokens.clamp(min=1)

    def _route(self, task: str) -> str | None:
        check_task(task)
        return task if self.config.task_lora else None

    def _check_text_ids(self, ids: Tensor) -> None:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.text_vocab_size):
            raise UserError(f"text token ids must lie in 0..{self.config.text_vocab_size - 1}")

    def allocate_cache(self, batch_size: int, device=None, ssm_dtype=None) -> Mamba2Cache:
        """A decoding cache; its SSM state in `ssm_dtype`, by default the decoding state's dtype on that device
        (`state_dtype_on`: bf16 on a GPU unless `decode_state_dtype` says otherwise)."""
        p = self.lm_head.weight
        device = device or p.device
        return Mamba2Cache.empty(self.config.backbone, batch_size, device, p.dtype,
                                 ssm_dtype=ssm_dtype or self.state_dtype_on(device))

    def forward(self, mmu: MMUBatch | None = None, t2i: T2IBatch | None = None,
                t2i_drop: Tensor | None = None) -> dict[str, Tensor]:
        """Both tasks in one call (stage 2 sums their losses for one backward; DDP needs one forward).

        Returns per task `<task>_logits`, `<task>_loss` (mean over its target tokens), `<task>_loss_sum` and
        `<task>_tokens` (for normalising across processes), and `loss`, the sum of the task losses.
        """
        if mmu is None and t2i is None:
            raise ValueError("give an MMU batch, a T2I batch or both")
        out: dict[str, Tensor] = {}
        if mmu is not None:
            out["mmu_logits"], out["mmu_loss_sum"], out["mmu_tokens"] = self.forward_mmu(mmu, reduction="sum")
        if t2i is not None:
            out["t2i_logits"], out["t2i_loss_sum"], out["t2i_tokens"] = self.forward_t2i(t2i, t2i_drop,
                                                                                        reduction="sum")
        for task in ("mmu", "t2i"):
            if f"{task}_loss_sum" in out:
                out[f"{task}_loss"] = out[f"{task}_loss_sum"] / out[f"{task}_tokens"].clamp(min=1)
        out["loss"] = sum(out[f"{t}_loss"] for t in ("mmu", "t2i") if f"{t}_loss" in out)
        return out

    def task_forward(self, batch, task: str) -> tuple[Tensor, Tensor]:
        """One task by name: (logits, mean loss)."""
        out = self(**{check_task(task): batch})
        return out[f"{task}_logits"], out[f"{task}_loss"]

    @torch.no_grad()
    def init_understanding_from_vq(self, vq: VQModel | None = None) -> bool:
        """For a 'vq-encoder' understanding encoder: copy a trained tokenizer's encoder weights: `vq`'s, or the
        generation tokenizer's when the understanding encoder shares its architecture (config.understanding.vq
        None; otherwise, with no `vq`, nothing is copied). True if copied."""
        u = self.config.understanding
        if u.kind != "vq-encoder" or (vq is None and u.vq is not None):
            return False
        vq = vq or self.vq
        if u.vq is not None and vq.config != u.vq:
            raise UserError(f"the understanding encoder is a {u.vq} encoder; this tokenizer is a {vq.config}")
        self.understanding.encoder.load_state_dict(vq.encoder.state_dict())
        return True

    def merge_lora(self, task: str) -> None:
        """Fold one task's LoRA route into the in_proj weights (inference for that task only)."""
        self._runners.clear()  # captured steps ran the route unmerged
        for layer in self.backbone.layers:
            if isinstance(layer.mixer.in_proj, TaskLoRALinear):
                layer.mixer.in_proj.merge(check_task(task))

    def unmerge_lora(self) -> None:
        self._runners.clear()
        for layer in self.backbone.layers:
            if isinstance(layer.mixer.in_proj, TaskLoRALinear):
                layer.mixer.in_proj.unmerge()

    # --- the user-facing API (see omnimamba.inference) -------------------------------------------------
    tokenizer = None  # a TextTokenizer, set by from_pretrained when the directory holds tokenizer.json

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise UserError("this model has no tokenizer: set model.tokenizer = TextTokenizer.from_file(...) "
                            "or load a directory that holds tokenizer.json (for the official weights: "
                            "GPT-NeoX-20B's tokenizer.json beside the checkpoint)")
        return self.tokenizer

    def answer(self, image, question, **kwargs):
        """Answer a question about an image (or lists of both); see `omnimamba.inference.answer`."""
        from ..inference import answer

        return answer(self, self._require_tokenizer(), image, question, **kwargs)

    def generate_images(self, prompts, **kwargs):
        """PIL images for text prompts; see `omnimamba.inference.generate_images`."""
        from ..inference import generate_images

        return generate_images(self, self._require_tokenizer(), prompts, **kwargs)
