"""OmniMamba (paper section 3): one Mamba-2 backbone for understanding (MMU) and generation (T2I).

    backbone            Mamba-2 (state-spaces layout), every in_proj carrying an MMU and a T2I LoRA route
    lm_head             text head over the text vocabulary (+ special tokens)
    projector           Prismatic fused GELU MLP: understanding features -> d_model
    understanding       DINOv2 + SigLIP (timm), CLIP, or the tiny conv encoder; frozen after stage 0
    image_embedding     image-code embedding: word_embeddings (K, d) -> project_in MLP (official release)
    image_head          head over the K image codes (decoupled vocabularies, section 3.3)
    t2i_pos_embed       learned positions over the T2I sequence (official release)
    caption_embed       MLP over the caption's text embeddings, with a learned null caption for CFG
    vq                  the LlamaGen VQ tokenizer (frozen): images <-> codes

Ablation switches (Table 4): `decoupled_vocab=False` puts image codes into the text vocabulary (one
embedding, one head); `task_lora=False` drops the LoRA routes.
"""

from __future__ import annotations

import dataclasses
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .decoding import StepRunner, StepRunnerPool, graphs_enabled
from .errors import UserError
from .generation import check_sampling_args, make_generator, sample_next_token
from .lora import TaskLoRALinear, add_task_lora, check_task
from .mamba2 import Mamba2Cache, Mamba2Config
from .mamba2 import preset as mamba2_preset
from .mamba2.model import Mamba2Backbone, init_mamba2_backbone_
from .ops import load_backend, resolve_backend_name
from .sequence import IGNORE_INDEX, MMUBatch, SpecialIds, T2IBatch, mmu_prefix_ids
from .vision.understanding import FusedMLPProjector, UnderstandingConfig, build_understanding_encoder
from .vision.vq import VQConfig, VQModel


@dataclass(frozen=True)
class OmniMambaConfig:
    backbone: Mamba2Config = field(default_factory=lambda: mamba2_preset("mamba2-1.3b", vocab_size=50283))
    understanding: UnderstandingConfig = field(default_factory=UnderstandingConfig)
    vq: VQConfig = field(default_factory=VQConfig.vq16)
    # Base text vocabulary (tokenizer without OmniMamba's six special tokens, which follow it).
    text_base_vocab_size: int = 50277
    max_caption_tokens: int = 68   # 68 + 5 specials = the official release's 73 caption positions
    caption_dropout: float = 0.1   # rate at which training replaces a caption by the null caption (CFG)
    task_lora: bool = True
    lora_rank: int = 8
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    decoupled_vocab: bool = True

    def __post_init__(self) -> None:
        need = self.text_vocab_size + (0 if self.decoupled_vocab else self.vq.codebook_size)
        if not self.decoupled_vocab and self.backbone.vocab_size < need:
            # Unified-vocabulary ablation: the codebook is appended to the text vocabulary.
            object.__setattr__(self, "backbone", self.backbone.replace(vocab_size=need))
        if self.backbone.padded_vocab_size < need:
            raise UserError(f"OmniMambaConfig: the backbone's embedding has {self.backbone.padded_vocab_size} "
                            f"rows but the vocabulary needs {need}; raise backbone.vocab_size")
        if self.lora_rank < 1 and self.task_lora:
            raise UserError(f"OmniMambaConfig.lora_rank must be >= 1, got {self.lora_rank}")
        if not 0 <= self.caption_dropout < 1:
            raise UserError(f"OmniMambaConfig.caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.max_caption_tokens < 1:
            raise UserError(f"OmniMambaConfig.max_caption_tokens must be >= 1, got {self.max_caption_tokens}")

    @property
    def text_vocab_size(self) -> int:
        return self.text_base_vocab_size + 6

    @property
    def special(self) -> SpecialIds:
        return SpecialIds.after(self.text_base_vocab_size)

    @property
    def image_tokens(self) -> int:
        return self.vq.num_tokens

    @property
    def t2i_length(self) -> int:
        """Longest T2I sequence: [T2I][SOT]{caption}[EOT][SOI]{codes}[EOI]."""
        return 5 + self.max_caption_tokens + self.image_tokens

    def replace(self, **changes) -> "OmniMambaConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "OmniMambaConfig":
        raw = dict(raw)
        try:
            parts = {
                "backbone": Mamba2Config(**raw.pop("backbone")),
                "understanding": UnderstandingConfig(**raw.pop("understanding")),
                "vq": VQConfig(**raw.pop("vq")),
            }
            return cls(**parts, **raw)
        except (KeyError, TypeError) as e:
            raise UserError(f"not an OmniMamba config: {e}") from e


def shapes_tiny_config(text_base_vocab_size: int | None = None) -> OmniMambaConfig:
    """The embedded default: trains end to end on a CPU in minutes (see `omnimamba quickstart`)."""
    if text_base_vocab_size is None:
        from .tokenizer import TextTokenizer

        text_base_vocab_size = TextTokenizer.shapes().base_vocab_size
    vocab = text_base_vocab_size + 6
    return OmniMambaConfig(
        backbone=Mamba2Config(d_model=128, n_layer=4, vocab_size=vocab, pad_vocab_size_multiple=8, d_state=32,
                              headdim=32, chunk_size=64, tie_embeddings=True),
        understanding=UnderstandingConfig(kind="vq-encoder", image_size=64),
        vq=VQConfig.tiny(),
        text_base_vocab_size=text_base_vocab_size,
        max_caption_tokens=24,
        lora_dropout=0.0,
    )


PRESETS = {
    # The paper: Mamba-2-1.3B, DINOv2 + SigLIP at 384 px, LlamaGen VQ-16 at 256 px (256 image tokens).
    "omnimamba-1.3b": lambda: OmniMambaConfig(),
    # The paper's ablations (section 4.6): Mamba-2-370M, CLIP at 224 px.
    "omnimamba-370m-ablation": lambda: OmniMambaConfig(
        backbone=mamba2_preset("mamba2-370m", vocab_size=50283),
        understanding=UnderstandingConfig(backbones=("vit_large_patch14_clip_224.openai",), image_size=224),
    ),
    "shapes-tiny": shapes_tiny_config,
}


def preset(name: str, **overrides) -> OmniMambaConfig:
    if name not in PRESETS:
        raise UserError(f"unknown OmniMamba preset {name!r}; known presets: {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    return cfg.replace(**overrides) if overrides else cfg


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

    def __init__(self, d_model: int, max_caption_tokens: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_model, bias=False)
        self.fc2 = nn.Linear(d_model, d_model, bias=False)
        self.null_caption = nn.Parameter(torch.randn(max_caption_tokens, d_model) / d_model ** 0.5)

    def forward(self, embeds: Tensor, caption_mask: Tensor, drop: Tensor | None) -> Tensor:
        """embeds (b, P, d); caption_mask (b, P) True on caption tokens; drop (b,) True to drop."""
        if drop is not None and bool(drop.any()):
            # position of each caption token within its caption: 0, 1, 2, ...
            idx = (caption_mask.long().cumsum(1) - 1).clamp(min=0)
            null = self.null_caption[idx]
            replace = caption_mask & drop[:, None]
            embeds = torch.where(replace[..., None], null.to(embeds.dtype), embeds)
        return self.fc2(F.gelu(self.fc1(embeds), approximate="tanh"))


class OmniMamba(nn.Module):
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
        self.projector = FusedMLPProjector(self.understanding.feature_dim, d)
        if c.decoupled_vocab:
            self.image_embedding = ImageTokenEmbedding(c.vq.codebook_size, d)
            self.image_head = nn.Linear(d, c.vq.codebook_size, bias=False)
        self.t2i_pos_embed = nn.Parameter(torch.randn(1, c.t2i_length, d) * 0.02)
        self.caption_embed = CaptionEmbedder(d, c.max_caption_tokens)
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

    def text_logits(self, hidden: Tensor) -> Tensor:
        """(..., d) -> (..., text_vocab) logits over text tokens only (no padding rows, no image codes)."""
        return self.lm_head(hidden)[..., : self.config.text_vocab_size]

    # --- MMU ----------------------------------------------------------------------------------------
    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """(b, 3, H, W) in [0, 1] -> projected image embeddings (b, n_patches, d_model)."""
        return self.projector(self.understanding(pixel_values))

    def mmu_embeddings(self, pixel_values: Tensor, text_ids: Tensor) -> Tensor:
        """[MMU][SOI]{image}[EOI][SOT]{text} as embeddings (b, 4 + n + T, d)."""
        before, after = mmu_prefix_ids(self.special)
        b = text_ids.size(0)
        emb = self.backbone.embedding
        pre = emb(torch.tensor(before, device=text_ids.device)).expand(b, -1, -1)
        mid = emb(torch.tensor(after, device=text_ids.device)).expand(b, -1, -1)
        image = self.encode_images(pixel_values).to(pre.dtype)
        return torch.cat([pre, image, mid, emb(text_ids)], dim=1)

    def forward_mmu(self, batch: MMUBatch, reduction: str = "mean") -> tuple[Tensor, ...]:
        """(logits over the text part (b, T, text_vocab), mean loss on the answer tokens); with
        reduction='sum': (logits, summed loss, number of target tokens)."""
        self._check_text_ids(batch.text_ids)
        x = self.mmu_embeddings(batch.pixel_values, batch.text_ids)
        hidden = self.backbone(x, task=self._route("mmu"))
        T = batch.text_ids.size(1)
        # The hidden state before text token t predicts it: positions -T-1 .. -2.
        logits = self.text_logits(hidden[:, -T - 1:-1])
        return _loss(logits, batch.labels, reduction)

    # --- T2I ----------------------------------------------------------------------------------------
    def t2i_prefix_embeddings(self, prefix_ids: Tensor, prefix_mask: Tensor, caption_mask: Tensor,
                              drop: Tensor | None) -> Tensor:
        x = self.caption_embed(self.backbone.embedding(prefix_ids), caption_mask, drop)
        return x + self._t2i_positions(prefix_mask, 0)

    def _t2i_positions(self, prefix_mask: Tensor, offset: int, length: int | None = None) -> Tensor:
        """Positional embeddings for left-padded rows: position 0 is each row's first real token."""
        if length is None:
            pos = prefix_mask.long().cumsum(1) - 1
        else:
            start = prefix_mask.long().sum(1, keepdim=True)
            pos = start + offset + torch.arange(length, device=prefix_mask.device)
        pos = pos.clamp(min=0)
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
        logits = self.image_logits(hidden[:, P - 1:P - 1 + N])
        return _loss(logits, batch.image_codes, reduction)

    # --- helpers ------------------------------------------------------------------------------------
    def _route(self, task: str) -> str | None:
        check_task(task)
        return task if self.config.task_lora else None

    def _check_text_ids(self, ids: Tensor) -> None:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.text_vocab_size):
            raise UserError(f"text token ids must lie in 0..{self.config.text_vocab_size - 1}")

    def allocate_cache(self, batch_size: int, device=None, ssm_dtype=None) -> Mamba2Cache:
        p = self.lm_head.weight
        return Mamba2Cache.empty(self.config.backbone, batch_size, device or p.device, p.dtype, ssm_dtype=ssm_dtype)

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
    def init_understanding_from_vq(self) -> bool:
        """For a 'vq-encoder' understanding encoder: copy the (trained) tokenizer's encoder weights."""
        if self.config.understanding.kind != "vq-encoder":
            return False
        self.understanding.encoder.load_state_dict(self.vq.encoder.state_dict())
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

    # --- generation ---------------------------------------------------------------------------------
    # Generation runs each route's in_proj as one GEMM on a merged copy W + dW (one per route, made on first
    # use and refreshed when a generation starts): the unmerged LoRA costs two extra small GEMMs per layer
    # and step, about a fifth of a decode step at batch 1. Set False to save the copies' memory.
    decode_with_merged_lora: bool = True
    # dtype of the SSM state while generating: None is float32. torch.bfloat16 (what mamba_ssm uses for bf16
    # models) halves the state's memory traffic, most of a step at batch 32 (16 images with guidance).
    decode_state_dtype: torch.dtype | None = None

    @contextmanager
    def _decoder(self, kind: str, batch_size: int, device: torch.device, use_cuda_graph: bool | None):
        """For one generation: the route's merged weights active, and a step runner held (see _step_runner)."""
        with self._merged_route(self._route("mmu" if kind == "text" else "t2i")):
            runner = self._step_runner(kind, batch_size, device, use_cuda_graph)
            runner.in_use = True
            try:
                yield runner
            finally:
                runner.in_use = False

    @contextmanager
    def _merged_route(self, route: str | None):
        layers = [layer.mixer.in_proj for layer in self.backbone.layers
                  if isinstance(layer.mixer.in_proj, TaskLoRALinear)]
        if route is None or not layers or not self.decode_with_merged_lora or layers[0].merged_task is not None:
            yield
            return
        if not self._decode_routes.get(route):
            for layer in layers:
                layer.refresh_decode_weight(route)
                layer.decode_active.add(route)
        self._decode_routes[route] = self._decode_routes.get(route, 0) + 1
        try:
            yield
        finally:
            self._decode_routes[route] -= 1
            if not self._decode_routes[route]:
                for layer in layers:
                    layer.decode_active.discard(route)

    def _step_runner(self, kind: str, batch_size: int, device: torch.device, use_cuda_graph: bool | None
                     ) -> StepRunner:
        """The decode step of `kind` ('text': token -> hidden; 'image': (code, position) -> hidden) over a
        cache of `batch_size` rows. Graphed runners are kept and reused (capture once per batch size and
        task); an eager one, or a graphed one already in use by another generation, gets a fresh cache."""
        route = self._route("mmu" if kind == "text" else "t2i")
        graph = graphs_enabled(use_cuda_graph, self, device)

        def build(use_graph: bool) -> StepRunner:
            cache = self.allocate_cache(batch_size, device, ssm_dtype=self.decode_state_dtype)
            zeros = torch.zeros(batch_size, dtype=torch.long, device=device)
            if kind == "text":
                def fn(tokens):
                    return self.backbone.step(self.backbone.embedding(tokens), cache, task=route)
                return StepRunner(fn, cache, (zeros,), use_graph)

            def fn(codes, positions):
                emb = self.embed_image_codes(codes) + self.t2i_pos_embed[0][positions]
                return self.backbone.step(emb, cache, task=route)
            return StepRunner(fn, cache, (zeros, zeros), use_graph)

        if graph:
            w = self.lm_head.weight
            key = (kind, batch_size, route, w.device, w.dtype, w.data_ptr(), self.decode_with_merged_lora,
                   self.decode_state_dtype)
            runner = self._runners.get(key, lambda: build(True))
            if not runner.in_use:
                runner.cache.reset()
                return runner
        return build(False)

    @torch.no_grad()
    def generate_text(self, pixel_values: Tensor, prompt_ids: Tensor, prompt_mask: Tensor | None = None,
                      max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                      seed: int | None = None, stream: bool = False, stop_at_eot: bool = True,
                      use_cuda_graph: bool | None = None):
        """MMU: answer tokens (b, new) after [MMU][SOI]{image}[EOI][SOT]{prompt}; stops at [EOT] (unless
        stop_at_eot=False, which generates max_new_tokens whatever comes, for benchmarks).

        prompt_ids (b, T) left-padded with prompt_mask. With stream=True, yields each step's tokens (b,).
        use_cuda_graph: replay each decode step as a CUDA graph; None means on for CUDA models in eval mode.
        """
        gen = self._generate_text(pixel_values, prompt_ids, prompt_mask, max_new_tokens, temperature, top_k,
                                  top_p, seed, stop_at_eot, use_cuda_graph)
        if stream:
            return gen
        steps = list(gen)
        return torch.stack(steps, 1) if steps else prompt_ids.new_zeros(prompt_ids.size(0), 0)

    @torch.no_grad()
    def _generate_text(self, pixel_values, prompt_ids, prompt_mask, max_new_tokens, temperature, top_k, top_p,
                       seed, stop_at_eot, use_cuda_graph):
        check_sampling_args(temperature, top_k, top_p)
        self._check_text_ids(prompt_ids)
        b, T = prompt_ids.shape
        if prompt_mask is None:
            prompt_mask = torch.ones_like(prompt_ids)
        x = self.mmu_embeddings(pixel_values, prompt_ids)
        n_img = x.size(1) - T
        # A prompt's left padding falls between the image and the text: move it to the front, where the
        # mask makes it leave the state exactly as if it were not there.
        mask = torch.cat([torch.ones(b, n_img, dtype=prompt_mask.dtype, device=x.device), prompt_mask], 1)
        mask, x = self._move_padding_left(mask, x)
        device = x.device
        with self._decoder("text", b, device, use_cuda_graph) as runner:
            hidden = self.backbone(x, cache=runner.cache, mask=mask, task=self._route("mmu"))[:, -1].clone()
            del x, mask  # nothing as long as the prompt outlives the prefill: decoding memory stays constant
            generator = make_generator(seed, device)
            finished = torch.zeros(b, dtype=torch.bool, device=device)
            eot = self.special.eot
            for i in range(max_new_tokens):
                logits = self.text_logits(hidden).float().clone()
                eot_logit = logits[:, eot].clone()
                logits[:, self.config.text_base_vocab_size:] = float("-inf")  # no special token but [EOT]
                logits[:, eot] = eot_logit
                token = sample_next_token(logits, temperature, top_k, top_p, generator)
                if stop_at_eot:
                    token = token.masked_fill(finished, eot)
                    finished |= token == eot
                yield token
                if stop_at_eot and bool(finished.all()):
                    return
                if i < max_new_tokens - 1:
                    hidden = runner(token)

    @staticmethod
    def _move_padding_left(mask: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """Reorder each row so its padded positions come first (the state then ignores them exactly)."""
        order = torch.sort(mask, dim=1, stable=True).indices  # zeros (padding) first, order kept
        return mask.gather(1, order), x.gather(1, order[..., None].expand_as(x))

    @torch.no_grad()
    def generate_image_codes(self, prefix_ids: Tensor, prefix_mask: Tensor, caption_mask: Tensor,
                             guidance_scale: float = 1.0, temperature: float = 1.0, top_k: int = 0,
                             top_p: float = 1.0, seed: int | None = None, progress=None,
                             use_cuda_graph: bool | None = None) -> Tensor:
        """T2I: image codes (b, N) for left-padded prefixes [T2I][SOT]{caption}[EOT][SOI].

        guidance_scale s: 1 samples from the conditional logits alone; any other s >= 0 runs conditional and
        null-caption rows in one batch and mixes their logits as uncond + s * (cond - uncond).
        use_cuda_graph: replay each decode step as a CUDA graph; None means on for CUDA models in eval mode.
        """
        check_sampling_args(temperature, top_k, top_p)
        if guidance_scale < 0:
            raise UserError(f"guidance_scale must be >= 0, got {guidance_scale}")
        self._check_text_ids(prefix_ids)
        b = prefix_ids.size(0)
        cfg = guidance_scale != 1.0
        if cfg:
            prefix_ids, prefix_mask, caption_mask = (torch.cat([t, t]) for t in (prefix_ids, prefix_mask,
                                                                                  caption_mask))
            drop = torch.arange(2 * b, device=prefix_ids.device) >= b
        else:
            drop = None
        N = self.config.image_tokens
        self._t2i_positions(prefix_mask, N - 1, 1)  # checks, once, that the last position exists
        start = prefix_mask.long().sum(1)
        with self._decoder("image", prefix_ids.size(0), prefix_ids.device, use_cuda_graph) as runner:
            x = self.t2i_prefix_embeddings(prefix_ids, prefix_mask, caption_mask, drop)
            hidden = self.backbone(x, cache=runner.cache, mask=prefix_mask, task=self._route("t2i"))[:, -1].clone()
            del x
            generator = make_generator(seed, prefix_ids.device)
            codes = []
            steps = range(N) if progress is None else progress(range(N))
            for i in steps:
                logits = self.image_logits(hidden).float()
                if cfg:
                    logits = cfg_logits(logits[:b], logits[b:], guidance_scale)
                token = sample_next_token(logits, temperature, top_k, top_p, generator)
                codes.append(token)
                if i == N - 1:
                    break
                hidden = runner(torch.cat([token, token]) if cfg else token, start + i)
        return torch.stack(codes, 1)

    # --- the user-facing API (see omnimamba.inference) -------------------------------------------------
    tokenizer = None  # a TextTokenizer, set by from_pretrained when the directory holds tokenizer.json

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise UserError("this model has no tokenizer: set model.tokenizer = TextTokenizer.from_file(...) "
                            "or load a directory that holds tokenizer.json")
        return self.tokenizer

    def answer(self, image, question, **kwargs):
        """Answer a question about an image (or lists of both); see `omnimamba.inference.answer`."""
        from .inference import answer

        return answer(self, self._require_tokenizer(), image, question, **kwargs)

    def generate_images(self, prompts, **kwargs):
        """PIL images for text prompts; see `omnimamba.inference.generate_images`."""
        from .inference import generate_images

        return generate_images(self, self._require_tokenizer(), prompts, **kwargs)

    # --- checkpoints --------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, tokenizer=None, state_dict: dict | None = None) -> None:
        """config.json + model.safetensors (+ tokenizer.json): everything `from_pretrained` needs.
        `state_dict` replaces the module's own (e.g. the gathered full state of an FSDP-sharded model)."""
        from safetensors.torch import save_file, save_model

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps({"omnimamba": self.config.to_dict()}, indent=2) + "\n")
        if state_dict is None:
            save_model(self, str(path / "model.safetensors"), metadata={"format": "pt"})
        else:
            tied = {"lm_head.weight", "image_head.weight"} if self.config.backbone.tie_embeddings else set()
            save_file({k: v.contiguous() for k, v in state_dict.items() if k not in tied},
                      str(path / "model.safetensors"), metadata={"format": "pt"})
        tokenizer = tokenizer or self.tokenizer
        if tokenizer is not None:
            tokenizer.save(path / "tokenizer.json")

    @classmethod
    def from_pretrained(cls, path: str | Path, backend: str = "auto") -> "OmniMamba":
        from safetensors.torch import load_model

        path = Path(path)
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise UserError(f"{path}: not an OmniMamba model directory (no config.json)")
        raw = json.loads(cfg_path.read_text())
        if "omnimamba" not in raw:
            raise UserError(f"{cfg_path}: not an OmniMamba config (no 'omnimamba' key)")
        config = OmniMambaConfig.from_dict(raw["omnimamba"])
        # The encoders' weights are in model.safetensors: do not read their original files again.
        config = config.replace(understanding=config.understanding.replace(weights=()))
        model = cls(config, backend=backend)
        weights = path / "model.safetensors"
        if not weights.is_file():
            raise UserError(f"{path}: model.safetensors not found")
        missing, unexpected = load_model(model, str(weights), strict=False)
        if missing or unexpected:
            raise UserError(f"{weights} does not match its config: missing {missing[:8]}, "
                            f"unexpected {unexpected[:8]}")
        if (path / "tokenizer.json").is_file():
            from .tokenizer import TextTokenizer

            model.tokenizer = TextTokenizer.from_file(path / "tokenizer.json")
        return model.eval()

    @classmethod
    def from_components(cls, config: OmniMambaConfig, mamba2_path: str | Path | None = None,
                        vq_path: str | Path | None = None, backend: str = "auto") -> "OmniMamba":
        """Build a preset from separately supplied local weights: a Mamba-2 checkpoint directory (state-spaces
        or transformers format), LlamaGen's VQ checkpoint; the understanding encoders' files are named in
        `config.understanding.weights`. New parts (LoRA, projector, image head...) start from scratch."""
        from .mamba2 import Mamba2LM

        model = cls(config, backend=backend)
        if mamba2_path is not None:
            lm = Mamba2LM.from_pretrained(mamba2_path, backend="reference")
            if lm.config.d_model != config.backbone.d_model or lm.config.n_layer != config.backbone.n_layer:
                raise UserError(f"{mamba2_path}: d_model/n_layer {lm.config.d_model}/{lm.config.n_layer} do not "
                                f"match the preset's {config.backbone.d_model}/{config.backbone.n_layer}")
            rows = model.backbone.embedding.num_embeddings
            if lm.backbone.embedding.num_embeddings != rows:
                raise UserError(f"{mamba2_path}: embedding has {lm.backbone.embedding.num_embeddings} rows, "
                                f"the preset {rows}")
            own = model.backbone.state_dict()
            for k, v in lm.backbone.state_dict().items():
                own[k].copy_(v)
            if not config.backbone.tie_embeddings:
                model.lm_head.weight.data.copy_(lm.lm_head.weight)
        if vq_path is not None:
            model.vq.load_state_dict(VQModel.from_llamagen(vq_path, config.vq).state_dict())
            model.init_understanding_from_vq()
        return model


def _loss(logits: Tensor, targets: Tensor, reduction: str) -> tuple[Tensor, ...]:
    flat = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    tokens = (targets != IGNORE_INDEX).sum()
    if reduction == "sum":
        return logits, flat, tokens
    return logits, flat / tokens.clamp(min=1)


def parameter_report(preset_name: str) -> str:
    """A table of parameters per module of a preset (built on the meta device: no memory, no weights)."""
    with torch.device("meta"):
        model = OmniMamba(preset(preset_name), backend="reference")
    groups: dict[str, int] = {}
    for name, p in model.named_parameters():
        key = "task LoRA (in_proj)" if "lora_" in name else name.split(".")[0]
        groups[key] = groups.get(key, 0) + p.numel()
    total = sum(groups.values())
    backbone = groups.get("backbone", 0)
    embedding = model.backbone.embedding.weight.numel()
    lora = groups.get("task LoRA (in_proj)", 0)
    lines = [f"{preset_name}: {total:,} parameters", f"{'module':<24}{'parameters':>16}{'share':>9}"]
    for key, n in sorted(groups.items(), key=lambda kv: -kv[1]):
        lines.append(f"{key:<24}{n:>16,}{n / total:>9.2%}")
    if lora:
        lines.append(f"task LoRA vs the Mamba-2 backbone: {lora / backbone:.2%} of all its weights, "
                     f"{lora / (backbone - embedding):.2%} of its weights without the (tied) embedding")
    return "\n".join(lines)


def cfg_logits(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance as in LlamaGen / Show-o: uncond + s * (cond - uncond)."""
    return uncond + scale * (cond - uncond)
