"""`omnimamba ablate`: the variants' configs, the statistics and claim verdicts, and a tiny run end to end."""

import json
import math
from pathlib import Path

import pytest

from omnimamba.cli import main
from omnimamba.errors import UserError
from omnimamba.evaluation.ablation_report import check_claims, compare, summarise
from omnimamba.training.ablation import variant_config

BASE = {
    "model": {"preset": "shapes-tiny"},
    "data": {"source": "shapes", "shapes": {"train_images": 16}},
    "vq_train": {"steps": 2, "batch": 4},
    "stages": [{"name": "stage1-mmu", "steps": 2, "lr": 1e-3, "batch": [2, 0]},
               {"name": "stage1-t2i", "steps": 2, "lr": 1e-3, "batch": [0, 2]},
               {"name": "stage2-unified", "steps": 3, "lr": 2e-3, "warmup": 1, "batch": [2, 2]}],
    "run": {"log_every": 1},
}


def test_variants_change_only_what_they_name():
    for name, decoupled, lora in [("unified-nolora", False, False), ("decoupled-nolora", True, False),
                                  ("unified-lora", False, True), ("full", True, True)]:
        raw = variant_config(BASE, name)
        assert raw["model"]["overrides"] == {"decoupled_vocab": decoupled, "task_lora": lora}
        assert raw["stages"] == BASE["stages"]
    assert "overrides" not in BASE["model"]  # the base is not modified

    assert variant_config(BASE, "joint")["model"]["overrides"] == {"decoupled_vocab": True, "task_lora": True}
    joint = variant_config(BASE, "joint")["stages"]
    assert len(joint) == 1 and joint[0]["steps"] == 2 + 2 + 3  # the same total steps in one stage
    assert {k: v for k, v in joint[0].items() if k != "steps"} == {k: v for k, v in BASE["stages"][2].items()
                                                                  if k != "steps"}
    big = {**BASE, "stages": BASE["stages"][:2] + [dict(BASE["stages"][2], batch=[16, 16])]}
    assert variant_config(big, "ratio-1:3")["stages"][2]["batch"] == [8, 24]
    assert variant_config(big, "ratio-3:1")["stages"][2]["batch"] == [24, 8]
    with pytest.raises(UserError, match="does not split"):
        variant_config(big, "ratio-1:6")
    with pytest.raises(UserError, match="unknown variant 'bigger'"):
        variant_config(BASE, "bigger")


def test_mean_and_sample_std_and_verdicts():
    recs = [{"variant": "a", "test_mmu": v} for v in (0.5, 0.7, 0.6)]
    s = summarise(recs)["a"]["test_mmu"]
    assert s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(0.1) and s["n"] == 3

    def summary(a, b):
        return summarise([{"variant": "full", "test_t2i": v} for v in a] +
                         [{"variant": "unified-lora", "test_t2i": v} for v in b])

    clear = compare(summary([0.90, 0.91, 0.89], [0.50, 0.52, 0.48]), "full", "unified-lora", "test_t2i")
    se = math.sqrt(0.01 ** 2 / 3 + 0.02 ** 2 / 3)
    assert clear["verdict"] == "agrees" and clear["diff"] == pytest.approx(0.4) and clear["se"] == pytest.approx(se)
    assert compare(summary([0.50, 0.52, 0.48], [0.90, 0.91, 0.89]), "full", "unified-lora", "test_t2i")["verdict"] == "disagrees"
    assert compare(summary([0.5, 0.7, 0.6], [0.55, 0.65, 0.6]), "full", "unified-lora", "test_t2i")["verdict"] == "within noise"
    assert compare(summary([0.9], [0.1]), "full", "unified-lora", "test_t2i")["verdict"] == "cannot tell (one seed)"
    claims = {c["claim"]: c for c in check_claims(summary([0.90, 0.91, 0.89], [0.50, 0.52, 0.48]))}
    vocab = claims["decoupled vocabularies help generation (Table 4)"]
    assert vocab["verdict"] == "cannot tell"  # one comparison agrees, the other was not run
    assert [r["verdict"] for r in vocab["comparisons"]] == ["agrees", "not run", "not run", "not run"]


def test_a_loss_claim_holds_when_the_better_variant_has_the_lower_loss():
    def summary(a, b):
        return summarise([{"variant": "full", "test_t2i_loss": v} for v in a] +
                         [{"variant": "joint", "test_t2i_loss": v} for v in b])

    lower = compare(summary([1.50, 1.51, 1.49], [1.70, 1.72, 1.68]), "full", "joint", "test_t2i_loss")
    assert lower["verdict"] == "agrees" and lower["diff"] == pytest.approx(-0.2)
    assert compare(summary([1.70, 1.72, 1.68], [1.50, 1.51, 1.49]), "full", "joint",
                   "test_t2i_loss")["verdict"] == "disagrees"


def test_ablate_end_to_end_in_parallel_then_in_process_and_resumes(tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "base.json"  # JSON is YAML
    cfg.write_text(json.dumps(BASE))
    out = tmp_path / "abl"
    common = ["ablate", "--config", str(cfg), "--seeds", "1", "--n-images", "2", "--n-prompts", "2", "--out", str(out)]
    # Two runs at once, each in its own process (ratio-1:1 is the base's own ratio: the same run as full).
    assert main([*common, "--variants", "full", "unified-nolora", "ratio-1:1", "--jobs", "2"]) == 0
    report = json.loads((out / "ablation.json").read_text())
    assert [r["variant"] for r in report["records"]] == ["full", "unified-nolora", "ratio-1:1"]
    full, unified, same = report["records"]
    assert same["same_as"] == "full" and same["test_mmu"] == full["test_mmu"]
    for r in (full, unified):
        assert set(r) >= {"test_mmu", "test_pope_f1", "test_t2i", "test_t2i_unguided", "heldout_mmu", "heldout_t2i",
                          "test_mmu_loss", "test_t2i_loss"}
        assert all(0 <= r[k] <= 1 for k in ("test_mmu", "test_t2i", "heldout_mmu"))
        assert r["test_mmu_loss"] > 0 and r["test_t2i_loss"] > 0 and r["machine"].startswith("CPU")
        log = (out / "runs" / r["variant"] / "seed0" / "ablation_run.log").read_text()
        assert "stage2-unified" in log  # each process's own training log
    saved = json.loads((out / "runs" / "unified-nolora" / "seed0" / "stage2-unified" / "config.json").read_text())
    assert saved["omnimamba"]["decoupled_vocab"] is False and saved["omnimamba"]["task_lora"] is False
    table = (out / "ablation.md").read_text()
    assert "| full |" in table and "| unified-nolora |" in table and "omnimamba ablate" in table
    assert (out / "shared" / "vq").is_dir() and (out / "shared" / "codes.safetensors").is_file()

    # One more variant, in this process: only it is trained; the finished runs are read back.
    capsys.readouterr()
    variants = ["--variants", "full", "unified-nolora", "ratio-1:1", "decoupled-nolora"]
    assert main([*common, *variants]) == 0
    printed = capsys.readouterr().out
    assert printed.count("seed 0: reusing") == 2 and "[1/1] decoupled-nolora seed 0: training" in printed
    records = json.loads((out / "ablation.json").read_text())["records"]
    assert records[:3] == report["records"]

    # A rerun trains nothing.
    from omnimamba.training.loop import Trainer

    monkeypatch.setattr(Trainer, "run", lambda *a, **k: pytest.fail("a finished run was trained again"))
    assert main([*common, *variants, "--jobs", "2"]) == 0
    assert capsys.readouterr().out.count("seed 0: reusing") == 3
    assert json.loads((out / "ablation.json").read_text())["records"] == records

    # --report-only: a report of what has finished; the unfinished runs (joint here) are named, not trained.
    monkeypatch.setattr(Trainer, "__init__", lambda *a, **k: pytest.fail("--report-only built a trainer"))
    assert main([*common, *variants, "joint", "--report-only"]) == 0
    assert "not finished, left out: joint seed 0" in capsys.readouterr().out
    assert json.loads((out / "ablation.json").read_text())["records"] == records
    assert main([*common[:-1], str(tmp_path / "empty"), "--variants", "full", "--report-only"]) != 0
    assert "no finished run under" in capsys.readouterr().err


def test_a_record_of_an_older_version_counts_only_where_the_code_did_not_change(tmp_path):
    """Version-1 records predate the unified vocabulary's training over both modalities' ids: they stand for
    decoupled-vocabulary runs only. Versions 1 and 2 predate the Shapes presets' decoupled tokenizers: on a Shapes
    preset no older run is finished."""
    from omnimamba.training.ablation import RECORD_VERSION, Ablation, still_valid

    out, lines = tmp_path / "abl", []
    variants = ["full", "unified-lora", "joint", "unified-nolora"]
    for variant, version in [("full", None), ("unified-lora", 2), ("joint", 1), ("unified-nolora", RECORD_VERSION)]:
        run = out / "runs" / variant / "seed0"
        run.mkdir(parents=True)
        rec = {"variant": variant, "seed": 0, "train_s": 1.0, "test_mmu": 0.5}
        (run / "score.json").write_text(json.dumps(rec if version is None else {**rec, "version": version}))
    ablation = Ablation(json.loads(json.dumps(BASE)), out, variants, seeds=[0], log=lines.append)
    assert [r["variant"] for r in ablation.run(train=False)] == ["unified-nolora"]
    assert any("unified-lora seed 0" in l and f"(record version 2, now {RECORD_VERSION})" in l for l in lines)
    assert any("left out: full seed 0, unified-lora seed 0, joint seed 0" in l for l in lines)
    real = {"model": {"preset": "omnimamba-1.3b"}}
    unified = {"model": {"preset": "omnimamba-1.3b", "overrides": {"decoupled_vocab": False}}}
    assert still_valid({"version": 2}, real) and still_valid({}, real) and still_valid({"version": 2}, unified)
    assert not still_valid({}, unified) and not still_valid({"version": 2}, {"model": {"preset": "shapes-small"}})


def test_a_failed_parallel_run_is_named_and_the_others_finish(tmp_path):
    from omnimamba.training.ablation import Ablation

    base = json.loads(json.dumps(BASE))
    out = tmp_path / "abl"
    ablation = Ablation(base, out, ["full", "unified-nolora"], seeds=[0], n_images=2, n_prompts=2, log=lambda *a: None)
    # One run fails in its own process (its metrics log cannot be opened: a folder stands in its place); the
    # other one still finishes.
    (out / "runs" / "unified-nolora" / "seed0" / "metrics.jsonl").mkdir(parents=True)
    with pytest.raises(UserError, match=r"1 run\(s\) failed: unified-nolora seed 0"):
        ablation.run(jobs=2)
    assert (out / "runs" / "full" / "seed0" / "score.json").is_file()


def test_a_running_runs_progress_is_read_from_its_metrics_log(tmp_path):
    from omnimamba.training.ablation_pool import _progress

    spec = {"config": {"run": {"out": str(tmp_path)}, "stages": [{"name": "stage1-mmu", "steps": 30},
                                                                 {"name": "stage2-unified", "steps": 300}]}}
    assert _progress(spec) == "starting"  # no log yet
    log = tmp_path / "metrics.jsonl"
    for records, expected in [([{"stage": "vq-tokenizer", "step": 10}], "starting"),
                              ([{"stage": "stage1-mmu", "step": 20}], "stage1-mmu step 21/30"),
                              ([{"stage": "stage1-mmu", "step": 29}, {"stage": "stage2-unified", "step": 120}],
                               "stage2-unified step 121/300"),
                              ([{"stage": "stage2-unified", "step": 299}], "scoring")]:
        log.write_text("".join(json.dumps(r) + "\n" for r in records))
        assert _progress(spec) == expected
    log.write_text('{"stage": "stage1-mmu", "step": 9}\n{"stage": "stage1-mmu", "st')  # a line being written
    assert _progress(spec) == "stage1-mmu step 10/30"


def test_split_losses_are_token_weighted_means_over_the_ground_truth():
    import torch

    from omnimamba.data.formats import images_to_tensor
    from omnimamba.data.shapes import ShapesConfig, ShapesWorld
    from omnimamba.evaluation.shapes_eval import split_losses
    from omnimamba.model import OmniMamba, preset
    from omnimamba.sequence import IGNORE_INDEX, MMUBatch, T2IBatch, mmu_example, t2i_prefix
    from omnimamba.tokenizer import TextTokenizer

    torch.manual_seed(0)
    model, tok = OmniMamba(preset("shapes-tiny"), backend="reference"), TextTokenizer.shapes()
    with torch.no_grad():  # token embeddings far from their small initialisation, so every input token matters
        model.backbone.embedding.weight.normal_(0.0, 1.0)
    model.train()
    world = ShapesWorld(ShapesConfig(image_size=model.config.vq.image_size), seed=0)
    got = split_losses(model, tok, world, "test", n_images=3, batch_size=4)  # padded batches of mixed lengths
    assert model.training  # left as it was found

    # Reference: one example at a time (no padding), each example's mean loss weighted by its target count.
    model.eval()
    mmu_sum = mmu_n = t2i_sum = 0.0
    with torch.no_grad():
        for i in range(3):
            s = world.sample("test", i)
            for q in s.questions:
                ex = mmu_example(tok, [(q.question, q.answer)])
                _, loss = model.forward_mmu(MMUBatch.collate(images_to_tensor([s.image]), [ex], tok.special))
                n = sum(label != IGNORE_INDEX for label in ex.labels)
                mmu_sum, mmu_n = mmu_sum + float(loss) * n, mmu_n + n
            codes = model.vq.encode(images_to_tensor([s.image]) * 2 - 1)
            batch = T2IBatch.collate([t2i_prefix(tok, s.captions[0], model.config.max_caption_tokens)], codes,
                                     tok.special, [False])
            t2i_sum += float(model.forward_t2i(batch)[1])
    assert got["mmu_loss"] == pytest.approx(mmu_sum / mmu_n, rel=1e-6)
    assert got["t2i_loss"] == pytest.approx(t2i_sum / 3, rel=1e-6)
    assert got["mmu_off_modality"] == got["t2i_off_modality"] == 0.0  # decoupled vocabularies emit only their own
    # An untrained model is close to uniform over the codebook: a sanity bound on the scale, not a tolerance.
    assert abs(got["t2i_loss"] - math.log(model.config.vq.codebook_size)) < 1.0


def test_split_losses_of_a_unified_vocabulary_are_over_the_ids_sampling_draws_from():
    """A unified vocabulary trains over both modalities' ids but samples with the other modality masked; its
    split losses are the masked ones, so they compare with a decoupled model's (and the loss chunk is kept)."""
    import torch
    import torch.nn.functional as F

    from omnimamba.data.formats import images_to_tensor
    from omnimamba.data.shapes import ShapesConfig, ShapesWorld
    from omnimamba.evaluation.shapes_eval import split_losses
    from omnimamba.model import OmniMamba, preset
    from omnimamba.sequence import T2IBatch, t2i_prefix
    from omnimamba.tokenizer import TextTokenizer

    torch.manual_seed(0)
    model = OmniMamba(preset("shapes-tiny", decoupled_vocab=False), backend="reference").eval()
    tok, model.loss_chunk = TextTokenizer.shapes(), 64
    world = ShapesWorld(ShapesConfig(image_size=model.config.vq.image_size), seed=0)
    got = split_losses(model, tok, world, "test", n_images=2)
    assert model.loss_chunk == 64
    model.loss_chunk = 0
    samples = [world.sample("test", i) for i in range(2)]
    codes = model.vq.encode(images_to_tensor([s.image for s in samples]) * 2 - 1)
    batch = T2IBatch.collate([t2i_prefix(tok, s.captions[0], model.config.max_caption_tokens) for s in samples],
                             codes, tok.special, [False, False])
    with torch.no_grad():
        logits, trained_loss = model.forward_t2i(batch)
    masked = F.cross_entropy(logits.flatten(0, 1), codes.flatten())
    assert got["t2i_loss"] == pytest.approx(float(masked), rel=1e-5)
    assert float(trained_loss) > float(masked) + 1e-3
    # what the masking hides: the mean -log P(image ids), the trained loss less the masked one
    assert got["t2i_off_modality"] == pytest.approx(float(trained_loss - masked), rel=1e-4)


def test_parallel_runs_are_spread_over_the_visible_gpus(tmp_path, monkeypatch):
    """Each run's process sees one GPU, the least busy of those this process may use, and a share of the CPU."""
    import os
    import subprocess

    import torch

    from omnimamba.training import ablation_pool as pool

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert pool._visible_gpus() == ["3", "5"]

    started = []

    class FakeRun:  # finishes at once, having written its score
        def __init__(self, cmd, stdout, stderr, env):
            spec = json.loads(open(cmd[-1]).read())
            started.append((spec["variant"], env["CUDA_VISIBLE_DEVICES"], env["OMP_NUM_THREADS"]))
            out = tmp_path / spec["variant"]
            (out / "score.json").write_text(json.dumps({"variant": spec["variant"], "seed": 0, "train_s": 1.0,
                                                        "test_mmu": 0.5}))
            self.returncode = 0

        def poll(self):
            return self.returncode

    monkeypatch.setattr(subprocess, "Popen", FakeRun)
    monkeypatch.setattr(pool.time, "sleep", lambda s: None)
    todo = [{"variant": v, "seed": 0, "config": {"run": {"out": str(tmp_path / v)}}} for v in "abcde"]
    records = pool.run_in_processes(todo, jobs=4, log=lambda *a: None, describe=str)
    assert sorted(records) == [(v, 0) for v in "abcde"]
    gpus = [g for _, g, _ in started]
    assert gpus[:4] == ["3", "5", "3", "5"]  # the least busy first, in turn
    assert {t for _, _, t in started} == {"2"}  # 8 cores / 4 jobs


def test_a_run_out_of_gpu_memory_beside_others_starts_again_when_fewer_share_its_gpu(tmp_path, monkeypatch):
    """Runs that outgrow a shared GPU are queued again, and that GPU then holds no more at once than the failed
    run had beside it; a run out of memory alone on its GPU fails like any other."""
    import subprocess

    import torch

    from omnimamba.training import ablation_pool as pool

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(pool.time, "sleep", lambda s: None)
    attempts, running, most = {}, set(), []

    class FakeRun:  # "a" runs out of memory the first time; every run ends at its second poll
        def __init__(self, cmd, stdout, stderr, env):
            self.spec = json.loads(open(cmd[-1]).read())
            v = self.spec["variant"]
            attempts[v] = attempts.get(v, 0) + 1
            self.oom = v == "a" and (attempts[v] == 1 or self.spec.get("always_oom"))
            stdout.write("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 MiB.\n" if self.oom else "")
            running.add(v)
            most.append(len(running))
            self.polls, self.returncode = 0, None

        def poll(self):
            self.polls += 1
            if self.polls < 2:
                return None
            running.discard(self.spec["variant"])
            if not self.oom:
                out = Path(self.spec["config"]["run"]["out"])
                (out / "score.json").write_text(json.dumps({"variant": self.spec["variant"], "seed": 0,
                                                            "train_s": 1.0, "test_mmu": 0.5}))
            self.returncode = 1 if self.oom else 0
            return self.returncode

    monkeypatch.setattr(subprocess, "Popen", FakeRun)
    lines = []
    todo = [{"variant": v, "seed": 0, "config": {"run": {"out": str(tmp_path / v)}}} for v in "abcd"]
    records = pool.run_in_processes(todo, jobs=3, log=lines.append, describe=str, status_every=0)
    assert sorted(records) == [(v, 0) for v in "abcd"] and attempts == {"a": 2, "b": 1, "c": 1, "d": 1}
    assert any("a seed 0: starting; b seed 0: starting; c seed 0: starting" in l for l in lines)  # status lines
    assert any("a seed 0: ran out of GPU memory beside 2 other run(s) on GPU 0" in l for l in lines)
    assert most[:3] == [1, 2, 3] and max(most[3:]) <= 2  # three at once until "a" failed, then at most two

    attempts.clear()
    alone = [{"variant": "a", "seed": 0, "always_oom": True, "config": {"run": {"out": str(tmp_path / "a1")}}}]
    (tmp_path / "a1").mkdir()
    with pytest.raises(UserError, match=r"1 run\(s\) failed: a seed 0"):
        pool.run_in_processes(alone, jobs=3, log=lines.append, describe=str)
    assert attempts == {"a": 1}


def test_caption_information_compares_own_other_and_null_captions():
    """caption_information's 'own' is split_losses' T2I loss (the same images and captions); 'other' gives each
    image the next one's caption; 'null' drops every caption; images that share one caption get 0 information."""
    import dataclasses

    import torch

    from omnimamba.data.shapes import ShapesConfig, ShapesWorld
    from omnimamba.evaluation.shapes_eval import caption_information, split_losses
    from omnimamba.model import OmniMamba, preset
    from omnimamba.tokenizer import TextTokenizer

    torch.manual_seed(0)
    model, tok = OmniMamba(preset("shapes-tiny"), backend="reference"), TextTokenizer.shapes()
    with torch.no_grad():  # token embeddings far from their small initialisation, so every caption token matters
        model.backbone.embedding.weight.normal_(0.0, 1.0)
        model.caption_embed.null_caption.normal_(0.0, 1.0)
    model.eval()
    world = ShapesWorld(ShapesConfig(image_size=model.config.vq.image_size), seed=0)
    got = caption_information(model, tok, world, "test", n_images=8, batch_size=3)
    # it reads plain scenes only: with no texture in the world they are the split's first images, split_losses's
    plain = ShapesWorld(ShapesConfig(image_size=model.config.vq.image_size, textured_background=0.0), seed=0)
    assert caption_information(model, tok, plain, "test", n_images=4)["own"] == pytest.approx(
        split_losses(model, tok, plain, "test", n_images=4)["t2i_loss"], rel=1e-5)
    textured = [i for i in range(8) if world.sample("test", i).textured]
    assert textured  # so `world`'s first 8 plain scenes are not its first 8 scenes
    assert got["own"] != pytest.approx(split_losses(model, tok, world, "test", n_images=8)["t2i_loss"], rel=1e-5)
    assert got["information"] == pytest.approx(got["other"] - got["own"])
    assert got["guidance_gap"] == pytest.approx(got["null"] - got["own"])
    # the caption changes the codes' loss (ignored, both differences would be exactly 0: the same codes and batches)
    assert abs(got["information"]) > 1e-5 and abs(got["guidance_gap"]) > 1e-5

    class OneCaption:  # every image captioned alike: another image's caption is this image's own
        def sample(self, split, i):
            return dataclasses.replace(world.sample(split, i), captions=["a red circle"])

    assert caption_information(model, tok, OneCaption(), "test", n_images=4)["information"] == pytest.approx(0.0,
                                                                                                         abs=1e-6)


def test_a_given_vq_still_shares_one_understanding_tokenizer(tmp_path):
    """With model.vq given, the understanding encoder's own tokenizer is still trained once, in the shared
    folder, and every run reads it rather than training one of its own."""
    from omnimamba.model import preset
    from omnimamba.training.ablation import Ablation
    from omnimamba.training.vq import save_vq
    from omnimamba.vision.vq import VQModel

    save_vq(VQModel(preset("shapes-tiny").vq), tmp_path / "given-vq")
    base = {**json.loads(json.dumps(BASE)), "model": {"preset": "shapes-tiny", "vq": str(tmp_path / "given-vq")}}
    ablation = Ablation(base, tmp_path / "abl", ["full"], seeds=[0], log=lambda *a: None)
    vq_dir, cache = ablation._shared_data()
    assert vq_dir == tmp_path / "given-vq" and (tmp_path / "abl" / "shared" / "understanding-vq").is_dir()
    raw = ablation.run_config("full", 0, vq_dir, cache)
    assert raw["model"]["understanding_vq"] == str(tmp_path / "abl" / "shared" / "understanding-vq")
