"""The paper's ablations as one resumable experiment: each variant of a base run config is trained with the
same budget and the same seeds, then scored by the Shapes scorer on the test and held-out splits.

Variants (the paper's Table 4 and Section 3.5, and the stage-2 data ratio):

  unified-nolora      one vocabulary for text and image codes, no task LoRA
  decoupled-nolora    decoupled vocabularies, no task LoRA
  unified-lora        one vocabulary, task LoRA
  full                decoupled vocabularies + task LoRA, two-stage training: the base config as written
  joint               the full model trained in one joint stage of the same total steps (no stage 1)
  ratio-A:B           the full model with stage 2's MMU:T2I split of each batch set to A:B (same total batch)

The VQ tokenizer is trained once and shared by every run (and its image-code cache with it), so the runs
differ only where the variants do. A run whose `score.json` exists is not trained again.
"""

from __future__ import annotations

import copy
import json
import re
import time
from pathlib import Path

from ..errors import UserError
from ..fileio import read_json, writing

TABLE4 = ("unified-nolora", "decoupled-nolora", "unified-lora", "full")
DEFAULT_VARIANTS = (*TABLE4, "joint", "ratio-1:3", "ratio-3:1")
_ARCH = {"unified-nolora": (False, False), "decoupled-nolora": (True, False), "unified-lora": (False, True),
         "full": (True, True)}
_RATIO = re.compile(r"ratio-(\d+):(\d+)$")


def known_variant(name: str) -> bool:
    return name in _ARCH or name == "joint" or bool(_RATIO.match(name))


def variant_config(base: dict, name: str) -> dict:
    """The raw config of variant `name` built from the raw base config (which is not modified)."""
    raw = copy.deepcopy(base)
    stages = raw.get("stages")
    if not stages:
        raise UserError("ablate: the base config needs its stages (stage 1 and stage 2, as the paper's recipe)")
    last = stages[-1]
    if not known_variant(name):
        raise UserError(f"ablate: unknown variant {name!r}; known: {', '.join(DEFAULT_VARIANTS)} "
                        "(or ratio-A:B for any MMU:T2I split)")
    # The architecture switches are written out for every variant (joint and ratio-A:B are the full model), so
    # two variants that are the same run have the same config.
    decoupled, lora = _ARCH.get(name, _ARCH["full"])
    raw.setdefault("model", {}).setdefault("overrides", {}).update({"decoupled_vocab": decoupled, "task_lora": lora})
    if name in _ARCH:
        return raw
    if name == "joint":
        joint = dict(last, steps=sum(int(s["steps"]) for s in stages))
        raw["stages"] = [joint]
        return raw
    m = _RATIO.match(name)
    a, b = int(m.group(1)), int(m.group(2))
    total = sum(int(x) for x in last["batch"])
    if a + b == 0 or total * a % (a + b) or total * b % (a + b):
        raise UserError(f"ablate: {name} does not split stage 2's batch of {total} into whole parts")
    last["batch"] = [total * a // (a + b), total * b // (a + b)]
    return raw


def score_model(model, world, n_images: int, n_prompts: int, guidance: float, temperature: float,
                top_k: int) -> dict:
    """The scores an ablation compares: test MMU, mean POPE F1, T2I with and without guidance; held-out MMU
    and T2I."""
    from ..evaluation.shapes_eval import evaluate_mmu, evaluate_t2i

    tok = model.tokenizer
    out = {}
    for split in ("test", "heldout"):
        mmu, _ = evaluate_mmu(model, tok, world, split, n_images)
        guided, _ = evaluate_t2i(model, tok, world, split, n_prompts, guidance_scale=guidance,
                                 temperature=temperature, top_k=top_k)
        out[f"{split}_mmu"] = mmu["accuracy"]["overall"]
        out[f"{split}_t2i"] = guided["overall"]
        if split == "test":
            out["test_pope_f1"] = sum(p["f1"] for p in mmu["pope"].values()) / len(mmu["pope"])
            plain, _ = evaluate_t2i(model, tok, world, split, n_prompts, guidance_scale=1.0,
                                    temperature=temperature, top_k=top_k)
            out["test_t2i_unguided"] = plain["overall"]
    return out


class Ablation:
    """Trains and scores every (variant, seed) under `out`: out/shared (tokenizer, code cache),
    out/runs/VARIANT/seedN (each run, its score.json)."""

    def __init__(self, base: dict, out: str | Path, variants=DEFAULT_VARIANTS, seeds=(0, 1, 2),
                 n_images: int = 50, n_prompts: int = 48, log=print):
        bad = [v for v in variants if not known_variant(v)]
        if bad:
            raise UserError(f"ablate: unknown variant(s) {bad}; known: {', '.join(DEFAULT_VARIANTS)} "
                            "(or ratio-A:B)")
        if base.get("data", {}).get("source", "shapes") != "shapes":
            raise UserError("ablate scores with the Shapes scorer: the base config needs data.source: shapes")
        self.base, self.out = base, Path(out)
        self.variants, self.seeds = list(dict.fromkeys(variants)), list(seeds)
        self.n_images, self.n_prompts, self.log = n_images, n_prompts, log

    def _shared_tokenizer(self) -> tuple[Path, Path]:
        """Train the base config's VQ tokenizer once (resumable like any run) and return its folder and the
        shared code cache path."""
        from .config import config_from_dict
        from .loop import Trainer

        shared = self.out / "shared"
        raw = copy.deepcopy(self.base)
        raw.setdefault("run", {}).update({"out": str(shared), "seed": 0, "tensorboard": False})
        cache = raw.get("data", {}).get("codes_cache") or shared / "codes.safetensors"
        if raw.get("model", {}).get("vq"):  # a given tokenizer: nothing to train
            return Path(raw["model"]["vq"]), Path(cache)
        trainer = Trainer(config_from_dict(raw), log=self.log)
        trainer.out.mkdir(parents=True, exist_ok=True)
        trainer.prepare_vq()
        trainer.close()
        return shared / "vq", Path(cache)

    def run_config(self, variant: str, seed: int, vq_dir: Path, cache: Path) -> dict:
        raw = variant_config(self.base, variant)
        raw.setdefault("model", {})["vq"] = str(vq_dir)
        raw.setdefault("data", {})["codes_cache"] = str(cache)
        run = raw.setdefault("run", {})
        # Scored once, at the end (score_model), so no evaluation during training; no mid-run checkpoints.
        run.update({"out": str(self.out / "runs" / variant / f"seed{seed}"), "seed": seed, "ckpt_every": 10 ** 9,
                    "eval_every": 0, "eval_images": 0, "eval_prompts": 0, "progress": False, "tensorboard": False})
        return raw

    def _eval_settings(self) -> tuple[float, float, int]:
        from .config import config_from_dict

        r = config_from_dict(self.base).run
        return r.eval_guidance, r.eval_temperature, r.eval_top_k

    def run(self) -> list[dict]:
        """Every (variant, seed): its scores, from score.json or by training and scoring it now."""
        from ..data.shapes import ShapesWorld
        from .config import config_from_dict
        from .data import shapes_world
        from .loop import Trainer

        self.out.mkdir(parents=True, exist_ok=True)
        vq_dir, cache = self._shared_tokenizer()
        guidance, temperature, top_k = self._eval_settings()
        records, done = [], {}  # done: a run's config (less its folder) -> its record
        todo = [(v, s) for v in self.variants for s in self.seeds]
        for k, (variant, seed) in enumerate(todo, 1):
            raw = self.run_config(variant, seed, vq_dir, cache)
            cfg = config_from_dict(raw)
            same = json.dumps({**raw, "run": {**raw["run"], "out": None}}, sort_keys=True, default=str)
            score_path = Path(cfg.run.out) / "score.json"
            if same in done:  # e.g. ratio-1:1 when the base's ratio is 1:1: the same run as another variant
                rec = {**done[same], "variant": variant, "same_as": done[same]["variant"]}
                self.log(f"[{k}/{len(todo)}] {variant} seed {seed}: the same run as {done[same]['variant']}")
                records.append(rec)
                continue
            if score_path.is_file():
                rec = read_json(score_path, "ablation score")
                self.log(f"[{k}/{len(todo)}] {variant} seed {seed}: reusing {score_path}")
                records.append(done.setdefault(same, rec))
                continue
            self.log(f"[{k}/{len(todo)}] {variant} seed {seed}: training")
            start = time.perf_counter()
            trainer = Trainer(cfg, log=lambda *a, **kw: None)
            trainer.run()
            train_s = time.perf_counter() - start
            world: ShapesWorld = trainer.world or shapes_world(cfg)
            scores = score_model(trainer.model.eval(), world, self.n_images, self.n_prompts, guidance, temperature,
                                 top_k)
            rec = {"variant": variant, "seed": seed, "train_s": round(train_s, 1),
                   "eval_s": round(time.perf_counter() - start - train_s, 1), **scores}
            with writing(score_path, "ablation score"):
                score_path.write_text(json.dumps(rec, indent=1))
            self.log("    " + "  ".join(f"{name} {v:.3f}" for name, v in scores.items()) + f"  ({train_s:.0f} s)")
            records.append(done.setdefault(same, rec))
        return records
