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
differ only where the variants do. A run whose `score.json` exists is not trained again (unless an older version of
the code wrote it and its meaning has changed since: `still_valid`).
"""

from __future__ import annotations

import copy
import json
import re
import sys
import time
from pathlib import Path

from ..errors import UserError
from ..fileio import read_json, writing
from .ablation_pool import run_in_processes

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
    and T2I; and the test split's losses (nats per token of its answers and image codes)."""
    from ..evaluation.shapes_eval import evaluate_mmu, evaluate_t2i, split_losses

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
    losses = split_losses(model, tok, world, "test", n_images)
    out.update({f"test_{k}": v for k, v in losses.items()})
    return out


def train_and_score(spec: dict, log=None) -> dict:
    """Train one (variant, seed) run from its spec (the run config and the scoring settings), score it and
    write its score.json; returns the record."""
    from .config import config_from_dict
    from .data import shapes_world
    from .loop import Trainer

    cfg = config_from_dict(spec["config"])
    start = time.perf_counter()
    trainer = Trainer(cfg, log=log or (lambda *a, **kw: None))
    trainer.run()
    train_s = time.perf_counter() - start
    world = trainer.world or shapes_world(cfg)
    scores = score_model(trainer.model.eval(), world, spec["n_images"], spec["n_prompts"], spec["guidance"],
                         spec["temperature"], spec["top_k"])
    rec = {"variant": spec["variant"], "seed": spec["seed"], "version": RECORD_VERSION, "machine": machine(),
           "train_s": round(train_s, 1),
           "eval_s": round(time.perf_counter() - start - train_s, 1), **scores}
    path = Path(cfg.run.out) / "score.json"
    with writing(path, "ablation score"):
        path.write_text(json.dumps(rec, indent=1))
    return rec


# What a score.json's numbers mean. 2: the unified vocabulary trains over both modalities' ids and the losses are
# over the ids sampling draws from (b9c7450, d016ec0). 3: the Shapes presets decouple their tokenizers (a
# patch-local generation tokenizer, a LlamaGen-architecture one for the understanding encoder). A run of an older
# version is trained again, except where the versions agree: version 2 for the other presets, and version 1 for
# their decoupled vocabularies, whose training and losses did not change.
RECORD_VERSION = 3


def still_valid(rec: dict, config: dict) -> bool:
    """Whether a finished run's record can stand for `config` under this version of the code."""
    version = rec.get("version", 1)
    if version == RECORD_VERSION:
        return True
    model = config.get("model", {})
    if str(model.get("preset", "")).startswith("shapes-"):
        return False
    return version == 2 or (version == 1 and model.get("overrides", {}).get("decoupled_vocab", True) is not False)


def machine() -> str:
    """The device runs train on, in words (recorded with each run's scores)."""
    import platform

    import torch

    device = (torch.cuda.get_device_name() if torch.cuda.is_available()
              else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)")
    return f"{device}, torch {torch.__version__}"


def _describe(rec: dict) -> str:
    scores = "  ".join(f"{k} {v:.3f}" for k, v in rec.items() if isinstance(v, float) and k not in ("train_s", "eval_s"))
    return f"{scores}  ({rec['train_s']:.0f} s training)"


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

    def _shared_paths(self) -> tuple[Path, Path]:
        """The tokenizer folder and the code cache every run reads (the base config's own, if it names them)."""
        shared = self.out / "shared"
        given = self.base.get("model", {}).get("vq")
        cache = self.base.get("data", {}).get("codes_cache") or shared / "codes.safetensors"
        return (Path(given) if given else shared / "vq"), Path(cache)

    def _shared_understanding_vq(self) -> str | None:
        """The understanding encoder's own tokenizer every run reads, where the base model has one: the base
        config's, or the one _shared_data trains beside the VQ."""
        given = self.base.get("model", {}).get("understanding_vq")
        if given:
            return given
        from ..evaluation.curves import UNDERSTANDING_VQ_STAGE
        from .inputs import TOKENIZER_FOLDERS

        folder = self.out / "shared" / TOKENIZER_FOLDERS[UNDERSTANDING_VQ_STAGE]
        return str(folder) if folder.is_dir() else None

    def _shared_data(self) -> tuple[Path, Path]:
        """Train the base config's tokenizers once (resumable like any run: the VQ unless given, the understanding
        encoder's own where the model has one) and cache the training images' codes; return the VQ's folder and the
        code cache's path, which every run reads."""
        from .config import config_from_dict
        from .loop import Trainer

        vq_dir, cache = self._shared_paths()
        raw = copy.deepcopy(self.base)
        raw.setdefault("run", {}).update({"out": str(self.out / "shared"), "seed": 0, "tensorboard": False})
        raw.setdefault("data", {})["codes_cache"] = str(cache)
        # a given VQ is not trained again (prepare_vq), but an understanding encoder's own tokenizer still is
        trainer = Trainer(config_from_dict(raw), log=self.log)
        trainer.out.mkdir(parents=True, exist_ok=True)
        trainer.prepare_vq()
        trainer.prepare_data()  # the code cache, written once here rather than raced for by parallel runs
        trainer.close()
        return vq_dir, cache

    def run_config(self, variant: str, seed: int, vq_dir: Path, cache: Path) -> dict:
        raw = variant_config(self.base, variant)
        raw.setdefault("model", {})["vq"] = str(vq_dir)
        understanding_vq = self._shared_understanding_vq()
        if understanding_vq:
            raw["model"]["understanding_vq"] = understanding_vq
        raw.setdefault("data", {})["codes_cache"] = str(cache)
        run = raw.setdefault("run", {})
        # Scored once, at the end (score_model), so no evaluation during training; no mid-run checkpoints.
        run.update({"out": str(self.out / "runs" / variant / f"seed{seed}"), "seed": seed, "ckpt_every": 10 ** 9,
                    "eval_every": 0, "eval_images": 0, "eval_prompts": 0, "progress": False, "tensorboard": False})
        return raw

    def _eval_settings(self) -> dict:
        from .config import config_from_dict

        r = config_from_dict(self.base).run
        return {"guidance": r.eval_guidance, "temperature": r.eval_temperature, "top_k": r.eval_top_k,
                "n_images": self.n_images, "n_prompts": self.n_prompts}

    def run(self, jobs: int = 1, train: bool = True) -> list[dict]:
        """Every (variant, seed): its scores, from score.json or by training and scoring it now, `jobs` runs at
        a time (each in its own process when jobs > 1, spread over the visible GPUs). Runs go seed by seed,
        so an ablation stopped part-way has every variant's first seeds. train=False: the finished runs only
        (the others are named in the log)."""
        if train:
            self.out.mkdir(parents=True, exist_ok=True)
            vq_dir, cache = self._shared_data()
        else:
            vq_dir, cache = self._shared_paths()
        settings = self._eval_settings()
        order = [(v, s) for s in self.seeds for v in self.variants]
        first, keys, todo = {}, [], []  # first: a run's config (less its folder) -> the (variant, seed) that runs it
        records: dict[tuple, dict] = {}
        for variant, seed in order:
            raw = self.run_config(variant, seed, vq_dir, cache)
            key = json.dumps({**raw, "run": {**raw["run"], "out": None}}, sort_keys=True, default=str)
            keys.append(key)
            if key in first:  # e.g. ratio-1:1 when the base's ratio is 1:1: the same run as another variant
                continue
            first[key] = (variant, seed)
            score_path = Path(raw["run"]["out"]) / "score.json"
            old = read_json(score_path, "ablation score") if score_path.is_file() else None
            if old is not None and still_valid(old, raw):
                records[(variant, seed)] = old
                self.log(f"{variant} seed {seed}: reusing {score_path}")
            else:
                if old is not None:
                    self.log(f"{variant} seed {seed}: {score_path} comes from an older version of ablate (record "
                             f"version {old.get('version', 1)}, now {RECORD_VERSION}), so it does not count")
                todo.append({"config": raw, "variant": variant, "seed": seed, **settings})
        if todo and not train:
            self.log("not finished, left out: " + ", ".join(f"{t['variant']} seed {t['seed']}" for t in todo))
            todo = []
        if todo:
            self.log(f"{len(todo)} run(s) to train, {len(first) - len(todo)} finished before"
                     + (f", {jobs} at a time" if jobs > 1 else ""))
        if jobs > 1 and len(todo) > 1:
            records.update(run_in_processes(todo, jobs, self.log, _describe))
        else:
            for k, spec in enumerate(todo, 1):
                self.log(f"[{k}/{len(todo)}] {spec['variant']} seed {spec['seed']}: training")
                rec = train_and_score(spec)
                records[(spec["variant"], spec["seed"])] = rec
                self.log("    " + _describe(rec))
        out = []
        for (variant, seed), key in zip(order, keys):
            owner = first[key]
            if owner not in records:  # not finished (train=False)
                continue
            rec = records[owner]
            out.append(rec if owner == (variant, seed) else {**rec, "variant": variant, "same_as": owner[0]})
        return out


def _main(argv: list[str]) -> int:
    """One run of a parallel ablation: `python -m omnimamba.training.ablation SPEC.json` (written by
    _run_parallel); prints its training log and scores."""
    if len(argv) != 1:
        print("usage: python -m omnimamba.training.ablation SPEC.json", file=sys.stderr)
        return 2
    spec = read_json(Path(argv[0]), "ablation run spec")
    rec = train_and_score(spec, log=print)
    print(_describe(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
