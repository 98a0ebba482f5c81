"""Training configuration: frozen dataclasses that YAML / TOML files map onto 1:1, validated before any work.

Every field has a default. Stage defaults are the paper's Table 5 (1.3B): learning rate, warm-up, steps
and the MMU:T2I batch ratio; the optimiser is AdamW with betas (0.9, 0.95), no weight decay, gradient
clipping at 1.0 and a cosine schedule with warm-up (section 4.2).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError

STAGES = ("stage1-mmu", "stage1-t2i", "stage2-unified")


@dataclass(frozen=True)
class StageConfig:
    """One training stage. batch = (MMU samples, T2I samples) per optimiser step (global, all ranks)."""

    name: str = "stage2-unified"
    steps: int = 150_000
    lr: float = 1e-4
    warmup: int = 0
    batch: tuple[int, int] = (3, 48)
    min_lr_ratio: float = 0.0  # the cosine decays to lr * min_lr_ratio

    def __post_init__(self) -> None:
        object.__setattr__(self, "batch", tuple(int(b) for b in self.batch))
        if self.name not in STAGES:
            raise UserError(f"unknown stage {self.name!r}; stages are {list(STAGES)}")
        if self.steps < 1:
            raise UserError(f"stage {self.name}: steps must be >= 1, got {self.steps}")
        if not self.lr > 0:
            raise UserError(f"stage {self.name}: lr must be > 0, got {self.lr}")
        if self.warmup < 0:
            raise UserError(f"stage {self.name}: warmup must be >= 0, got {self.warmup}")
        if len(self.batch) != 2 or min(self.batch) < 0 or sum(self.batch) == 0:
            raise UserError(f"stage {self.name}: batch is the MMU:T2I ratio as two non-negative counts, "
                            f"not both 0; got {list(self.batch)}")
        need = {"stage1-mmu": (True, False), "stage1-t2i": (False, True)}.get(self.name)
        if need and (bool(self.batch[0]) != need[0] or bool(self.batch[1]) != need[1]):
            raise UserError(f"stage {self.name} trains one task: its batch must be "
                            f"{'[N, 0]' if need[0] else '[0, N]'}, got {list(self.batch)}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise UserError(f"stage {self.name}: min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    def lr_at(self, step: int) -> float:
        """Linear warm-up to lr, then cosine decay to lr * min_lr_ratio at the last step."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        floor = self.lr * self.min_lr_ratio
        return floor + (self.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# Table 5 of the paper (1.3B).
PAPER_STAGES = (
    StageConfig("stage1-mmu", steps=5_000, lr=1e-3, warmup=100, batch=(256, 0)),
    StageConfig("stage1-t2i", steps=100_000, lr=8e-4, warmup=1_000, batch=(0, 720)),
    StageConfig("stage2-unified", steps=150_000, lr=1e-4, warmup=0, batch=(3, 48)),
)


@dataclass(frozen=True)
class ModelSection:
    preset: str = "omnimamba-1.3b"
    overrides: dict = field(default_factory=dict)  # OmniMambaConfig fields, e.g. {caption_dropout: 0.1}
    init: str | None = None      # an OmniMamba directory to start from
    mamba2: str | None = None    # a Mamba-2 checkpoint directory (state-spaces or transformers)
    vq: str | None = None        # LlamaGen's VQ checkpoint, or a VQ directory written by omnimamba
    # a trained tokenizer directory for an understanding encoder of its own architecture (understanding.vq);
    # None: the run trains one (run.out/understanding-vq)
    understanding_vq: str | None = None
    tokenizer: str | None = None  # tokenizer.json (real presets); the Shapes tokenizer otherwise
    train_understanding: bool = False  # only for encoders without pretrained weights (shapes-tiny)


@dataclass(frozen=True)
class ShapesSection:
    seed: int = 0
    image_size: int = 64
    train_images: int = 20_000
    textured_background: float = 0.3
    # Questions per MMU sequence, drawn at random from 1 to this (LLaVA-style multi-turn): an image's
    # features are read once for several answers; the first turn keeps the single-question format.
    max_turns: int = 1
    # Keep one of an image's three "no" existence questions per example, so existence answers are half "yes"
    # (otherwise three "no" to one "yes": an undertrained model answers "no" to everything)
    balance_existence: bool = False
    # T2I trains on each scene drawn on a plain background: no caption mentions the texture, whose noise is
    # most of a textured image's code entropy (README, "T2I on plain renders"); MMU still sees the image as drawn
    t2i_plain: bool = False
    # Of the examples whose scene has two objects in a clear relation (about 1 in 8), the share made to train that
    # relation on top of the uniform draw: T2I takes the scene's relation caption ("a red circle left of a blue
    # square"), MMU asks the spatial question in place of one drawn turn. 0 keeps the uniform draw, under which 3 %
    # of T2I examples carry a relation caption against 25 % of the evaluation's prompts (its "position" category).
    relation_share: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.relation_share <= 1.0:
            raise UserError(f"data.shapes.relation_share is a share of examples, from 0 to 1; got {self.relation_share}")
        if self.max_turns < 1:
            raise UserError(f"data.shapes.max_turns must be >= 1, got {self.max_turns}")
        if self.train_images < 1:
            raise UserError(f"data.shapes.train_images must be >= 1, got {self.train_images}")


@dataclass(frozen=True)
class DataSection:
    source: str = "shapes"           # "shapes" | "files"
    shapes: ShapesSection = field(default_factory=ShapesSection)
    llava: str | None = None         # LLaVA conversation JSON / JSONL (MMU)
    coco: str | None = None          # COCO captions JSON (T2I)
    image_root: str | None = None    # image paths are relative to this (default: each file's folder)
    skip_bad: bool = False           # count, log and skip malformed samples instead of stopping
    codes_cache: str | None = None   # where T2I image codes are cached (default: <run.out>/codes.safetensors)


@dataclass(frozen=True)
class OptimSection:
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    eps: float = 1e-8
    grad_clip: float = 1.0
    fused: bool | None = None    # torch's fused AdamW (one pass over all parameters); None: wherever it has one


@dataclass(frozen=True)
class VQTrainSection:
    """Training the VQ tokenizer of the embedded default (skipped when model.vq names a checkpoint)."""

    steps: int = 0
    lr: float = 2e-3
    batch: int = 32
    foreground_weight: float = 0.0  # extra reconstruction weight on pixels away from the background colour
    # which codes move every 20 steps: "dead" (unused ones, onto random latents) | "split" (also rarely used
    # ones, onto the latents the codebook quantises worst); training/vq.py restart_codes
    restart: str = "dead"


@dataclass(frozen=True)
class RunSection:
    out: str = "runs/omnimamba"
    seed: int = 0
    device: str = "auto"         # "auto" | "cpu" | "cuda" | "cuda:N"
    precision: str = "auto"      # "auto" (bf16 autocast on GPU, fp32 on CPU) | "bf16" | "fp32"
    # Mamba-2 kernels: "auto" (fla's Triton kernels on a GPU where installed, else pure PyTorch) | "reference"
    # (pure PyTorch everywhere: nothing to compile, which a small model's short run may prefer) | "fla"
    backend: str = "auto"
    log_every: int = 10
    eval_every: int = 0          # 0: evaluate at the end of each stage only
    ckpt_every: int = 500
    eval_images: int = 50        # Shapes validation images for MMU evaluation
    eval_prompts: int = 24       # Shapes validation prompts for T2I evaluation
    eval_guidance: float = 3.0
    eval_top_k: int = 0          # image-code sampling during evaluation: keep the k most likely codes (0 = all)
    eval_temperature: float = 1.0  # ... and its temperature
    eval_epsilon: float = 0.0    # ... and its floor on the conditional probability (generation.epsilon_floor)
    tensorboard: bool = True
    progress: bool = True
    strategy: str = "ddp"        # multi-process: "ddp" | "fsdp" (FSDP2)
    # memory options (same losses and gradients; README, Training): recompute each backbone block in the backward,
    # and apply the output heads + cross-entropy to target positions only, this many at a time (0: all at once)
    activation_checkpointing: bool = False
    checkpoint_blocks: int = 0   # with activation_checkpointing: recompute the first N blocks only (0: every block)
    loss_chunk: int = 0
    # sequences per task in one forward on a process (0: its whole share of the step); the rest accumulate
    micro_batch: int = 0
    # run each backbone block's training forward + backward through torch.compile (same gradients as eager: the
    # reference kernels on a CPU, fla's on a GPU; the reference kernels on a GPU are refused, compile_blocks)
    compile: bool = False


@dataclass(frozen=True)
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    stages: tuple[StageConfig, ...] = PAPER_STAGES
    vq_train: VQTrainSection = field(default_factory=VQTrainSection)
    run: RunSection = field(default_factory=RunSection)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        if not self.stages:
            raise UserError("train config: 'stages' is empty")
        if self.data.source not in ("shapes", "files"):
            raise UserError(f"data.source must be 'shapes' or 'files', got {self.data.source!r}")
        if self.data.source == "files":
            needs = {"mmu": any(s.batch[0] for s in self.stages), "t2i": any(s.batch[1] for s in self.stages)}
            if needs["mmu"] and not self.data.llava:
                raise UserError("data.source is 'files' and a stage trains MMU: set data.llava")
            if needs["t2i"] and not self.data.coco:
                raise UserError("data.source is 'files' and a stage trains T2I: set data.coco")
        for name in ("init", "mamba2", "vq", "understanding_vq", "tokenizer"):
            _check_path(getattr(self.model, name), f"model.{name}")
        for name in ("llava", "coco", "image_root"):
            _check_path(getattr(self.data, name), f"data.{name}")
        if self.run.precision not in ("auto", "bf16", "fp32"):
            raise UserError(f"run.precision must be auto, bf16 or fp32, got {self.run.precision!r}")
        from ..ops import BACKENDS
        from .vq import RESTART_MODES

        if self.run.backend not in ("auto", *BACKENDS):
            raise UserError(f"run.backend must be one of {', '.join(('auto', *BACKENDS))}, got {self.run.backend!r}")
        if self.run.strategy not in ("ddp", "fsdp"):
            raise UserError(f"run.strategy must be ddp or fsdp, got {self.run.strategy!r}")
        if self.optim.grad_clip <= 0 or self.optim.weight_decay < 0:
            raise UserError("optim.grad_clip must be > 0 and optim.weight_decay >= 0")
        if self.vq_train.steps < 0 or self.vq_train.lr <= 0 or self.vq_train.batch < 1:
            raise UserError("vq_train: steps >= 0, lr > 0 and batch >= 1 are required")
        if self.vq_train.restart not in RESTART_MODES:
            raise UserError(f"vq_train.restart must be one of {', '.join(RESTART_MODES)}, got {self.vq_train.restart!r}")
        if self.run.eval_temperature < 0 or self.run.eval_top_k < 0:
            raise UserError("run.eval_temperature and run.eval_top_k must be >= 0")
        if not 0 <= self.run.eval_epsilon < 1:
            raise UserError(f"run.eval_epsilon must be in [0, 1) (0: no floor), got {self.run.eval_epsilon}")
        if self.run.compile and self.run.strategy == "fsdp":
            raise UserError("run.compile is not supported with run.strategy fsdp yet (FSDP2's per-block hooks "
                            "around compiled blocks are untested): use strategy ddp, or compile: false")
        for name, zero in (("micro_batch", "the whole batch at once"), ("checkpoint_blocks", "recompute every block"),
                           ("loss_chunk", "no chunking")):
            if getattr(self.run, name) < 0:
                raise UserError(f"run.{name} must be >= 0 (0: {zero}), got {getattr(self.run, name)}")
        for name in ("log_every", "ckpt_every"):
            if getattr(self.run, name) < 1:
                raise UserError(f"run.{name} must be >= 1")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_path(value: str | None, name: str) -> None:
    if value is not None and not Path(value).exists():
        raise UserError(f"{name}: path does not exist: {value}")


# --- building from nested dicts, with errors that name the field -------------------------------------------
_SECTIONS = {
    TrainConfig: {"model": ModelSection, "data": DataSection, "optim": OptimSection, "vq_train": VQTrainSection,
                  "run": RunSection},
    DataSection: {"shapes": ShapesSection},
}


def _build(cls, raw: Any, where: str):
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a mapping, got {type(raw).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - names)
    if unknown:
        raise UserError(f"{where}: unknown field(s) {unknown}; known fields: {sorted(names)}")
    kwargs = {}
    for key, value in raw.items():
        sub = _SECTIONS.get(cls, {}).get(key)
        if sub is not None:
            kwargs[key] = _build(sub, value, f"{where}.{key}")
        elif cls is TrainConfig and key == "stages":
            if not isinstance(value, list):
                raise UserError(f"{where}.stages: expected a list of stages")
            kwargs[key] = tuple(_build(StageConfig, s, f"{where}.stages[{i}]") for i, s in enumerate(value))
        else:
            kwargs[key] = _coerce(value, hints.get(key), f"{where}.{key}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"{where}: {e}") from e


def _coerce(value: Any, hint, where: str) -> Any:
    """`value` as the field's type, or a UserError naming the field. Numbers written as strings (YAML reads
    1e-4 as a string) become numbers; lists become tuples."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # X | None
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)

    def fail():
        name = getattr(hint, "__name__", str(hint))
        return UserError(f"{where}: expected {'a list of ' + str(len(args)) + ' numbers' if origin is tuple and Ellipsis not in args else name}, got {value!r}")

    if hint is bool:
        if not isinstance(value, bool):
            raise fail()
        return value
    if hint in (int, float):
        if isinstance(value, bool):
            raise fail()
        try:
            number = hint(value) if isinstance(value, (str, int, float)) else None
        except (ValueError, OverflowError):
            number = None
        if number is None or (hint is int and isinstance(value, float) and not value.is_integer()):
            raise fail()
        if isinstance(number, float) and not math.isfinite(number):
            raise UserError(f"{where}: expected a finite number, got {value!r}")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise fail()
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise fail()
        items = args[:1] * len(value) if Ellipsis in args else args
        if len(items) != len(value):
            raise fail()
        return tuple(_coerce(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, items)))
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise fail()
    return value


def config_from_dict(raw: dict) -> TrainConfig:
    return _build(TrainConfig, raw, "train")


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file (a YAML or TOML run config is expected)") from None
    try:
        if path.suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib
            return tomllib.loads(text)
        import yaml

        return yaml.safe_load(text) or {}
    except Exception as e:  # a parse error: name the file
        raise UserError(f"{path}: cannot parse ({e})") from e


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`--set a.b.c=value` (value parsed as YAML; list items by index: stages.0.steps=10)."""
    import copy

    import yaml

    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. optim.grad_clip=0.5")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise UserError(f"--set {item!r}: {key!r} is not a dotted field name, e.g. run.out")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise UserError(f"--set {key}: cannot parse the value {value!r} ({e})") from None
        node = raw
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                index = _index(part, key)
                if not -len(node) <= index < len(node):
                    raise UserError(f"--set {key}: there is no item {index} (the list has {len(node)})")
                if last:
                    node[index] = parsed
                else:
                    node = node[index]
            elif isinstance(node, dict):
                if last:
                    node[part] = parsed
                else:
                    if part == "stages" and "stages" not in node:
                        node["stages"] = [dataclasses.asdict(s) for s in PAPER_STAGES]
                    node = node.setdefault(part, {})
            else:
                raise UserError(f"--set {key}: {'.'.join(parts[:i])} is a value ({node!r}), not a section")
    return raw


def _index(part: str, key: str) -> int:
    try:
        return int(part)
    except ValueError:
        raise UserError(f"--set {key}: {part!r} is not a list index") from None


def load_train_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    raw = read_config_file(path) if path else {}
    return config_from_dict(apply_overrides(raw, list(overrides)))
