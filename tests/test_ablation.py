"""`omnimamba ablate`: the variants' configs, the statistics and claim verdicts, and a tiny run end to end."""

import json
import math

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
    assert [r["verdict"] for r in vocab["comparisons"]] == ["agrees", "not run"]


def test_ablate_end_to_end_and_resumes(tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "base.json"  # JSON is YAML
    cfg.write_text(json.dumps(BASE))
    out = tmp_path / "abl"
    args = ["ablate", "--config", str(cfg), "--variants", "full", "unified-nolora", "ratio-1:1", "--seeds", "1",
            "--n-images", "2", "--n-prompts", "2", "--out", str(out)]
    assert main(args) == 0
    report = json.loads((out / "ablation.json").read_text())
    assert [r["variant"] for r in report["records"]] == ["full", "unified-nolora", "ratio-1:1"]
    full, unified, same = report["records"]
    assert same["same_as"] == "full" and same["test_mmu"] == full["test_mmu"]  # the base ratio is 1:1: one run
    for r in (full, unified):
        assert set(r) >= {"test_mmu", "test_pope_f1", "test_t2i", "test_t2i_unguided", "heldout_mmu", "heldout_t2i"}
        assert all(0 <= r[k] <= 1 for k in ("test_mmu", "test_t2i", "heldout_mmu"))
    saved = json.loads((out / "runs" / "unified-nolora" / "seed0" / "stage2-unified" / "config.json").read_text())
    assert saved["omnimamba"]["decoupled_vocab"] is False and saved["omnimamba"]["task_lora"] is False
    table = (out / "ablation.md").read_text()
    assert "| full |" in table and "| unified-nolora |" in table and "omnimamba ablate" in table
    assert (out / "shared" / "vq").is_dir()

    # A rerun trains nothing: every run is read back from its score.json.
    from omnimamba.training.loop import Trainer

    monkeypatch.setattr(Trainer, "run", lambda *a, **k: pytest.fail("a finished run was trained again"))
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().out.count("seed 0: reusing") == 2  # ratio-1:1 is still the same run as full
    assert json.loads((out / "ablation.json").read_text())["records"] == report["records"]
