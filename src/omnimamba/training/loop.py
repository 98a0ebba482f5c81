"""The training loop: named stages run in order, one process or many (torchrun: DDP, or FSDP2 for models
that do not fit one GPU), with exact resumption, metrics, periodic evaluation and checkpoints."""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import UserError
from ..model import PRESETS, OmniMamba, preset
from ..tokenizer import TextTokenizer
from ..fileio import read_json, verify_manifest
from . import faults
from .checkpoint import load_checkpoint, newest_intact, optimizer_state, resume_check, save_checkpoint
from .parallel import shard_fsdp2, wrap_ddp
from .config import StageConfig, TrainConfig
from .metrics import MetricsLog
from .optim import adamw
from .data import mmu_batch, shapes_world, t2i_batch
from .inputs import TOKENIZER_FOLDERS, prepare_sources, prepare_tokenizers
from .stages import apply_freeze_plan, freeze_summary, never_trained
from .step import forward_backward, micro_splits, share
from .vq import load_into

NO_DECAY = ("A_log", "D", "dt_bias", "norm", "bias", "embed", "pos_embed", "null_caption")


def _print(*args, **kwargs):
    print(*args, **kwargs, flush=True)


GPU_LENGTH_MULTIPLE = 32


class Trainer:
    def __init__(self, config: TrainConfig, log=_print):
        self.cfg = config
        self.out = Path(config.run.out)
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.distributed = self.world_size > 1
        self.device = self._device()
        if self.distributed and not dist.is_initialized():
            # device_id: each process's GPU is named, not guessed from its global rank (a multi-node hang)
            cuda = self.device.type == "cuda"
            dist.init_process_group("nccl" if cuda else "gloo", device_id=self.device if cuda else None)
        self.log = log if self.rank == 0 else (lambda *a, **k: None)
        for stage in config.stages:
            for n, what in zip(stage.batch, ("MMU", "T2I")):
                if n % self.world_size:
                    raise UserError(f"stage {stage.name}: the {what} batch {n} is not divisible by the "
                                    f"{self.world_size} processes")
        torch.manual_seed(config.run.seed)
        self.tokenizer = (TextTokenizer.from_file(config.model.tokenizer) if config.model.tokenizer
                          else TextTokenizer.shapes())
        self.model = self._build_model().to(self.device)
        self.model.tokenizer = self.tokenizer
        self.model.backbone.gradient_checkpointing = config.run.activation_checkpointing
        self.model.backbone.checkpoint_blocks = config.run.checkpoint_blocks
        self.model.loss_chunk = config.run.loss_chunk
        self.model.backbone.compile_blocks(config.run.compile)
        self.world = shapes_world(config) if config.data.source == "shapes" else None
        self.mmu_source = self.t2i_source = None
        self.metrics = MetricsLog(self.out, config.run.tensorboard)
        self._sharded_once = False

    # --- set-up -------------------------------------------------------------------------------------
    @property
    def length_multiple(self) -> int:
        """MMU text lengths are padded to a multiple of this: on a GPU 32, since some of fla's kernels compile
        anew for every batch length (its RMSNorm backward takes rows per program as a compile-time constant:
        one to two seconds per new length, seen as steps of 1.4-2.7 s among steps of 0.13 s on an H200); on a
        CPU 1 (nothing compiles, and padding would only add work)."""
        return GPU_LENGTH_MULTIPLE if self.device.type == "cuda" else 1

    def _device(self) -> torch.device:
        want = self.cfg.run.device
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want == "cuda" and self.distributed:
            want = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        if want.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"run.device is {self.cfg.run.device!r} but no CUDA device is available")
        device = torch.device(want)
        if device.type == "cuda":
            if device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(device)
        return device

    def _build_model(self) -> OmniMamba:
        model = self._new_model()
        backend = self.cfg.run.backend
        if backend != "auto":
            from ..ops import load_backend

            try:
                if not getattr(load_backend(backend), "is_available", lambda: True)():
                    raise ImportError("it needs a CUDA device and flash-linear-attention")
            except ImportError as e:
                raise UserError(f"run.backend is {backend!r}, which cannot run here ({e}); use auto or "
                                "reference") from None
            model.set_backend(backend)
        return model

    def _new_model(self) -> OmniMamba:
        m = self.cfg.model
        if m.init:
            model = OmniMamba.from_pretrained(m.init)
            return model.train()
        overrides = dict(m.overrides)
        if m.preset.startswith("shapes-"):
            overrides.setdefault("text_base_vocab_size", self.tokenizer.base_vocab_size)
            overrides.setdefault("image_size", self.cfg.data.shapes.image_size)
        config = _preset_with(m.preset, overrides)
        if config.text_base_vocab_size != self.tokenizer.base_vocab_size:
            raise UserError(f"the tokenizer has {self.tokenizer.base_vocab_size} tokens before the specials, the "
                            f"model config {config.text_base_vocab_size}: set model.overrides.text_base_vocab_size")
        vq_file = m.vq if m.vq and Path(m.vq).is_file() else None
        model = OmniMamba.from_components(config, mamba2_path=m.mamba2, vq_path=vq_file)
        if m.vq and Path(m.vq).is_dir():
            load_into(model.vq, m.vq, "model.vq")
            model.init_understanding_from_vq()
        return model.train()

    @property
    def precision_ctx(self):
        p = self.cfg.run.precision
        if p == "bf16" or (p == "auto" and self.device.type == "cuda"):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def prepare_vq(self) -> None:
        """The run's tokenizers, trained or reused (training/inputs.py)."""
        prepare_tokenizers(self)

    def prepare_data(self) -> None:
        """The run's MMU and T2I sources, image codes cached (training/inputs.py)."""
        prepare_sources(self)

    # --- the loop -----------------------------------------------------------------------------------
    def _optimizer(self, model) -> torch.optim.Optimizer:
        o = self.cfg.optim
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                (no_decay if any(k in name for k in NO_DECAY) else decay).append(p)
        groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return adamw([g for g in groups if g["params"]], lr=1.0, betas=o.betas, eps=o.eps, fused=o.fused)

    def _wrap(self, model):
        """The module that runs the forward pass: the model itself, DDP around it (made anew for each stage,
        since DDP fixes the set of trained parameters when it is built), or the model sharded once by FSDP2."""
        if not self.distributed:
            return model
        if self.cfg.run.strategy == "fsdp":
            if not self._sharded_once:
                shard_fsdp2(model, never_trained=never_trained(model, self.cfg.model.train_understanding))
                self._sharded_once = True
            return model
        return wrap_ddp(model, self.device)

    def _forward_backward(self, engine, step: int, stage: StageConfig) -> tuple[dict, int]:
        """The step's gradients (accumulated over micro-batches), each task's loss (0-dim tensors on the
        device), and the sequence positions processed here (image features included)."""
        micro, tokens = self._batches(step, stage)
        logs = forward_backward(engine, micro, self.device, self.precision_ctx, self.world_size, self.distributed)
        return logs, tokens

    def _batches(self, step: int, stage: StageConfig) -> tuple[list, int]:
        """This process's micro-batches of `step` (on the CPU) and the sequence positions they hold."""
        c, cfg = self.cfg, self.model.config
        mmu = share(step, stage.batch[0], self.rank, self.world_size) if stage.batch[0] else []
        t2i = share(step, stage.batch[1], self.rank, self.world_size) if stage.batch[1] else []
        micro, tokens = [], 0
        for m, t in micro_splits(mmu, t2i, c.run.micro_batch):
            mb = mmu_batch(self.mmu_source, self.tokenizer, m, self.length_multiple) if m else None
            bt = t2i_batch(self.t2i_source, self.tokenizer, t, cfg.max_caption_tokens, cfg.caption_dropout,
                           c.run.seed) if t else None
            micro.append((mb, bt))
            if mb is not None:
                tokens += mb.text_ids.numel() + mb.text_ids.size(0) * (self.model.image_positions + 4)
            if bt is not None:
                tokens += bt.prefix_ids.numel() + bt.image_codes.numel() + bt.image_codes.size(0)
        return micro, tokens

    def run(self, resume: bool = False, only: list[str] | None = None) -> dict:
        with _deterministic_on_cpu(self.device):
            return self._run(resume, only)

    def _run(self, resume: bool, only: list[str] | None) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        chosen = newest_intact(self.out / "checkpoints", self.log) if resume else None
        start = read_json(chosen / "state.json") if chosen else None
        if resume and not chosen:
            self.log(f"--resume: no intact checkpoint under {self.out / 'checkpoints'}; starting from the beginning")
        config_file, config_text = self.out / "train_config.json", json.dumps(self.cfg.to_dict(), indent=1, default=str)
        if start is not None:
            # every rank refuses alike; rank 0 alone logs, so it alone reads the file it is about to rewrite
            reads = self.rank == 0 and config_file.is_file()
            started_with = read_json(config_file, "the run's config") if reads else None
            changed = resume_check(start, self.cfg.stages, started_with, json.loads(config_text))
            if changed:
                self.log(f"--resume: settings changed since {config_file} was written: " + "; ".join(changed))
        if self.rank == 0:
            config_file.write_text(config_text)
            self._cut_logs(start)
        self.prepare_vq()
        self.prepare_data()
        if self.device.type == "cuda" and self.model.backend != "reference":  # the reference compiles nothing
            cache = os.environ.get("TRITON_CACHE_DIR", "~/.triton/cache")
            self.log(f"the first steps compile the GPU kernels (on a cold Triton cache: about 20 s on Hopper GPUs, "
                     f"where fla's launch configurations are pinned, minutes elsewhere); later runs reuse {cache}")
        results = {}
        for index, stage in enumerate(self.cfg.stages):
            if only is not None and stage.name not in only:  # [] runs none: the tokenizers and data only
                continue
            if start is not None and index < start["stage_index"]:
                continue
            resume_from = chosen if start is not None and index == start["stage_index"] else None
            results[stage.name] = self.run_stage(index, stage, resume_from)
            start = None
        self.close()
        return results

    def run_stage(self, index: int, stage: StageConfig, resume_from: Path | None = None) -> dict:
        from tqdm import tqdm

        c = self.cfg
        apply_freeze_plan(self.model, stage.name, c.model.train_understanding)
        self.model.train()
        self.model.vq.eval()
        if not c.model.train_understanding:
            self.model.understanding.eval()
        self.log(f"\n== {stage.name}: {stage.steps} steps, lr {stage.lr:g}, warm-up {stage.warmup}, "
                 f"batch MMU:T2I = {stage.batch[0]}:{stage.batch[1]} ==")
        self.log(freeze_summary(self.model))
        engine = self._wrap(self.model)
        opt = self._optimizer(self.model)
        first = 0
        if resume_from is not None:
            state = load_checkpoint(resume_from, self.model, opt)
            first = state["step"] + 1
            self.log(f"resumed from {resume_from} (step {state['step']})")
        bar = tqdm(range(first, stage.steps), desc=stage.name, initial=first, total=stage.steps,
                   disable=not (c.run.progress and self.rank == 0))
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        t0, tokens_since = time.perf_counter(), 0
        for step in bar:
            lr = stage.lr_at(step)
            for g in opt.param_groups:
                g["lr"] = lr
            logs, tokens = self._forward_backward(engine, step, stage)
            faults.point("step")
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, c.optim.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            tokens_since += tokens * self.world_size
            if step % c.run.log_every == 0 or step == stage.steps - 1:
                dt = time.perf_counter() - t0
                logs = {k: float(v) for k, v in logs.items()}
                rec = {"stage": stage.name, "step": step, "lr": lr, "loss": sum(logs.values()), **logs,
                       "grad_norm": float(grad_norm), "tokens_per_s": tokens_since / max(dt, 1e-9)}
                self._log_metrics(rec, index)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                t0, tokens_since = time.perf_counter(), 0
            last = step == stage.steps - 1
            # checkpoint before evaluating: a run resumed from step s evaluates at s again, as one that never
            # stopped does after its checkpoint, and the logs cut back to s hold no evaluation of s twice
            if (step + 1) % c.run.ckpt_every == 0 or last:
                self._checkpoint(opt, index, stage, step)
            if c.run.eval_every and (step + 1) % c.run.eval_every == 0 and not last:
                self.evaluate(stage.name, step)
        bar.close()
        del engine  # a stage's DDP wrapper (and its gradient hooks) must not outlive the stage
        last_eval = self.evaluate(stage.name, stage.steps - 1)
        state = self._full_state_dict()
        if self.rank == 0:
            self.model.save_pretrained(self.out / stage.name, tokenizer=self.tokenizer, state_dict=state)
            self.log(f"saved {self.out / stage.name}")
            faults.point("stage-saved")
        return last_eval or {}

    @property
    def sharded(self) -> bool:
        return self.distributed and self.cfg.run.strategy == "fsdp"

    def _full_state_dict(self) -> dict | None:
        """Under FSDP2 every rank takes part in gathering the full (unsharded) state; otherwise None."""
        if not self.sharded:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _checkpoint(self, opt, index, stage, step) -> None:
        """Rank 0 writes the full model and optimizer state (under FSDP2 every rank first helps gather it),
        so any number of processes, sharded or not, can resume from it."""
        model_state = optim_state = None
        if self.sharded:
            model_state, optim_state = self._full_state_dict(), optimizer_state(self.model, opt)
        if self.rank == 0:
            save_checkpoint(self.out / "checkpoints", self.model, opt, index, stage.name, step,
                            model_state=model_state, optim_state=optim_state)
        if self.distributed:
            dist.barrier()

    def _cut_logs(self, start: dict | None) -> None:
        """Make the run's logs end where it (re)starts (see MetricsLog.cut)."""
        done = {stage for stage, folder in TOKENIZER_FOLDERS.items()
                if not verify_manifest(self.out / folder, required=True)}
        self.metrics.cut(start, [stage.name for stage in self.cfg.stages], done)

    def _log_metrics(self, rec: dict, index: int | None) -> None:
        if self.rank == 0:
            self.metrics.write(rec, index)

    def evaluate(self, stage: str, step: int) -> dict | None:
        """Shapes scores on the validation split, plus a picture of samples (rank 0, Shapes data only)."""
        r = self.cfg.run
        if self.rank != 0 or self.world is None or not (r.eval_images or r.eval_prompts):
            return None
        if self.sharded:
            self.log("evaluation skipped under FSDP (one rank cannot run a sharded model): "
                     "run `omnimamba evaluate --model <stage dir>` on the saved model")
            return None
        from ..evaluation.shapes_eval import evaluate_mmu, evaluate_t2i, save_evaluation_picture

        self.model.eval()
        result: dict = {"stage": stage, "step": step}
        answered, generated = [], []
        if self.mmu_source is not None and r.eval_images:
            result["mmu"], answered = evaluate_mmu(self.model, self.tokenizer, self.world, "val", r.eval_images)
        if self.t2i_source is not None and r.eval_prompts:
            result["t2i"], generated = evaluate_t2i(self.model, self.tokenizer, self.world, "val", r.eval_prompts,
                                                    r.eval_guidance, r.eval_temperature, r.eval_top_k,
                                                    epsilon=r.eval_epsilon)
            if r.eval_guidance != 1.0:  # what guidance adds, measured at every evaluation
                result["t2i_unguided"], _ = evaluate_t2i(self.model, self.tokenizer, self.world, "val",
                                                         r.eval_prompts, 1.0, r.eval_temperature, r.eval_top_k,
                                                         epsilon=r.eval_epsilon)
        self.model.train()
        self.model.vq.eval()
        out = self.out / "eval"
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stage}-{step + 1:07d}.json").write_text(json.dumps(result, indent=1))
        save_evaluation_picture(out / f"{stage}-{step + 1:07d}.png", generated, answered, self.world, "val")
        msg = [f"eval {stage} step {step + 1}:"]
        if "mmu" in result:
            msg.append(f"MMU accuracy {result['mmu']['accuracy']['overall']:.1%}")
        if "t2i" in result:
            msg.append(f"T2I score {result['t2i']['overall']:.1%}")
        if "t2i_unguided" in result:
            msg.append(f"(unguided {result['t2i_unguided']['overall']:.1%})")
        self.log(" ".join(msg))
        self._log_metrics({"stage": stage, "step": step,
                           "eval_mmu": result.get("mmu", {}).get("accuracy", {}).get("overall"),
                           "eval_t2i": result.get("t2i", {}).get("overall"),
                           "eval_t2i_unguided": result.get("t2i_unguided", {}).get("overall")},
                          next(i for i, st in enumerate(self.cfg.stages) if st.name == stage))
        return result

    def close(self) -> None:
        self.metrics.close()


@contextmanager
def _deterministic_on_cpu(device: torch.device):
    """On the CPU, make a run repeat bit for bit: without it a multi-threaded kernel's summation order varies
    between processes (one thread, or torch's deterministic algorithms, remove it), two runs of one seed differ
    in the 7th digit of a gradient and, 750 steps later, by points of accuracy. Uninitialised memory is not
    filled (that, not the algorithms, cost 8 % of a step). torch's settings are put back afterwards."""
    if device.type != "cpu":
        yield
        return
    import torch.utils.deterministic as settings

    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              settings.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    settings.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        settings.fill_uninitialized_memory = before[2]


def _preset_with(name: str, overrides: dict):
    """A preset with `model.overrides` applied: OmniMambaConfig fields, and the sub-configs `backbone`, `vq`
    and `understanding` as mappings of their own fields (e.g. {backbone: {d_model: 256, n_layer: 8}})."""
    import dataclasses

    from ..model import OmniMambaConfig, shapes_config

    overrides = dict(overrides)
    subs = {key: overrides.pop(key) for key in ("backbone", "vq", "understanding") if key in overrides}
    known = {f.name for f in dataclasses.fields(OmniMambaConfig)} - {"backbone", "vq", "understanding"}
    shapes = name.startswith("shapes-") and name in PRESETS
    image_size = overrides.pop("image_size", 64) if shapes else 64  # the Shapes world's (data.shapes.image_size)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise UserError(f"model.overrides: unknown field(s) {unknown}; known: {sorted(known | set(('backbone', 'vq', 'understanding')))}")
    if shapes:
        cfg = shapes_config(name.removeprefix("shapes-"), overrides.pop("text_base_vocab_size", None), image_size)
    else:
        cfg = preset(name)
    for key, fields in subs.items():
        if not isinstance(fields, dict):
            raise UserError(f"model.overrides.{key}: expected a mapping of its fields, got {fields!r}")
        part = getattr(cfg, key)
        names = {f.name for f in dataclasses.fields(part)}
        bad = sorted(set(fields) - names)
        if bad:
            raise UserError(f"model.overrides.{key}: unknown field(s) {bad}; known: {sorted(names)}")
        try:
            cfg = cfg.replace(**{key: dataclasses.replace(part, **fields)})
        except (TypeError, ValueError) as e:
            raise UserError(f"model.overrides.{key}: {e}") from e
    return cfg.replace(**overrides) if overrides else cfg
