"""The Mamba-2 language model with the state-spaces parameter layout, so real Mamba-2 weights load key for key.

    Mamba2LM
      backbone.embedding                      (vocab, d_model)
      backbone.layers.N.norm                  RMSNorm
      backbone.layers.N.mixer.in_proj         d_model -> [z | xBC | dt]
      backbone.layers.N.mixer.conv1d          depthwise causal conv over xBC
      backbone.layers.N.mixer.{dt_bias, A_log, D}
      backbone.layers.N.mixer.norm            gated RMSNorm (per group)
      backbone.layers.N.mixer.out_proj        d_inner -> d_model
      backbone.norm_f                         RMSNorm
      lm_head                                 (tied to the embedding or not)

`forward` runs whole sequences (training, prefill); `step` runs one token against a `Mamba2Cache`.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from types import ModuleType, SimpleNamespace

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..ops import load_backend, resolve_backend_name
from ..ops.reference import discretize_dt
from .cache import Mamba2Cache
from .config import Mamba2Config


class RMSNorm(nn.Module):
    """Holds the weight of mamba_ssm's RMSNorm; the computation is the backend's `add_rmsnorm`."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))


class GatedRMSNorm(nn.Module):
    """Holds the weight of mamba_ssm's RMSNormGated; the computation is the backend's `gated_rmsnorm`."""

    def __init__(self, d: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.group_size = group_size
        self.weight = nn.Parameter(torch.ones(d))


class Mamba2Mixer(nn.Module):
    def __init__(self, config: Mamba2Config, layer_idx: int, kernels: ModuleType):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.kernels = kernels
        c = config
        self.in_proj = nn.Linear(c.d_model, c.d_in_proj, bias=c.bias)
        self.conv1d = nn.Conv1d(c.conv_dim, c.conv_dim, c.d_conv, groups=c.conv_dim, padding=c.d_conv - 1,
                                bias=c.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(c.nheads))
        self.A_log = nn.Parameter(torch.empty(c.nheads))
        self.D = nn.Parameter(torch.ones(c.nheads))
        self.norm = GatedRMSNorm(c.d_inner, group_size=c.d_inner // c.ngroups, eps=c.norm_eps)
        self.out_proj = nn.Linear(c.d_inner, c.d_model, bias=c.bias)

    def _project_in(self, u: Tensor, task: str | None) -> tuple[Tensor, Tensor, Tensor]:
        # `task` selects a task-specific LoRA route when in_proj carries one (OmniMamba, section 3.4).
        zxbcdt = self.in_proj(u) if task is None else self.in_proj(u, task=task)
        c = self.config
        return torch.split(zxbcdt, [c.d_inner, c.conv_dim, c.nheads], dim=-1)

    def _split_xbc(self, xBC: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c = self.config
        gn = c.ngroups * c.d_state
        return torch.split(xBC, [c.d_inner, gn, gn], dim=-1)

    def forward(
        self, u: Tensor, cache: Mamba2Cache | None = None, mask: Tensor | None = None, task: str | None = None,
        kernels: ModuleType | SimpleNamespace | None = None,
    ) -> Tensor:
        """u (b, l, d_model) -> (b, l, d_model). With a cache, continue from and update its state.

        mask (b, l), 1 for real tokens and 0 for left padding: padded positions feed zeros to the conv and
        have dt = 0, so the state they leave behind is exactly that of an unpadded sequence. `kernels`: a
        backend for this call instead of the mixer's own (the compiled training path's, ops/compiled.py).
        """
        c, k = self.config, kernels or self.kernels
        b, l, _ = u.shape
        z, xBC, dt = self._project_in(u, task)
        if mask is not None:
            xBC = xBC * mask[..., None].to(xBC.dtype)
        resume = cache is not None and cache.seqlen_offset > 0
        conv_in = cache.conv[self.layer_idx] if resume else None
        ssm_in = cache.ssm[self.layer_idx] if resume else None
        xBC, conv_state = k.causal_conv(xBC, self.conv1d.weight[:, 0], self.conv1d.bias, conv_in)
        x, B, C = self._split_xbc(xBC)
        dt = discretize_dt(dt, self.dt_bias, c.dt_limit)
        if mask is not None:
            dt = dt * mask[..., None].to(dt.dtype)
        A = -torch.exp(self.A_log.to(torch.promote_types(self.A_log.dtype, torch.float32)))
        y, ssm_state = k.ssd_chunked(
            x.reshape(b, l, c.nheads, c.headdim), dt, A,
            B.reshape(b, l, c.ngroups, c.d_state), C.reshape(b, l, c.ngroups, c.d_state),
            c.chunk_size, D=self.D, initial_state=ssm_in,
        )
        if cache is not None:
            cache.conv[self.layer_idx].copy_(conv_state)
            cache.ssm[self.layer_idx].copy_(ssm_state)
        y = k.gated_rmsnorm(y.reshape(b, l, c.d_inner), z, self.norm.weight, self.norm.eps, self.norm.group_size)
        return self.out_proj(y)

    def step(self, u: Tensor, cache: Mamba2Cache, task: str | None = None) -> Tensor:
        """One token: u (b, d_model) -> (b, d_model); updates the cache's state of this layer in place."""
        c, k = self.config, self.kernels
        b = u.size(0)
        z, xBC, dt = self._project_in(u, task)
        xBC = k.conv_step(cache.conv[self.layer_idx], xBC, self.conv1d.weight[:, 0], self.conv1d.bias)
        x, B, C = self._split_xbc(xBC)
        # softplus(dt + dt_bias), A = -exp(A_log) and the state update happen in one kernel on the GPU.
        y = k.ssd_decode(
            cache.ssm[self.layer_idx], x.reshape(b, c.nheads, c.headdim), dt, self.A_log,
            B.reshape(b, c.ngroups, c.d_state), C.reshape(b, c.ngroups, c.d_state), D=self.D,
            dt_bias=self.dt_bias, dt_limit=c.dt_limit,
        )
        y = k.gated_rmsnorm(y.reshape(b, c.d_inner), z, self.norm.weight, self.norm.eps, self.norm.group_size)
        return self.out_proj(y)


class Mamba2Block(nn.Module):
    """Pre-norm residual block, carrying the residual stream separately (mamba_ssm's `Block`)."""

    def __init__(self, config: Mamba2Config, layer_idx: int, kernels: ModuleType):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.mixer = Mamba2Mixer(config, layer_idx, kernels)

    def _add_and_norm(self, hidden: Tensor, residual: Tensor | None,
                      kernels: ModuleType | SimpleNamespace | None = None
                      ) -> tuple[Tensor, Tensor]:
        return (kernels or self.mixer.kernels).add_rmsnorm(hidden, residual, self.norm.weight, self.norm.eps,
                                                           self.residual_in_fp32)

    def forward(self, hidden, residual, cache=None, mask=None, task=None, kernels=None) -> tuple[Tensor, Tensor]:
        normed, residual = self._add_and_norm(hidden, residual, kernels)
        return self.mixer(normed, cache=cache, mask=mask, task=task, kernels=kernels), residual

    def step(self, hidden, residual, cache, task=None) -> tuple[Tensor, Tensor]:
        normed, residual = self._add_and_norm(hidden, residual)
        return self.mixer.step(normed, cache, task=task), residual


class Mamba2Backbone(nn.Module):
    # Activation checkpointing per block in training: keep each block's input only and recompute the block in
    # the backward (memory: one block's activations instead of every block's, for about a third more compute).
    gradient_checkpointing: bool = False
    # With checkpointing on: recompute the first N blocks only and keep the rest's activations (0: every block),
    # trading memory for the recomputation's time where the whole model's activations do not fit.
    checkpoint_blocks: int = 0
    # Decode steps without gradients run each block as three (up to 8 rows) or five fused kernels
    # (ops/fused_step.py) where the backend offers them and every layer fits; False keeps the unfused step (its
    # spec) everywhere.
    fused_decode: bool = True

    def __init__(self, config: Mamba2Config, kernels: ModuleType):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.layers = nn.ModuleList(Mamba2Block(config, i, kernels) for i in range(config.n_layer))
        self.norm_f = RMSNorm(config.d_model, config.norm_eps)

    # Training forwards (gradients on, no cache) run each block through torch.compile (`compile_blocks`).
    compiled: bool = False

    def set_kernels(self, kernels: ModuleType) -> None:
        for layer in self.layers:
            layer.mixer.kernels = kernels

    def compile_blocks(self, enabled: bool = True) -> None:
        """Run training forwards through torch.compile, one block at a time: the blocks share one compiled
        graph per task and shape (regional compilation), built on the first steps; prefill, decoding and
        evaluation stay eager. The gradients match eager's: on the reference kernels on a CPU
        (tests/test_compiled_training.py), on the fla backend on a GPU (tests/test_ops_gpu.py). The reference
        kernels on a GPU are refused: torch 2.11's inductor fails to generate the reference scan's cumsum there
        (benchmarks/compiled_grad_bisect.py --variants, 2026-12-07)."""
        if enabled:
            self._check_compilable()
        self.compiled = enabled

    def _on_fla(self) -> bool:
        return getattr(self.layers[0].mixer.kernels, "__name__", "") == "omnimamba.ops.fla"

    def _on_gpu(self) -> bool:
        return self.embedding.weight.is_cuda

    def _check_compilable(self) -> None:
        if self._on_gpu() and not self._on_fla():
            from ..errors import UserError

            raise UserError("compiled training blocks need the fla backend on a GPU (inductor cannot compile the "
                            "reference scan there): set run.backend: auto (with flash-linear-attention installed), "
                            "or run.compile: false")

    def _training_kernels(self) -> SimpleNamespace:
        from ..ops.compiled import training_kernels

        self._check_compilable()  # the model may have moved to a GPU since compile_blocks
        return training_kernels(self.config.d_state, self.config.headdim, self._on_gpu())

    def forward(
        self, inputs_embeds: Tensor, cache: Mamba2Cache | None = None, mask: Tensor | None = None,
        task: str | None = None,
    ) -> Tensor:
        """inputs_embeds (b, l, d_model) -> final hidden states (b, l, d_model)."""
        hidden, residual = inputs_embeds, None
        training = cache is None and torch.is_grad_enabled()
        recompute = self.n_recomputed() if training else 0
        if self.compiled and training:
            block, kernels = _compiled_block(), self._training_kernels()
        else:
            block, kernels = _eager_block, None
        for i, layer in enumerate(self.layers):
            if i < recompute:
                hidden, residual = checkpoint(block, layer, hidden, residual, mask, task, kernels,
                                              use_reentrant=False)
            else:
                hidden, residual = block(layer, hidden, residual, mask, task, kernels, cache)
        out = self._final_norm(hidden, residual)
        if cache is not None:
            cache.seqlen_offset += inputs_embeds.size(1)
        return out

    def n_recomputed(self) -> int:
        """How many blocks (the first ones) a training forward recomputes in the backward."""
        if not self.gradient_checkpointing:
            return 0
        return min(self.checkpoint_blocks, len(self.layers)) if self.checkpoint_blocks > 0 else len(self.layers)

    def step(self, inputs_embeds: Tensor, cache: Mamba2Cache, task: str | None = None) -> Tensor:
        """inputs_embeds (b, d_model) -> final hidden state (b, d_model); advances the cache by one."""
        weights = self._fused_weights(task) if self.fused_decode and not torch.is_grad_enabled() else None
        if weights is not None:
            return self._fused_step(inputs_embeds, cache, weights)
        hidden, residual = inputs_embeds, None
        for layer in self.layers:
            hidden, residual = layer.step(hidden, residual, cache, task=task)
        cache.seqlen_offset += 1
        return self._final_norm(hidden, residual)

    def _fused_weights(self, task: str | None) -> list[Tensor] | None:
        """Each layer's in_proj weight for `task` when every layer can take the fused step, else None. Asked
        again on every eager step (a few attribute reads per layer), since a route may be merged or unmerged
        between steps; a CUDA-graph replay skips it."""
        if not getattr(self.layers[0].mixer.kernels, "FUSED_DECODE", False) or not self.config.residual_in_fp32:
            return None
        from ..ops import fused_step

        weights = []
        for layer in self.layers:
            m = layer.mixer
            route_weight = getattr(m.in_proj, "route_weight", None)
            w = route_weight(task) if route_weight is not None else m.in_proj.weight if task is None else None
            biases = m.in_proj.bias is not None or m.out_proj.bias is not None
            if w is None or not fused_step.supports(self.config, w, m.out_proj.weight, biases):
                return None
            weights.append(w)
        return weights

    def _fused_step(self, inputs_embeds: Tensor, cache: Mamba2Cache, weights: list[Tensor]) -> Tensor:
        from ..ops.fused_step import decode_step

        out = decode_step(self.layers, weights, inputs_embeds, cache.conv, cache.ssm, self.norm_f.weight,
                          self.norm_f.eps)
        cache.seqlen_offset += 1
        return out

    def _final_norm(self, hidden: Tensor, residual: Tensor) -> Tensor:
        kernels = self.layers[0].mixer.kernels
        return kernels.add_rmsnorm(hidden, residual, self.norm_f.weight, self.norm_f.eps)[0]


def _eager_block(layer: Mamba2Block, hidden: Tensor, residual: Tensor | None, mask: Tensor | None,
                 task: str | None, kernels: ModuleType | SimpleNamespace | None,
                 cache: Mamba2Cache | None = None
                 ) -> tuple[Tensor, Tensor]:
    return layer(hidden, residual, cache=cache, mask=mask, task=task, kernels=kernels)


@functools.cache
def _compiled_block():
    """`_eager_block` under torch.compile, made on first use: one function for every block of every model, so
    dynamo's cache holds one graph per (task, mask or not, shapes) and not one per layer."""
    return torch.compile(_eager_block)


@torch.no_grad()
def init_mamba2_backbone_(backbone: Mamba2Backbone, c: Mamba2Config) -> None:
    """mamba_ssm's initialisation: dt log-uniform in [dt_min, dt_max], A uniform in A_init_range, embeddings
    N(0, 0.02), out_proj rescaled by 1/sqrt(n_layer) (GPT-2's prenorm-residual rule), norms at 1."""
    nn.init.normal_(backbone.embedding.weight, std=0.02)
    for layer in backbone.layers:
        m = layer.mixer
        for lin in (m.in_proj, m.out_proj):
            nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5))
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        m.out_proj.weight /= math.sqrt(c.n_layer)
        bound = 1 / math.sqrt(c.d_conv)
        nn.init.uniform_(m.conv1d.weight, -bound, bound)
        if m.conv1d.bias is not None:
            nn.init.uniform_(m.conv1d.bias, -bound, bound)
        dt = torch.exp(torch.rand(c.nheads) * (math.log(c.dt_max) - math.log(c.dt_min)) + math.log(c.dt_min))
        dt = dt.clamp(min=c.dt_init_floor)
        m.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        lo, hi = c.A_init_range
        m.A_log.copy_(torch.log(torch.empty(c.nheads).uniform_(lo, hi)))
        m.D.fill_(1.0)
        m.norm.weight.fill_(1.0)
        layer.norm.weight.fill_(1.0)
    backbone.norm_f.weight.fill_(1.0)


class Mamba2LM(nn.Module):
    """Mamba-2 language model: backbone + LM head. See the module docstring for the parameter layout."""

    def __init__(self, config: Mamba2Config, backend: str = "auto"):
        super().__init__()
        self.config = config
        self.backend = resolve_backend_name(backend)
        kernels = load_backend(self.backend)
        self.backbone = Mamba2Backbone(config, kernels)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        self.reset_parameters()
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    # --- set-up -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        init_mamba2_backbone_(self.backbone, self.config)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=0.02)

    def set_backend(self, backend: str) -> None:
        """Switch every mixer to another kernel backend ('auto', 'reference', ...)."""
        self.backend = resolve_backend_name(backend)
        self.backbone.set_kernels(load_backend(self.backend))

    def allocate_cache(self, batch_size: int, device=None, dtype=None, ssm_dtype=None) -> Mamba2Cache:
        p = self.lm_head.weight
        return Mamba2Cache.empty(self.config, batch_size, device or p.device, dtype or p.dtype, ssm_dtype=ssm_dtype)

    # --- input checks -----------------------------------------------------------------------------------
    def check_input_ids(self, input_ids: Tensor) -> None:
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if input_ids.numel() == 0 or (input_ids.dim() >= 2 and input_ids.size(-1) == 0):
            raise ValueError("input_ids is empty: give at least one token (e.g. a BOS token) to condition on")
        vocab = self.backbone.embedding.num_embeddings
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is out of range for a vocabulary of {vocab} (valid: 0..{vocab - 1})")

    # --- compute ----------------------------------------------------------------------------------------
    def forward(
        self, input_ids: Tensor, cache: Mamba2Cache | None = None, attention_mask: Tensor | None = None
    ) -> Tensor:
        """input_ids (b, l) -> logits (b, l, padded_vocab). attention_mask (b, l): 0 marks left padding."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}")
        self.check_input_ids(input_ids)
        hidden = self.backbone(self.backbone.embedding(input_ids), cache=cache, mask=attention_mask)
        return self.lm_head(hidden)

    def step(self, input_ids: Tensor, cache: Mamba2Cache) -> Tensor:
        """input_ids (b,) -> next-token logits (b, padded_vocab); O(1) in the sequence length."""
        self.check_input_ids(input_ids)
        return self.lm_head(self.backbone.step(self.backbone.embedding(input_ids), cache))

    def generate(self, input_ids: Tensor, max_new_tokens: int, **kwargs) -> Tensor:
        """Sample a continuation; see `omnimamba.generation.generate` for the options."""
        from ..generation import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)

    # --- checkpoints ------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, backend: str = "auto", dtype: torch.dtype | None = None) -> "Mamba2LM":
        """Load a local directory in the state-spaces or the transformers `Mamba2ForCausalLM` format."""
        from .checkpoint import load_mamba2

        return load_mamba2(path, backend=backend, dtype=dtype)

    def save_pretrained(self, path: str | Path) -> None:
        """Write config.json (state-spaces format) and model.safetensors (state-spaces key names)."""
        from .checkpoint import save_mamba2

        save_mamba2(self, path)
