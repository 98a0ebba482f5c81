"""Training end to end on the tiny preset: freeze plans by which parameters move, exact resumption, 2-process
DDP equal to one process, loss going down, and the command line."""

import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from omnimamba.cli import main
from omnimamba.data.vocabulary import COLORS
from omnimamba.errors import UserError
from omnimamba.training.checkpoint import list_checkpoints
from omnimamba.training.config import config_from_dict
from omnimamba.training.loop import Trainer


def tiny_config(out, stages, overrides=None, **run):
    return config_from_dict({
        "model": {"preset": "shapes-tiny", "train_understanding": False, "overrides": overrides or {}},
        "data": {"shapes": {"train_images": 64}},
        "stages": stages,
        "run": {"out": str(out), "eval_images": 0, "eval_prompts": 0, "progress": False, "log_every": 1,
                "tensorboard": False, **run},
    })


def quiet(*args, **kwargs):
    pass


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("stage,batch", [("stage1-mmu", [4, 0]), ("stage1-t2i", [0, 4]), ("stage2-unified", [2, 2])])
def test_freeze_plan_by_which_parameters_change(tmp_path, stage, batch):
    # with learned MMU positions (the official release's), which every stage that trains MMU must train
    cfg = tiny_config(tmp_path, [{"name": stage, "steps": 1, "lr": 0.01, "batch": batch}], {"mmu_positions": 256})
    trainer = Trainer(cfg, log=quiet)
    before = snapshot(trainer.model)
    trainer.run()
    after = trainer.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}

    def any_changed(prefix):
        return any(k.startswith(prefix) for k in changed)

    assert not any_changed("understanding.") and not any_changed("vq.")
    lora_mmu = {k for k in changed if ".lora_A.mmu." in k or ".lora_B.mmu." in k}
    lora_t2i = {k for k in changed if ".lora_A.t2i." in k or ".lora_B.t2i." in k}
    base = {k for k in changed if k.startswith("backbone.") and ".lora_" not in k}
    if stage == "stage1-mmu":
        assert lora_mmu and any_changed("projector.") and any_changed("mmu_pos_embed") and not lora_t2i and not base
        assert not any_changed("image_") and not any_changed("caption_embed.") and not any_changed("t2i_pos_embed")
    elif stage == "stage1-t2i":
        assert lora_t2i and any_changed("image_embedding.") and any_changed("t2i_pos_embed")
        assert not lora_mmu and not base and not any_changed("projector.") and not any_changed("mmu_pos_embed")
    else:
        assert lora_mmu and lora_t2i and base and any_changed("projector.") and any_changed("image_embedding.")
        assert any_changed("mmu_pos_embed") and any_changed("t2i_pos_embed")


def test_resume_continues_bit_for_bit(tmp_path):
    stages = [{"name": "stage2-unified", "steps": 6, "lr": 0.005, "warmup": 2, "batch": [2, 2]}]
    straight = Trainer(tiny_config(tmp_path / "a", stages, ckpt_every=3), log=quiet)
    straight.run()
    ckpts = list_checkpoints(tmp_path / "a" / "checkpoints")
    assert [json.loads((c / "state.json").read_text())["step"] for c in ckpts] == [2, 5]
    # A run killed after step 3: its checkpoint at step 2 (written by the straight run itself) and
    # a half-written one, which must never be taken for a good checkpoint.
    _resume_dir(tmp_path / "a", tmp_path / "b", 2)
    (tmp_path / "b" / "checkpoints" / ".tmp-ckpt-00-00000004-1").mkdir()
    resumed = Trainer(tiny_config(tmp_path / "b", stages, ckpt_every=3), log=quiet)
    resumed.run(resume=True)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_refuses_a_config_that_cannot_continue_the_run_and_names_what_changed(tmp_path):
    """A config whose stage at the checkpoint's index is another one, or gives it fewer steps than the checkpoint
    has run, is refused before anything is written (the run's train_config.json stays the one it started with);
    a longer stage continues, and the log names each changed setting by its --set key."""
    def stages(steps, name="stage2-unified", batch=(2, 2)):
        return [{"name": name, "steps": steps, "lr": 0.005, "warmup": 2, "batch": list(batch)}]

    Trainer(tiny_config(tmp_path, stages(6), ckpt_every=3), log=quiet).run()  # checkpoints at steps 2 and 5
    started_with = (tmp_path / "train_config.json").read_text()
    with pytest.raises(UserError, match=r"step 5 of 'stage2-unified', past the 4 steps .* stages\.0\.steps above 5"):
        Trainer(tiny_config(tmp_path, stages(4), ckpt_every=3), log=quiet).run(resume=True)
    with pytest.raises(UserError, match=r"'stage2-unified' \(stage 0\), but this config's stages are \['stage1-t2i'\]"):
        Trainer(tiny_config(tmp_path, stages(6, "stage1-t2i", (0, 2)), ckpt_every=3), log=quiet).run(resume=True)
    assert (tmp_path / "train_config.json").read_text() == started_with
    lines = []
    Trainer(tiny_config(tmp_path, stages(8), ckpt_every=3), log=lines.append).run(resume=True)
    changed = next(line for line in lines if "settings changed" in line)
    assert changed.endswith(": stages.0.steps: 6 -> 8")
    assert any("resumed from" in line and "(step 5)" in line for line in lines)
    assert json.loads((tmp_path / "train_config.json").read_text())["stages"][0]["steps"] == 8


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out, stages, strategy="ddp", micro_batch=0, ckpt_every=500, resume=False,
                overrides=None):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    config = tiny_config(out, stages, overrides, strategy=strategy, micro_batch=micro_batch, ckpt_every=ckpt_every)
    trainer = Trainer(config, log=quiet)
    trainer.run(resume=resume)
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
             for k, v in trainer.model.state_dict().items()}
    if rank == 0:
        torch.save(state, Path(out) / "final.pt")
    torch.distributed.barrier()  # no rank tears down while another still talks to it
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("strategy,micro_batch", [("ddp", 0), ("fsdp", 0), ("ddp", 1), ("fsdp", 1)])
def test_two_processes_equal_one_process(tmp_path, strategy, micro_batch):
    """micro_batch 1: each process also accumulates its share over two micro-batches, gradients reduced once."""
    # two stages: a wrapper made for the first must not act in the second. A small learning rate: Adam's first step
    # moves every element by lr * sign(gradient), so an element whose gradient is at rounding level may go either
    # way, and at lr 5e-3 those few flipped elements changed the next steps' gradients enough to flip many more
    # (the 17-wide conv's model, one process with and without micro-batches: 39-63 % of the elements apart by over
    # 1e-6 after three steps). At 5e-5: 0.012 % apart, against 62 % for a half batch's training (a lost reduction).
    stages = [{"name": "stage1-mmu", "steps": 1, "lr": 5e-5, "batch": [4, 0]},
              {"name": "stage2-unified", "steps": 2, "lr": 5e-5, "batch": [4, 4]}]
    single = Trainer(tiny_config(tmp_path / "single", stages), log=quiet)
    single.run()
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "ddp"), stages, strategy, micro_batch), nprocs=2,
             join=True)
    ddp = torch.load(tmp_path / "ddp" / "final.pt")
    # Every step's loss (the global mean, as rank 0 logs it) and gradient norm (after the reduction, before
    # clipping) as one process: a wrong normalisation shows here, where Adam's scale-free update would hide it.
    logged = [[(r["loss"], r["grad_norm"]) for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text()
                                                          .splitlines()) if "grad_norm" in r]
              for run in ("single", "ddp")]
    assert len(logged[0]) == 3
    torch.testing.assert_close(torch.tensor(logged[1]), torch.tensor(logged[0]), rtol=1e-4, atol=0)
    # Equal up to the order of floating-point sums (gloo's all-reduce vs one batch; half the batch per process, or
    # micro-batches, also change the order of the sums inside the scan's batched matrix products): the few elements
    # whose gradient is at rounding level differ by up to 2 lr; a wrong loss normalisation or a lost reduction
    # moves most elements.
    _assert_same_training(ddp, single.model.state_dict(), share=1e-3)


@pytest.mark.slow
def test_fsdp_trains_when_one_process_alone_drops_a_caption(tmp_path):
    """At caption_dropout 0.5 step 0 drops the caption of sample 0 (process 0's) and keeps sample 1's (process 1's):
    the learned null caption is used on one process only. It must still get a gradient (zeros) on the other, or
    FSDP2's reduce-scatter and the gradient-norm all-reduce differ between the processes (2 GPUs hung at step 1).
    Two processes must then train as one; a hang fails the test after 4 minutes instead of stalling the suite."""
    import numpy as np

    drops = [bool(np.random.default_rng([0, 31, i]).random() < 0.5) for i in range(2)]
    assert drops == [True, False]  # the premise: step 0's T2I samples, one per process
    stages = [{"name": "stage2-unified", "steps": 2, "lr": 0.005, "batch": [2, 2]}]
    overrides = {"caption_dropout": 0.5}
    single = Trainer(tiny_config(tmp_path / "single", stages, overrides), log=quiet)
    single.run()
    ctx = mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "fsdp"), stages, "fsdp", 0, 500, False, overrides),
                   nprocs=2, join=False)
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("two FSDP2 processes hung when only one dropped a caption")
    _assert_same_training(torch.load(tmp_path / "fsdp" / "final.pt"), single.model.state_dict(), share=1e-2)


@pytest.mark.slow
def test_the_two_gpu_equivalence_benchmark_rehearses_on_cpu(tmp_path):
    """benchmarks/multi_gpu_equivalence.py --smoke: 1 vs 2 processes (DDP, FSDP2) and resuming across process counts
    through `omnimamba train` under torchrun (gloo, float32): every step's loss and the final weights agree."""
    import subprocess
    import sys

    out = tmp_path / "report.json"
    rc = subprocess.run([sys.executable, "benchmarks/multi_gpu_equivalence.py", "--smoke", "--out", str(tmp_path / "runs"),
                         "--out-json", str(out)], cwd=Path(__file__).resolve().parents[1], timeout=600).returncode
    assert rc == 0
    rows = {r["run"]: r for r in json.loads(out.read_text())["comparisons"]}
    assert set(rows) == {"one-micro", "ddp", "fsdp", "fsdp-then-one", "one-then-fsdp"}
    for r in rows.values():
        assert r["steps_compared"] == r["steps_expected"] > 0
        assert r["max_rel_loss_diff"] < 1e-5 and r["weights_rel_distance"] < 1e-5, r


def _assert_same_training(state, reference, share):
    """Every element within 1e-3 of the reference's, and fewer than `share` of them off by more than 1e-6."""
    mismatched = total = 0
    for k, v in reference.items():
        torch.testing.assert_close(state[k], v, rtol=1e-3, atol=1e-3, msg=lambda m: f"{k}: {m}")
        mismatched += int(((state[k] - v).abs() > 1e-6).sum())
        total += v.numel()
    assert mismatched / total < share


def _resume_dir(src, dst, step):
    """A run stopped after `step`: its checkpoint there, and the tokenizer's codes it had cached."""
    (dst / "checkpoints").mkdir(parents=True)
    ckpt = next(c for c in list_checkpoints(src / "checkpoints") if json.loads((c / "state.json").read_text())["step"] == step)
    os.system(f"cp -r {ckpt} {dst / 'checkpoints'}/ && cp {src / 'codes.safetensors'} {src / 'codes.json'} {dst}/")


@pytest.mark.slow
def test_fsdp_checkpoints_resume_on_another_number_of_processes(tmp_path):
    """A checkpoint written by 2 FSDP2 processes mid-stage resumes on 1 process, and one written by 1 process
    resumes on 2 FSDP2 processes; both end where the uninterrupted runs end. Equal up to the order of sums: over
    four Adam steps about a tenth of a percent of the elements move by more than 1e-6 (a wrong resume, most)."""
    stages = [{"name": "stage2-unified", "steps": 4, "lr": 0.005, "warmup": 1, "batch": [4, 4]}]
    single = Trainer(tiny_config(tmp_path / "one", stages, ckpt_every=2), log=quiet)
    single.run()
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "two"), stages, "fsdp", 0, 2), nprocs=2, join=True)
    two = torch.load(tmp_path / "two" / "final.pt")
    expected = {k: v.detach() for k, v in single.model.state_dict().items()}
    _assert_same_training(two, expected, share=1e-2)  # the two layouts train alike ...

    _resume_dir(tmp_path / "two", tmp_path / "two-then-one", 1)  # ... 2 processes -> 1
    resumed = Trainer(tiny_config(tmp_path / "two-then-one", stages, ckpt_every=2), log=quiet)
    resumed.run(resume=True)
    _assert_same_training({k: v.detach() for k, v in resumed.model.state_dict().items()}, two, share=1e-2)

    _resume_dir(tmp_path / "one", tmp_path / "one-then-two", 1)  # ... 1 process -> 2
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "one-then-two"), stages, "fsdp", 0, 2, True),
             nprocs=2, join=True)
    _assert_same_training(torch.load(tmp_path / "one-then-two" / "final.pt"), expected, share=1e-2)
    logged = [[r["loss"] for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
               if r.get("step", -1) >= 2] for run in ("one", "two-then-one", "one-then-two")]
    assert len(logged[0]) == 2 and logged[1] == pytest.approx(logged[0], rel=1e-4) == logged[2]


@pytest.mark.slow
def test_cli_train_lowers_the_loss_and_writes_everything(tmp_path, capsys):
    rc = main(["train", "--config", "configs/shapes-tiny.yaml", "--set", f"run.out={tmp_path}",
               "--set", "vq_train.steps=5", "--set", "data.shapes.train_images=128",
               "--set", "stages.0.steps=12", "--set", "stages.1.steps=12", "--set", "stages.2.steps=4",
               "--set", "run.eval_images=3", "--set", "run.eval_prompts=4", "--set", "run.progress=false",
               "--set", "run.log_every=1"])
    assert rc == 0
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    mmu = [r["mmu_loss"] for r in rows if r.get("stage") == "stage1-mmu" and "mmu_loss" in r]
    t2i = [r["t2i_loss"] for r in rows if r.get("stage") == "stage1-t2i" and "t2i_loss" in r]
    assert sum(mmu[-3:]) < sum(mmu[:3]) and sum(t2i[-3:]) < sum(t2i[:3])
    for stage in ("stage1-mmu", "stage1-t2i", "stage2-unified"):
        assert (tmp_path / stage / "model.safetensors").is_file()
        assert (tmp_path / "eval" / f"{stage}-{ {'stage1-mmu': 12, 'stage1-t2i': 12, 'stage2-unified': 4}[stage]:07d}.png").is_file()
    assert (tmp_path / "vq" / "model.safetensors").is_file()
    assert "trainable" in capsys.readouterr().out
    for stage in ("vq-tokenizer", "understanding-tokenizer"):  # decoupled encoders: one tokenizer each
        vq = [r for r in rows if r.get("stage") == stage]
        assert [r["step"] for r in vq] == [0, 1, 2, 3, 4] and all(r["recon_loss"] > 0 for r in vq)
    # the frozen understanding encoder is the understanding tokenizer's (LlamaGen's architecture), not the VQ's
    from omnimamba.model import OmniMamba
    from omnimamba.training.vq import load_vq

    model, own = OmniMamba.from_pretrained(tmp_path / "stage2-unified"), load_vq(tmp_path / "understanding-vq")
    assert own.config.encoder == "conv" and model.config.vq.encoder == "patch"
    for k, v in own.encoder.state_dict().items():
        assert torch.equal(model.understanding.encoder.state_dict()[k], v), k
    evals = [r for r in rows if "eval_t2i" in r]
    assert len(evals) == 3 and all(r["eval_t2i_unguided"] is not None for r in evals)
    assert main(["plot", str(tmp_path)]) == 0
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_plot_reads_a_resumed_run_and_names_a_missing_file(tmp_path, capsys):
    from omnimamba.evaluation.curves import read_metrics, stage_offsets

    rows = [{"stage": "vq-tokenizer", "step": 0, "recon_loss": 1.0},
            {"stage": "stage1-mmu", "step": 0, "mmu_loss": 3.0}, {"stage": "stage1-mmu", "step": 9, "mmu_loss": 2.0},
            {"stage": "stage2-unified", "step": 0, "mmu_loss": 1.5, "t2i_loss": 6.0},
            {"stage": "stage2-unified", "step": 0, "mmu_loss": 1.4, "t2i_loss": 5.9},  # after a resume
            {"stage": "stage2-unified", "step": 0, "eval_mmu": 0.5, "eval_t2i": 0.1}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    recs = read_metrics(tmp_path)
    assert len(recs) == 5 and [r["mmu_loss"] for r in recs if r["stage"] == "stage2-unified" and "mmu_loss" in r] == [1.4]
    assert stage_offsets(recs) == {"vq-tokenizer": 0, "understanding-tokenizer": 0, "stage1-mmu": 0, "stage2-unified": 10}
    assert main(["plot", str(tmp_path / "nowhere")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_runs_compare_by_the_examples_each_task_has_seen(tmp_path, capsys):
    from omnimamba.evaluation.curves import examples_seen

    stages = [{"name": "stage1-mmu", "steps": 10, "batch": [4, 0]}, {"name": "stage1-t2i", "steps": 5, "batch": [0, 8]},
              {"name": "stage2-unified", "steps": 3, "batch": [2, 6]}]
    rows = [{"stage": "vq-tokenizer", "step": 0, "recon_loss": 1.0},
            {"stage": "stage1-mmu", "step": 9, "mmu_loss": 2.0, "eval_mmu": 0.3},
            {"stage": "stage1-t2i", "step": 0, "t2i_loss": 5.0},
            {"stage": "stage2-unified", "step": 1, "mmu_loss": 1.0, "t2i_loss": 4.0, "eval_mmu": 0.5, "eval_t2i": 0.1}]
    # stage 2's second step: 10 x 4 + 2 x 2 MMU examples, 5 x 8 + 2 x 6 T2I examples; the tokenizer's row dropped
    assert [(r["seen_mmu"], r["seen_t2i"]) for r in examples_seen(rows, stages)] == [(40, 0), (40, 8), (44, 52)]
    with pytest.raises(UserError, match="stage 'stage9'"):
        examples_seen([{"stage": "stage9", "step": 0}], stages)

    runs = []
    for n, scale in enumerate((1, 4)):  # two runs, the second at four times the batch
        run = tmp_path / f"run{n}"
        run.mkdir()
        big = [{**st, "batch": [b * scale for b in st["batch"]]} for st in stages]
        (run / "train_config.json").write_text(json.dumps({"stages": big, "run": {}}))
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        runs.append(str(run))
    assert main(["plot", *runs, "--out", str(tmp_path / "both.png")]) == 0
    assert (tmp_path / "both.png").stat().st_size > 10_000
    assert main(["plot", *runs, "--by", "step"]) == 2
    assert "--by examples" in capsys.readouterr().err
    (tmp_path / "run1" / "train_config.json").unlink()
    assert main(["plot", *runs, "--out", str(tmp_path / "x.png")]) == 2
    assert "no train_config.json" in capsys.readouterr().err and not (tmp_path / "x.png").exists()


def test_cli_rejects_bad_config_before_work(tmp_path, capsys):
    rc = main(["train", "--set", "stages.0.name=stage9", "--set", f"run.out={tmp_path / 'x'}"])
    assert rc == 2 and "unknown stage 'stage9'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    # a --stage the config does not have used to train the tokenizers, then run nothing
    rc = main(["train", "--config", "configs/shapes-tiny.yaml", "--stage", "stage2", "--set", f"run.out={tmp_path / 'x'}"])
    assert rc == 2 and "['stage1-mmu', 'stage1-t2i', 'stage2-unified']" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_train_tokenizers_only_stops_before_the_stages_and_a_later_run_reuses_them(tmp_path):
    small = ["data.shapes.train_images=16", "vq_train.steps=2", "vq_train.batch=4", "run.progress=false",
             "run.tensorboard=false", "run.eval_images=0", "run.eval_prompts=0"]
    sets = [a for kv in small + [f"run.out={tmp_path / 'tok'}"] for a in ("--set", kv)]
    assert main(["train", "--config", "configs/shapes-tiny.yaml", "--tokenizers-only", *sets]) == 0
    made = sorted(p.name for p in (tmp_path / "tok").iterdir())
    assert {"vq", "understanding-vq", "codes.safetensors"} <= set(made), made
    assert not any(p.startswith("stage") or p == "checkpoints" for p in made), made
    reuse = small + [f"run.out={tmp_path / 'run'}", f"model.vq={tmp_path / 'tok' / 'vq'}",
                     f"model.understanding_vq={tmp_path / 'tok' / 'understanding-vq'}",
                     "stages.0.steps=1", "stages.1.steps=1", "stages.2.steps=1", "stages.2.batch=[2,2]"]
    assert main(["train", "--config", "configs/shapes-tiny.yaml", "--stage", "stage2-unified",
                 *[a for kv in reuse for a in ("--set", kv)]]) == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in rows} == {"stage2-unified"}  # no tokenizer trained again


def test_the_same_training_code_runs_on_real_formats(tmp_path):
    # LLaVA conversations + COCO captions on disk (written by `omnimamba data shapes`), read like real data
    assert main(["data", "shapes", "--out", str(tmp_path / "d"), "--n", "8", "--split", "train"]) == 0
    cfg = config_from_dict({
        "model": {"preset": "shapes-tiny"},
        "data": {"source": "files", "llava": str(tmp_path / "d" / "llava.json"),
                 "coco": str(tmp_path / "d" / "captions.json")},
        "stages": [{"name": "stage2-unified", "steps": 2, "lr": 0.005, "batch": [2, 2]}],
        "run": {"out": str(tmp_path / "run"), "eval_images": 0, "eval_prompts": 0, "progress": False,
                "tensorboard": False},
    })
    trainer = Trainer(cfg, log=quiet)
    trainer.run()
    assert trainer.t2i_source.codes.shape == (8, 256)  # one code row per image, shared by its 3 captions
    assert len(trainer.t2i_source.samples) == 24
    assert (tmp_path / "run" / "stage2-unified" / "model.safetensors").is_file()


@pytest.mark.slow
def test_quickstart_end_to_end_writes_its_report(tmp_path, capsys):
    rc = main(["quickstart", "--out", str(tmp_path), "--set", "run.progress=false", "--set", "vq_train.steps=5",
               "--set", "stages.0.steps=2", "--set", "stages.1.steps=2", "--set", "stages.2.steps=2",
               "--set", "data.shapes.train_images=64", "--set", "run.eval_images=2", "--set", "run.eval_prompts=4"])
    assert rc == 0
    report = json.loads((tmp_path / "results.json").read_text())
    for split in ("test", "heldout"):
        assert set(report[split]) == {"mmu", "t2i_guided", "t2i_unguided"}
        assert report[split]["t2i_guided"]["n"] == 48
    assert report["vq_round_trip_heldout"]["n"] == 48 and 0 <= report["vq_round_trip_heldout"]["overall"] <= 1
    assert report["baselines"]["t2i_ground_truth"]["overall"] >= 0.99
    assert set(report["vq_colours_kept"]) <= set(COLORS) and all(0 <= v <= 1 for v in report["vq_colours_kept"].values())
    assert (tmp_path / "quickstart.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "chance baselines" in out
    t2i = report["test"]["t2i_guided"], report["test"]["t2i_unguided"]  # each category, guided / unguided
    assert f"position {t2i[0]['position']:.0%} / {t2i[1]['position']:.0%}" in out


def test_multi_turn_mmu_examples_draw_distinct_questions_of_their_image():
    from omnimamba.data.shapes import ShapesWorld
    from omnimamba.training.data import ShapesMMU

    world = ShapesWorld(seed=0)
    single, multi = ShapesMMU(world, 50, seed=3), ShapesMMU(world, 50, seed=3, max_turns=4)
    counts = set()
    for i in range(40):
        image, turns = multi.example(i)
        sample = world.sample("train", i % 50)
        assert (image == sample.image).all() and 1 <= len(turns) <= 4
        # distinct questions of the list (two POPE negatives can name the same absent object: equal text)
        pool = [(q.question, q.answer) for q in sample.questions]
        assert all(turns.count(t) <= pool.count(t) for t in turns)
        assert multi.example(i)[1] == turns  # deterministic per index
        assert len(single.example(i)[1]) == 1
        counts.add(len(turns))
    assert counts == {1, 2, 3, 4}


def test_balanced_existence_questions_are_half_yes_and_keep_one_negative_per_example():
    from omnimamba.data.shapes import ShapesWorld
    from omnimamba.training.data import ShapesMMU

    world = ShapesWorld(seed=0)
    shares = {}
    for balance in (False, True):
        source = ShapesMMU(world, 200, seed=0, max_turns=4, balance_existence=balance)
        answers = []
        for i in range(1500):
            turns = source.example(i)[1]
            negatives = [q for q, a in turns if q.startswith("is there") and a == "no"]
            assert len(negatives) <= (3 if not balance else 1)
            answers += [a for q, a in turns if q.startswith("is there")]
        shares[balance] = answers.count("yes") / len(answers)
    assert 0.2 < shares[False] < 0.3 and 0.45 < shares[True] < 0.55  # 1 "yes" : 3 "no", then 1 : 1


def test_relation_share_trains_the_relation_caption_and_the_spatial_question_that_much_more_often():
    from omnimamba.data.shapes import ShapesWorld, relation_caption
    from omnimamba.training.config import ShapesSection
    from omnimamba.training.data import ShapesMMU, ShapesT2I

    world, n = ShapesWorld(seed=0), 400
    codes = torch.arange(n)[:, None]
    t2i = {s: ShapesT2I(world, n, codes, seed=1, relation_share=s) for s in (0.0, 0.5, 1.0)}
    mmu = {s: ShapesMMU(world, n, seed=1, max_turns=4, relation_share=s) for s in (0.0, 1.0)}
    plain_t2i, plain_mmu = ShapesT2I(world, n, codes, seed=1), ShapesMMU(world, n, seed=1, max_turns=4)
    taken, scenes = [], 0
    for i in range(2 * n):
        sample = world.sample("train", i % n)
        rel = relation_caption(sample.objects)
        assert rel is None or rel == sample.captions[-1]
        before = plain_t2i.example(i)[0]
        assert t2i[0.0].example(i)[0] == before  # a share of 0 draws what the source always drew
        assert t2i[1.0].example(i)[0] == (rel or before)
        if rel:
            scenes += 1
            taken.append(t2i[0.5].example(i)[0] == rel)
        turns, forced = mmu[0.0].example(i)[1], mmu[1.0].example(i)[1]
        assert turns == plain_mmu.example(i)[1] and len(forced) == len(turns)
        spatial = [(q.question, q.answer) for q in sample.questions if q.type == "spatial"]
        assert set(spatial) <= set(forced) and len(set(forced) - set(turns)) <= len(spatial)
    # relation scenes (4 captions) take theirs with probability 0.5 + 0.5 / 4 at a share of 0.5
    assert scenes > 60 and abs(sum(taken) / scenes - 0.625) < 3 * (0.625 * 0.375 / scenes) ** 0.5
    with pytest.raises(UserError, match="relation_share is a share of examples, from 0 to 1"):
        ShapesSection(relation_share=1.5)


def test_a_rank_that_cannot_see_rank_0s_files_names_the_shared_filesystem(tmp_path):
    from omnimamba.training.inputs import written_by_rank0

    with pytest.raises(UserError, match="filesystem every node shares"):  # rank 1 on a node without rank 0's run.out
        written_by_rank0(1, tmp_path / "codes.json", "the image-code cache")


def test_optimizer_state_is_saved_by_parameter_name_and_older_index_keyed_checkpoints_still_load():
    from omnimamba.training.checkpoint import load_optimizer, optimizer_state, optimizer_tensors

    def trained(model):
        model[0].weight.requires_grad_(False)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(2):
            model(torch.randn(5, 3)).pow(2).sum().backward()
            opt.step()
        return opt

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    opt = trained(model)
    tensors, meta = optimizer_tensors(optimizer_state(model, opt))
    assert sorted({k.rsplit(".", 1)[0] for k in tensors}) == ["state.0.bias", "state.2.bias", "state.2.weight"]
    sd = opt.state_dict()
    old_tensors = {f"state.{i}.{k}": v for i, s in sd["state"].items() for k, v in s.items()}  # the older layout
    for written, written_meta in ((tensors, meta), (old_tensors, {"param_groups": sd["param_groups"]})):
        fresh = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        load_optimizer(model, fresh, written, written_meta)
        for i, state in sd["state"].items():
            for k, v in state.items():
                assert torch.equal(fresh.state_dict()["state"][i][k], v), (i, k)


def test_cpu_training_uses_deterministic_algorithms_and_puts_the_settings_back(tmp_path):
    """Two CPU runs of one seed in two processes drifted apart (docs/results/quickstart-cpu/README.md) until the
    trainer turned on torch's deterministic algorithms; it does so for its run only."""
    import torch.utils.deterministic as settings

    seen = []

    class Probe(Trainer):
        def run_stage(self, *args):
            seen.append((torch.are_deterministic_algorithms_enabled(), settings.fill_uninitialized_memory))
            return super().run_stage(*args)

    assert not torch.are_deterministic_algorithms_enabled()
    Probe(tiny_config(tmp_path, [{"name": "stage1-mmu", "steps": 1, "lr": 0.001, "batch": [2, 0]}]), log=quiet).run()
    assert seen == [(True, False)]
    assert not torch.are_deterministic_algorithms_enabled() and settings.fill_uninitialized_memory


def test_run_backend_picks_the_kernels_and_refuses_what_cannot_run_here(tmp_path, monkeypatch):
    stages = [{"name": "stage1-mmu", "steps": 1, "lr": 0.001, "batch": [2, 0]}]
    with pytest.raises(UserError, match="run.backend must be one of auto, reference, fla, got 'triton'"):
        tiny_config(tmp_path, stages, backend="triton")
    trainer = Trainer(tiny_config(tmp_path / "ref", stages, backend="reference"), log=quiet)
    assert trainer.model.backend == "reference"
    # fla needs CUDA and its package: refused with the fix, before any work (pretend neither is here).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="run.backend is 'fla', which cannot run here .* use auto or reference"):
        Trainer(tiny_config(tmp_path / "fla", stages, backend="fla"), log=quiet)
    assert not (tmp_path / "fla").exists()


def test_adamw_is_fused_where_torch_has_the_kernel_and_steps_as_the_loop_does(tmp_path):
    from omnimamba.training.optim import adamw, fused_possible

    torch.manual_seed(0)
    params = [torch.randn(7, 5, requires_grad=True), torch.randn(5, requires_grad=True)]
    twins = [p.detach().clone().requires_grad_(True) for p in params]
    fused, loop = adamw(params, lr=1e-2, weight_decay=0.1), adamw(twins, lr=1e-2, weight_decay=0.1, fused=False)
    assert fused.defaults["fused"] and not loop.defaults["fused"]
    for _ in range(5):
        grads = [torch.randn_like(p) for p in params]
        for group, opt in ((params, fused), (twins, loop)):
            for p, g in zip(group, grads):
                p.grad = g.clone()
            opt.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert not fused_possible([torch.zeros(2, device="meta")]) and not fused_possible([])
    # the trainer's optimizer follows optim.fused (None: fused where possible)
    stages = [{"name": "stage1-mmu", "steps": 1, "lr": 0.001, "batch": [2, 0]}]
    for setting, expected in ((None, True), (False, False)):
        cfg = config_from_dict({"model": {"preset": "shapes-tiny"}, "data": {"shapes": {"train_images": 8}},
                                "stages": stages, "optim": {"fused": setting},
                                "run": {"out": str(tmp_path / str(setting)), "progress": False, "tensorboard": False}})
        trainer = Trainer(cfg, log=quiet)
        assert trainer._optimizer(trainer.model).defaults["fused"] is expected


def test_t2i_plain_trains_on_the_scenes_drawn_plain(tmp_path):
    stages = [{"name": "stage1-t2i", "steps": 1, "batch": [0, 2]}]
    trainer = Trainer(config_from_dict({"model": {"preset": "shapes-tiny"}, "stages": stages,
                                        "data": {"shapes": {"train_images": 16, "t2i_plain": True}},
                                        "run": {"out": str(tmp_path), "progress": False, "tensorboard": False}}),
                      log=quiet)
    trainer.prepare_data()
    from omnimamba.data.formats import images_to_tensor

    world, vq = trainer.world, trainer.model.vq
    textured = [i for i in range(16) if world.sample("train", i).textured]
    assert textured
    encode = lambda images: vq.encode(images_to_tensor(images) * 2 - 1)
    assert torch.equal(trainer.t2i_source.codes, encode([world.plain_image("train", i) for i in range(16)]).long())
    assert not torch.equal(trainer.t2i_source.codes[textured],
                           encode([world.sample("train", i).image for i in textured]).long())


def test_a_tokenizer_of_another_architecture_is_named_not_loaded(tmp_path):
    # a run folder left by an older version (LlamaGen's encoder) under a preset whose VQ has a patch encoder
    from omnimamba.training.vq import save_vq
    from omnimamba.vision.vq import VQConfig, VQModel

    save_vq(VQModel(VQConfig.shapes()), tmp_path / "vq")
    cfg = config_from_dict({"model": {"preset": "shapes-tiny"}, "vq_train": {"steps": 2},
                            "stages": [{"name": "stage1-t2i", "steps": 1, "batch": [0, 2]}],
                            "run": {"out": str(tmp_path), "progress": False, "tensorboard": False}})
    with pytest.raises(UserError, match=r"VQ tokenizer: .*vq holds a tokenizer of another architecture: .*encoder 'conv' \(wanted 'patch'\)"):
        Trainer(cfg, log=quiet).prepare_vq()
