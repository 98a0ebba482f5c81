"""Task-specific LoRA (OmniMamba section 3.4): one low-rank route per task on each Mamba-2 `in_proj`.

Only the active task's route runs; the other is neither computed nor given gradients. The layer stays an
`nn.Linear`, so the base weight keeps its upstream key (`...mixer.in_proj.weight`) and real Mamba-2 weights load.
Routes add `in_proj.lora_A.<task>.weight` (r, in) and `in_proj.lora_B.<task>.weight` (out, r).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

TASKS = ("mmu", "t2i")


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; OmniMamba's tasks are {list(TASKS)}")
    return task


class TaskLoRALinear(nn.Linear):
    """y = x W^T + b + (alpha / r) * B_task A_task dropout(x), with one (A, B) pair per task.

    B starts at zero, so a fresh route leaves the base layer unchanged (LoRA's initialisation).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, rank: int = 8,
                 alpha: float = 32.0, dropout: float = 0.0, tasks: tuple[str, ...] = TASKS):
        super().__init__(in_features, out_features, bias=bias)
        if rank <= 0:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.rank = rank
        self.scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.ModuleDict({t: nn.Linear(in_features, rank, bias=False) for t in tasks})
        self.lora_B = nn.ModuleDict({t: nn.Linear(rank, out_features, bias=False) for t in tasks})
        self.merged_task: str | None = None
        self._weight_before_merge: Tensor | None = None
        # Decode-time copies W + dW_task (see `refresh_decode_weight`), used while their task is active.
        self.decode_weights: dict[str, Tensor] = {}
        self.decode_active: set[str] = set()
        self.reset_lora()

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "TaskLoRALinear":
        """Wrap an existing layer, sharing (not copying) its weight and bias."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, **kwargs)
        layer.to(device=linear.weight.device, dtype=linear.weight.dtype)
        layer.weight = linear.weight
        layer.bias = linear.bias
        return layer

    @torch.no_grad()
    def reset_lora(self) -> None:
        for t in self.lora_A:
            nn.init.kaiming_uniform_(self.lora_A[t].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[t].weight)

    def delta_weight(self, task: str) -> Tensor:
        """(out, in): the route's contribution to W when merged."""
        return self.scaling * self.lora_B[task].weight @ self.lora_A[task].weight

    @torch.no_grad()
    def refresh_decode_weight(self, task: str) -> Tensor:
        """(Re)compute a separate merged copy W + dW_task, in place when it exists (captured CUDA graphs keep
        reading the same buffer). Inference with it is one GEMM instead of three; the weight is untouched."""
        merged = self.weight + self.delta_weight(task).to(self.weight.dtype)
        buffer = self.decode_weights.get(task)
        if buffer is None or buffer.shape != merged.shape or buffer.device != merged.device \
                or buffer.dtype != merged.dtype:
            self.decode_weights[task] = merged
        else:
            buffer.copy_(merged)
        return self.decode_weights[task]

    def route_weight(self, task: str | None) -> Tensor | None:
        """The one matrix `forward(x, task)` multiplies by (the weight, or a merged decode copy), or None where
        the route runs as extra LoRA GEMMs (or cannot run). Fused decode kernels take it."""
        if self.merged_task is None and task in self.decode_active:
            return self.decode_weights[task]
        return self.weight if task is None or task == self.merged_task else None

    def forward(self, x: Tensor, task: str | None = None) -> Tensor:
        if self.merged_task is None and task in self.decode_active:
            return F.linear(x, self.decode_weights[task], self.bias)
        out = F.linear(x, self.weight, self.bias)
        if task is None or task == self.merged_task:
            return out
        if task not in self.lora_A:
            raise ValueError(f"unknown task {task!r}; this layer has LoRA routes {list(self.lora_A)}")
        if self.merged_task is not None:
            raise RuntimeError(f"the {self.merged_task!r} route is merged into the weight; unmerge() before "
                               f"running task {task!r}")
        low = self.lora_A[task](self.lora_dropout(x))
        # out + scaling * low B^T in one GEMM (addmm): fewer kernels per decode step than matmul, scale, add.
        fused = torch.addmm(out.reshape(-1, out.size(-1)), low.reshape(-1, low.size(-1)),
                            self.lora_B[task].weight.t(), alpha=self.scaling)
        return fused.view(out.shape)

    @torch.no_grad()
    def merge(self, task: str) -> None:
        """Fold the route into the weight for inference (no extra matmuls). Exactly undone by `unmerge`."""
        if self.merged_task == task:
            return
        if self.merged_task is not None:
            self.unmerge()
        self._weight_before_merge = self.weight.detach().clone()
        self.weight += self.delta_weight(task).to(self.weight.dtype)
        self.merged_task = task

    @torch.no_grad()
    def unmerge(self) -> None:
        # Restored from a copy, not by subtraction: W + dW - dW is not W bit for bit in floating point.
        if self.merged_task is None:
            return
        self.weight.copy_(self._weight_before_merge)
        self._weight_before_merge = None
        self.merged_task = None


def add_task_lora(backbone: nn.Module, rank: int = 8, alpha: float = 32.0, dropout: float = 0.0) -> int:
    """Replace every Mamba-2 mixer's in_proj by a TaskLoRALinear; returns how many were replaced."""
    count = 0
    for layer in backbone.layers:
        mixer = layer.mixer
        if not isinstance(mixer.in_proj, TaskLoRALinear):
            mixer.in_proj = TaskLoRALinear.from_linear(mixer.in_proj, rank=rank, alpha=alpha, dropout=dropout)
            count += 1
    return count
