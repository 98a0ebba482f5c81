"""What a run trains on, prepared before its first stage: its tokenizers (trained from the Shapes images or
reused from the run's folder) and its MMU and T2I sources (Shapes or files, the T2I images' codes cached once)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch.distributed as dist

from ..errors import UserError
from ..evaluation.curves import UNDERSTANDING_VQ_STAGE, VQ_STAGE
from ..fileio import verify_manifest
from ..vision.vq import VQModel
from .data import FileMMU, FileT2I, ShapesMMU, ShapesT2I, cached_codes
from .vq import load_into, reinit_vq_, save_vq, train_vq

if TYPE_CHECKING:
    from .loop import Trainer

# where a run keeps each tokenizer it trains, by its records' stage name
TOKENIZER_FOLDERS = {VQ_STAGE: "vq", UNDERSTANDING_VQ_STAGE: "understanding-vq"}
# a tokenizer trained from scratch starts from run.seed + this (training/vq.py, reinit_vq_)
VQ_INIT_SEEDS = {VQ_STAGE: 0, UNDERSTANDING_VQ_STAGE: 1}


def prepare_tokenizers(t: Trainer) -> None:
    """Train the embedded default's VQ tokenizer if asked (and no checkpoint was given), and, where the
    understanding encoder is a tokenizer encoder of another architecture (model.understanding.vq), a
    tokenizer of that architecture for it, on the same images with the same settings."""
    m, v = t.cfg.model, t.cfg.vq_train
    if m.init:
        return
    if not m.vq and v.steps:
        _train_or_reuse_vq(t, t.model.vq, "VQ tokenizer", VQ_STAGE)
        _init_understanding(t)
    own = t.model.config.understanding.vq
    if own is None or not (m.understanding_vq or v.steps):
        return
    if m.understanding_vq:
        vq = load_into(VQModel(own), m.understanding_vq, "model.understanding_vq")
        t.log(f"understanding tokenizer: {m.understanding_vq}")
    else:
        vq = VQModel(own).to(t.device)
        _train_or_reuse_vq(t, vq, "understanding tokenizer", UNDERSTANDING_VQ_STAGE)
    t.model.init_understanding_from_vq(vq)
    t.log("understanding encoder: initialised from the understanding tokenizer's encoder (frozen)")


def _train_or_reuse_vq(t: Trainer, vq, what: str, stage: str) -> None:
    """Train `vq` on the training images and save it to its folder (TOKENIZER_FOLDERS[stage]; rank 0, the
    others read it), or load the complete one a run left there."""
    v, vq_dir = t.cfg.vq_train, t.out / TOKENIZER_FOLDERS[stage]
    if not verify_manifest(vq_dir, required=True):
        load_into(vq, vq_dir, what)
        t.log(f"{what}: reusing {vq_dir}")
        return
    if t.world is None:
        raise UserError("vq_train.steps > 0 trains the VQ on the Shapes world only; for real data set model.vq")
    if t.rank == 0:
        n = t.cfg.data.shapes.train_images
        reinit_vq_(vq, t.cfg.run.seed + VQ_INIT_SEEDS[stage])
        r = train_vq(vq, lambda i: t.world.sample("train", i).image, n, v.steps, v.lr, v.batch,
                     seed=t.cfg.run.seed, device=t.device, progress=t.cfg.run.progress,
                     foreground_weight=v.foreground_weight, restart=v.restart,
                     record=lambda step, rec: t._log_metrics({"stage": stage, "step": step, **rec}, None),
                     record_every=t.cfg.run.log_every, desc=f"train {what}")
        save_vq(vq, vq_dir)
        t.log(f"{what}: {v.steps} steps, reconstruction loss {r['final_recon_loss']:.4f}, saved to {vq_dir}")
    if t.distributed:
        dist.barrier()
        written_by_rank0(t.rank, vq_dir / "model.safetensors", f"the trained {what}")
        load_into(vq, vq_dir, what)


def written_by_rank0(rank: int, path: Path, what: str) -> None:
    """Every rank reads what rank 0 wrote under run.out: over several nodes that needs a shared filesystem."""
    if not path.exists():
        raise UserError(f"rank {rank}: {what} ({path}), written by rank 0, is not visible here: when training "
                        "over several nodes, put run.out (and data.codes_cache) on a filesystem every node shares")


def _init_understanding(t: Trainer) -> None:
    if t.model.init_understanding_from_vq():
        t.log("understanding encoder: initialised from the trained VQ tokenizer's encoder (frozen)")


def prepare_sources(t: Trainer) -> None:
    """The MMU and T2I sources the stages draw from (only the tasks some stage trains), the T2I images'
    codes encoded once into the run's cache (rank 0; the others read it)."""
    c = t.cfg
    needs_mmu = any(s.batch[0] for s in c.stages)
    needs_t2i = any(s.batch[1] for s in c.stages)
    cache = Path(c.data.codes_cache) if c.data.codes_cache else t.out / "codes.safetensors"
    vq_size = t.model.config.vq.image_size
    if c.data.source == "shapes":
        n = c.data.shapes.train_images
        if needs_mmu:
            t.mmu_source = ShapesMMU(t.world, n, c.run.seed, c.data.shapes.max_turns,
                                     c.data.shapes.balance_existence, c.data.shapes.relation_share)
        if needs_t2i:
            plain = c.data.shapes.t2i_plain
            images_of = ((lambda i: t.world.plain_image("train", i)) if plain
                         else (lambda i: t.world.sample("train", i).image))
            codes = _codes(t, images_of, n, cache, f"shapes seed={c.data.shapes.seed} "
                           f"size={c.data.shapes.image_size}{' plain' if plain else ''}")
            t.t2i_source = ShapesT2I(t.world, n, codes, c.run.seed, c.data.shapes.relation_share)
    else:
        from ..data.formats import load_image, read_coco_captions

        if needs_mmu:
            t.mmu_source = FileMMU(c.data.llava, c.data.image_root, t.model.config.understanding.image_size,
                                   c.data.skip_bad)
            _report_skipped(t, "MMU", t.mmu_source.skipped)
        if needs_t2i:
            read = read_coco_captions(c.data.coco, c.data.image_root, skip_bad=c.data.skip_bad)
            _report_skipped(t, "T2I", read.skipped)
            samples = read.samples
            images = sorted({s.image for s in samples})  # COCO has several captions per image: encode once
            row = {p: i for i, p in enumerate(images)}
            codes = _codes(t, lambda i: load_image(images[i], vq_size), len(images), cache,
                           f"coco {Path(c.data.coco).resolve()}")
            t.t2i_source = FileT2I(samples, codes, [row[s.image] for s in samples])


def _codes(t: Trainer, images_of, n, cache, source_id):
    if t.rank == 0:
        codes = cached_codes(t.model.vq, images_of, n, cache, progress=t.cfg.run.progress,
                             source_id=source_id)
    if t.distributed:
        dist.barrier()
        if t.rank != 0:
            written_by_rank0(t.rank, Path(cache).with_suffix(".json"), "the image-code cache")
            codes = cached_codes(t.model.vq, images_of, n, cache, progress=False, source_id=source_id)
    return codes


def _report_skipped(t: Trainer, what: str, skipped: list[str]) -> None:
    if skipped:
        t.log(f"{what} data: skipped {len(skipped)} bad sample(s) (data.skip_bad is on); first: {skipped[0]}")
