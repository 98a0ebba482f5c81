"""Standard benchmarks in their own file formats: readers on files the tests write, scorers against values
computed by hand, the resumable prediction loop, FID against the closed form, and `omnimamba eval` end to end
on Shapes data exported in each format."""

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from omnimamba.cli import main
from omnimamba.errors import UserError
from omnimamba.evaluation import fid as fid_mod
from omnimamba.evaluation import predict as predict_mod
from omnimamba.evaluation.mcq import parse_option, read_mcq, score_mcq
from omnimamba.evaluation.mme import parse_answer as mme_parse
from omnimamba.evaluation.mme import read_mme, score_mme
from omnimamba.evaluation.pope import parse_answer as pope_parse
from omnimamba.evaluation.pope import pope_metrics, read_pope, score_pope
from omnimamba.evaluation.predict import Item, predict
from omnimamba.evaluation.vqa import normalize_answer, read_vqa, score_vqa, vqa_accuracy


def png(path: Path, color=(200, 30, 30), size=16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)
    return path


# --- POPE ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("answer,parsed", [
    ("Yes.", "yes"), ("yes, there is a dog", "yes"), ("No, there is not.", "no"), ("no", "no"),
    ("There is not a dog in the image", "no"), ("No. Yes.", "no"), ("Yes. No.", "yes"),  # first sentence only
    ("blue", "yes"), ("", "yes"),  # POPE counts anything without no/not as yes
])
def test_pope_reads_answers_as_its_own_script_does(answer, parsed):
    assert pope_parse(answer) == parsed


def test_pope_metrics_by_hand_and_the_reader(tmp_path):
    # gold: y y n n n; read as: y n y n y ("Not" with a capital is not one of POPE's words) -> TP 1, FN 1,
    # FP 2, TN 1: accuracy 2/5, precision 1/3, recall 1/2, F1 2/5, yes-ratio 3/5
    m = pope_metrics(["yes", "yes", "no", "no", "no"], ["Yes", "No", "yes, it is", "no", "Not at all"])
    assert m["accuracy"] == pytest.approx(2 / 5) and m["precision"] == pytest.approx(1 / 3)
    assert m["recall"] == pytest.approx(0.5) and m["f1"] == pytest.approx(0.4) and m["yes_ratio"] == pytest.approx(0.6)
    png(tmp_path / "img" / "a.jpg")
    recs = [{"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?", "label": "yes"},
            {"question_id": 2, "image": "a.jpg", "text": "Is there a cat in the image?", "label": "no"}]
    (tmp_path / "coco_pope_random.json").write_text("".join(json.dumps(r) + "\n" for r in recs))
    items = read_pope([tmp_path / "coco_pope_random.json"], tmp_path / "img", suffix="One word.")
    assert [it.id for it in items] == ["random/1", "random/2"]
    assert items[0].prompt == "Is there a dog in the image? One word." and items[0].image == tmp_path / "img" / "a.jpg"
    result = score_pope(items, {"random/1": "Yes", "random/2": "Yes"})
    assert result["random"]["precision"] == pytest.approx(0.5) and result["mean"]["f1"] == pytest.approx(2 / 3)
    (tmp_path / "bad.json").write_text('{"question_id": 1, "image": "a.jpg"}\n')
    with pytest.raises(UserError, match=r"bad.json:1: not a POPE record"):
        read_pope([tmp_path / "bad.json"], tmp_path)


# --- MME ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("answer,parsed", [("Yes", "yes"), ("no", "no"), ("Yes, it is.", "yes"),
                                           ("No, it is not", "no"), ("I think so", "other"), ("not sure", "no")])
def test_mme_reads_answers_by_their_first_four_characters(answer, parsed):
    assert mme_parse(answer) == parsed


def test_mme_acc_plus_needs_both_questions_of_an_image(tmp_path):
    # Both layouts: existence/ with images beside the text files, artwork/ with images/ and questions_answers_YN/.
    for name in ("1", "2"):
        png(tmp_path / "existence" / f"{name}.png")
        (tmp_path / "existence" / f"{name}.txt").write_text(
            "Is there a dog in this image? Please answer yes or no.\tYes\nIs there a cat? Please answer yes or no.\tNo\n")
    png(tmp_path / "artwork" / "images" / "p.jpg")
    (tmp_path / "artwork" / "questions_answers_YN").mkdir()
    (tmp_path / "artwork" / "questions_answers_YN" / "p.txt").write_text("Is it a painting?\tYes\nIs it a photo?\tNo\n")
    (tmp_path / "code_reasoning").mkdir()
    png(tmp_path / "code_reasoning" / "c.png")
    (tmp_path / "code_reasoning" / "c.txt").write_text("Does it print 3?\tYes\nDoes it print 4?\tNo\n")
    items = read_mme(tmp_path)
    assert {it.meta["task"] for it in items} == {"existence", "artwork", "code_reasoning"} and len(items) == 8
    preds = {"existence/1/0": "Yes", "existence/1/1": "No",   # image 1: both right
             "existence/2/0": "Yes", "existence/2/1": "Yes",  # image 2: one wrong
             "artwork/p/0": "yes", "artwork/p/1": "maybe",    # 'other' is wrong
             "code_reasoning/c/0": "Yes", "code_reasoning/c/1": "No"}
    r = score_mme(items, preds)
    ex = r["tasks"]["existence"]
    assert (ex["acc"], ex["acc_plus"], ex["score"]) == (75.0, 50.0, 125.0)
    assert r["tasks"]["artwork"]["score"] == 50.0 and r["perception"] == 175.0 and r["cognition"] == 200.0
    (tmp_path / "count").mkdir()
    png(tmp_path / "count" / "x.png")
    (tmp_path / "count" / "x.txt").write_text("How many?\tthree\n")
    with pytest.raises(UserError, match=r"x.txt: line 1 is not 'question<TAB>Yes\|No'"):
        read_mme(tmp_path)


# --- VQA ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,normal", [("Two", "2"), ("the dog", "dog"), ("A red car.", "red car"),
                                         ("none", "0"), ("yes!", "yes!"), ("3,000", "3000"), ("dont", "don\u2019t")])
def test_vqa_answer_normalisation_is_the_official_one(text, normal):
    assert normalize_answer(text) == normal


def test_vqa_ten_annotator_rule_and_gqa_exact_match(tmp_path):
    assert vqa_accuracy("two", ["2"] * 10) == 1.0
    # 2 of 10 humans agree: each leave-one-out subset scores min(1, matches / 3): (2 * 1/3 + 8 * 2/3) / 10
    assert vqa_accuracy("2", ["2"] * 2 + ["3"] * 8) == pytest.approx(0.6)
    assert vqa_accuracy("Yes", ["yes"] * 3 + ["no"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("cat", ["dog"] * 10) == 0.0
    questions = {"questions": [{"question_id": 7, "image_id": 3, "question": "How many?"},
                               {"question_id": 8, "image_id": 3, "question": "What color?"}]}
    annotations = {"annotations": [
        {"question_id": 7, "answer_type": "number", "answers": [{"answer": "2"}] * 10},
        {"question_id": 8, "answer_type": "other", "answers": [{"answer": "red"}] * 4 + [{"answer": "blue"}] * 6}]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    items, style = read_vqa(tmp_path / "q.json", tmp_path / "a.json", tmp_path)
    assert style == "vqav2" and items[0].image == tmp_path / "COCO_val2014_000000000003.jpg"
    r = score_vqa(items, {"vqa/7": "two", "vqa/8": "Red."}, style)
    assert r["per_answer_type"] == {"number": 100.0, "other": 100.0}
    (tmp_path / "gqa.json").write_text(json.dumps({"q1": {"imageId": "n1", "question": "Which side?", "answer": "left"},
                                                   "q2": {"imageId": "n2", "question": "What?", "answer": "the cup"}}))
    items, style = read_vqa(tmp_path / "gqa.json", None, tmp_path)
    assert style == "gqa" and items[0].image == tmp_path / "n1.jpg"
    assert score_vqa(items, {"gqa/q1": "Left.", "gqa/q2": "plate"}, style)["accuracy"] == 50.0
    with pytest.raises(UserError, match="need --annotations"):
        read_vqa(tmp_path / "q.json", None, tmp_path)


# --- multiple choice -------------------------------------------------------------------------------------
@pytest.mark.parametrize("answer,choice", [
    ("B", "B"), ("(C)", "C"), ("D. dark red", "D"), ("The answer is A.", "A"), ("blue", "B"),
    ("it is green.", "C"), ("dark", "D"), ("A or B", None), ("purple", None), ("a red circle", "A"),
])
def test_options_are_read_from_free_text(answer, choice):
    assert parse_option(answer, {"A": "red", "B": "blue", "C": "green", "D": "dark red"}) == choice


def test_mmbench_tsv_and_seed_json(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    (tmp_path / "mmb.tsv").write_text("index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\n"
                                      f"0\tWhat color?\tnan\tred\tblue\tgreen\tpink\tA\tcolor\t{b64}\n"
                                      f"1\tHow many?\tcount them\tone\ttwo\t\t\tB\tcount\t{b64}\n")
    items = read_mcq(tmp_path / "mmb.tsv")
    assert items[0].prompt.splitlines() == ["What color?", "A. red", "B. blue", "C. green", "D. pink",
                                            "Answer with the option's letter from the given choices directly."]
    assert items[1].meta["options"] == {"A": "one", "B": "two"} and items[1].prompt.startswith("count them\n")
    assert items[0].image.shape == (8, 8, 3) and tuple(items[0].image[0, 0]) == (255, 0, 0)
    r = score_mcq(items, {"mmbench/0": "red", "mmbench/1": "C"})
    assert r["accuracy"] == 50.0 and r["unparsed"] == 1
    seed = {"questions": [{"question_id": "s1", "question": "Which?", "choice_a": "x", "choice_b": "y",
                           "choice_c": "z", "choice_d": "w", "answer": "C", "data_id": "i.png"}]}
    (tmp_path / "seed.json").write_text(json.dumps(seed))
    items = read_mcq(tmp_path / "seed.json", tmp_path)
    assert items[0].id == "seed/s1" and items[0].image == tmp_path / "i.png"
    with pytest.raises(UserError, match="give --images"):
        read_mcq(tmp_path / "seed.json")


# --- the prediction loop ---------------------------------------------------------------------------------------
def test_predictions_resume_after_an_interrupted_run(tmp_path, monkeypatch):
    calls = []

    def fake_answer(model, tokenizer, images, questions, max_new_tokens):
        calls.append(list(questions))
        return [q.upper() for q in questions]

    monkeypatch.setattr("omnimamba.inference.answer", fake_answer)
    items = [Item(str(i), None, f"q{i}", {"gold": i}) for i in range(5)]
    out = tmp_path / "pred.jsonl"
    # a run killed in the middle of writing its third record
    out.write_text('{"id": "0", "prediction": "Q0", "gold": 0}\n{"id": "1", "prediction": "Q1", "gold": 1}\n{"id": "2", "pre')
    preds = predict(None, None, items, out, batch_size=2, progress=False)
    assert preds == {str(i): f"Q{i}" for i in range(5)}
    assert calls == [["q2", "q3"], ["q4"]]  # only what was not done
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in lines] == ["0", "1", "2", "3", "4"] and lines[4]["gold"] == 4
    assert predict(None, None, items, out, progress=False) == preds and len(calls) == 2  # nothing left to do
    with pytest.raises(UserError, match="occurs more than once"):
        predict(None, None, items + items[:1], tmp_path / "other.jsonl", progress=False)
    out.write_text('garbage\n{"id": "0", "prediction": "x"}\n')
    with pytest.raises(UserError, match="pred.jsonl:1: not a prediction record"):
        predict_mod.read_predictions(out)


# --- FID -----------------------------------------------------------------------------------------------------
def gaussian_features(mean, std, n=64, dim=4, seed=0):
    """Samples whose empirical mean is `mean` and whose (unbiased) covariance is exactly diag(std^2)."""
    z = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    q, _ = torch.linalg.qr(z)  # orthonormal columns, still zero-mean
    return torch.tensor(mean, dtype=torch.float64) + q * (n - 1) ** 0.5 * torch.tensor(std, dtype=torch.float64)


def test_fid_statistic_equals_the_closed_form_on_known_gaussians():
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Identity(torch.nn.Module):
        num_features = 4

        def forward(self, x):
            return x

    mu1, s1, mu2, s2 = [0.0, 1.0, 2.0, 0.0], [1.0, 2.0, 0.5, 1.0], [1.0, 1.0, 0.0, -1.0], [2.0, 1.0, 0.5, 3.0]
    # diagonal covariances: |mu1 - mu2|^2 + sum(s1^2 + s2^2 - 2 s1 s2) = |mu1 - mu2|^2 + sum((s1 - s2)^2)
    closed = sum((a - b) ** 2 for a, b in zip(mu1, mu2)) + sum((a - b) ** 2 for a, b in zip(s1, s2))
    metric = FrechetInceptionDistance(feature=Identity()).double()
    metric.update(gaussian_features(mu1, s1, seed=1), real=True)
    metric.update(gaussian_features(mu2, s2, seed=2), real=False)
    assert float(metric.compute()) == pytest.approx(closed, rel=1e-4)


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """torch-fidelity's FID InceptionV3, random weights, written as a local file (the real architecture)."""
    from helpers.random_inception import random_inception_state

    path = tmp_path_factory.mktemp("inception") / "inception.pth"
    torch.save(random_inception_state(), path)
    return path


@pytest.mark.slow
def test_fid_runs_the_inception_network_on_the_cpu(tmp_path, inception_weights):
    rng = np.random.default_rng(0)
    for side in ("ref", "other", "noise"):
        (tmp_path / side).mkdir()
        for k in range(4):  # images of different sizes: cropped and resized alike
            if side == "noise":
                image = rng.integers(0, 255, (40 + 8 * k, 48, 3), dtype=np.uint8)
            else:  # flat grey scenes with one coloured square, as different from noise as photos are
                image = np.full((40 + 8 * k, 48, 3), 200, np.uint8)
                y, x = rng.integers(0, 24, 2)
                image[y:y + 16, x:x + 16] = rng.integers(0, 255, 3)
            Image.fromarray(image).save(tmp_path / side / f"{k}.png")
    ref, other, noise = (fid_mod.image_files(tmp_path / s) for s in ("ref", "other", "noise"))
    near = fid_mod.compute_fid(ref, other, inception_weights, progress=False)
    far = fid_mod.compute_fid(ref, noise, inception_weights, progress=False)
    # The features separate kinds of images (random weights that collapse every image to one feature give 0).
    assert 0.1 < near and far > 5 * near  # measured: 2.0 and 39
    assert fid_mod.compute_fid(ref, ref, inception_weights, progress=False) == pytest.approx(0, abs=1e-2)
    assert fid_mod.load_for_inception(ref[1]).shape == (3, 299, 299)


def test_inception_weights_are_checked_before_any_work(tmp_path):
    with pytest.raises(UserError, match="Inception weights not found"):
        fid_mod.check_weights_file(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a PyTorch state dict"):
        fid_mod.check_weights_file(tmp_path / "junk.pth")
    torch.save({"fc.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="not the weights of torch-fidelity's FID InceptionV3"):
        fid_mod.check_weights_file(tmp_path / "other.pth")


def test_coco_30k_captions_one_per_image_with_a_seed(tmp_path):
    anns = [{"image_id": i, "id": 10 * i + k, "caption": f"image {i} caption {k}"} for i in range(6) for k in range(5)]
    (tmp_path / "captions.json").write_text(json.dumps({"annotations": anns}))
    pairs = fid_mod.read_captions(tmp_path / "captions.json", limit=4, seed=3)
    assert len(pairs) == 4 and len({i for i, _ in pairs}) == 4
    assert all(c.startswith(f"image {i} ") for i, c in pairs)
    assert pairs == fid_mod.read_captions(tmp_path / "captions.json", limit=4, seed=3)
    (tmp_path / "c.txt").write_text("a cat\n\na dog\n")
    assert fid_mod.read_captions(tmp_path / "c.txt") == [("000000", "a cat"), ("000002", "a dog")]


# --- end to end on Shapes data exported in each format -------------------------------------------------------
@pytest.fixture(scope="module")
def shapes_model_dir(tmp_path_factory):
    from omnimamba.model import OmniMamba, preset
    from omnimamba.tokenizer import TextTokenizer

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model")
    OmniMamba(preset("shapes-tiny"), backend="reference").save_pretrained(path, tokenizer=TextTokenizer.shapes())
    return path


@pytest.mark.slow
def test_eval_cli_on_exported_shapes_benchmarks(tmp_path, shapes_model_dir, inception_weights, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    for fmt in ("pope", "mme", "vqa", "mcq", "coco"):
        assert main(["data", "shapes", "--split", "test", "--n", "3", "--format", fmt, "--out", str(data / fmt)]) == 0
    common = ["--model", str(shapes_model_dir), "--quiet", "--max-new-tokens", "4"]
    runs = {
        "pope": ["--questions", *map(str, sorted((data / "pope").glob("coco_pope_*.json"))),
                 "--images", str(data / "pope" / "images")],
        "mme": ["--root", str(data / "mme")],
        "vqa": ["--questions", str(data / "vqa" / "questions.json"), "--annotations",
                str(data / "vqa" / "annotations.json"), "--images", str(data / "vqa" / "images"),
                "--image-pattern", "shapes_{image_id:06d}.png"],
        "mcq": ["--file", str(data / "mcq" / "mmbench.tsv")],
    }
    for bench, args in runs.items():
        assert main(["eval", bench, *args, *common, "--out", str(out / bench)]) == 0, bench
        summary = json.loads((out / bench / "summary.json").read_text())
        assert summary["benchmark"] in (bench, "vqav2") and 0 <= summary["headline"] <= 1400
        lines = (out / bench / "predictions.jsonl").read_text().splitlines()
        assert lines and len(lines) == len({json.loads(x)["id"] for x in lines})
    report = capsys.readouterr().out
    assert "POPE mean F1" in report and "MME perception" in report and "OmniMamba-1.3B in the paper" in report
    # a second run finds every answer done and answers nothing again
    before = (out / "pope" / "predictions.jsonl").read_text()
    assert main(["eval", "pope", *runs["pope"], *common, "--out", str(out / "pope")]) == 0
    assert (out / "pope" / "predictions.jsonl").read_text() == before
    # FID: generation from the COCO captions against the exported images, through the Inception network
    assert main(["eval", "fid", "--model", str(shapes_model_dir), "--quiet", "--captions",
                 str(data / "coco" / "captions.json"), "--reference", str(data / "coco" / "images"),
                 "--inception-weights", str(inception_weights), "--batch-size", "2", "--out", str(out / "fid")]) == 0
    summary = json.loads((out / "fid" / "summary.json").read_text())
    assert summary["result"]["generated"] == 3 and np.isfinite(summary["headline"])
    assert len(list((out / "fid" / "images").glob("*.png"))) == 3
    assert main(["eval", "pope", "--model", str(shapes_model_dir), "--questions", str(tmp_path / "none.json"),
                 "--images", str(tmp_path)]) == 2
    assert "POPE question file not found" in capsys.readouterr().err


def tiny_clip(path: Path) -> Path:
    """A CLIP model of transformers' layout with random weights and a character-level tokenizer."""
    import string

    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + ".,":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    path.mkdir(parents=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = CLIPConfig(text_config={**small, "vocab_size": len(vocab)},
                        vision_config={**small, "image_size": 32, "patch_size": 8}, projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(path)
    return path


def test_clip_score_from_a_local_clip_folder(tmp_path):
    clip = tiny_clip(tmp_path / "clip")
    for k in range(2):
        png(tmp_path / "gen" / f"{k}.png", color=(40 * k, 100, 200), size=20)
    files = fid_mod.image_files(tmp_path / "gen")
    score = fid_mod.compute_clip_score(files, ["a red circle", "two blue squares"], clip)
    assert 0 <= score <= 100
    with pytest.raises(UserError, match="not a transformers CLIP folder"):
        fid_mod.compute_clip_score(files, ["x", "y"], tmp_path)
