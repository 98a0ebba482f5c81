"""The Shapes scorer, validated: ground truth scores >= 99%, random images near 0; metric formulas."""

import numpy as np
import pytest

from omnimamba.data.shapes import ShapesWorld
from omnimamba.data.shapes import PALETTE
from omnimamba.evaluation.shapes_scorer import (MMURecord, chance_baselines, colours_kept, normalize_answer,
                                                parse_image, parse_prompt, pope_metrics, score_mmu, score_t2i,
                                                t2i_eval_set)


@pytest.fixture(scope="module")
def world():
    return ShapesWorld()


def test_t2i_scorer_on_ground_truth_and_random_images(world):
    for split in ("test", "heldout"):
        prompts = t2i_eval_set(world, split, 200)
        gt = score_t2i([world.sample(split, i).image for _, i in prompts], [p for p, _ in prompts])
        assert gt["overall"] >= 0.99 and set(gt) >= {"single_object", "two_object", "counting", "position"}
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in prompts]
    assert score_t2i(noise, [p for p, _ in prompts])["overall"] <= 0.05
    shuffled = [world.sample("heldout", i + 1000).image for _, i in prompts]
    assert score_t2i(shuffled, [p for p, _ in prompts])["overall"] <= 0.1


def test_parse_image_finds_the_drawn_objects(world):
    s = world.sample("test", 3)
    found = parse_image(s.image)
    assert sorted((d.color, d.shape) for d in found) == sorted((o.color, o.shape) for o in s.objects)
    for o in s.objects:
        assert any(abs(d.cx - o.cx) < 1.5 and abs(d.cy - o.cy) < 1.5 for d in found)


def test_colours_kept_counts_each_colour_and_catches_a_swap(world):
    samples = [world.sample("test", i) for i in range(60)]
    objects = [s.objects for s in samples]
    assert colours_kept(objects, [s.image for s in samples]) == {c: 1.0 for c in {o.color for s in samples for o in s.objects}}
    # paint every yellow pixel orange (the quickstart tokenizer's failure): yellow is lost, nothing else
    swapped = []
    for s in samples:
        image = s.image.copy()
        image[(image == PALETTE["yellow"]).all(-1)] = PALETTE["orange"]
        swapped.append(image)
    kept = colours_kept(objects, swapped)
    assert kept.pop("yellow") == 0.0 and set(kept.values()) == {1.0}
    # an object drawn elsewhere does not count
    blank = [np.full_like(s.image, 232) for s in samples]
    assert set(colours_kept(objects, blank).values()) == {0.0}


def test_parse_prompt_forms():
    r = parse_prompt("two red circles, a blue square and an orange triangle")
    assert r.counts == (("blue", "square", 1), ("orange", "triangle", 1), ("red", "circle", 2))
    assert r.category == "two_object"
    assert parse_prompt("There are three green squares.").category == "counting"
    rel = parse_prompt("a red circle left of a blue square")
    assert rel.relation == ("red circle", "left", "blue square") and rel.category == "position"
    with pytest.raises(ValueError, match="cannot read"):
        parse_prompt("a cat on a mat")


def test_pope_metrics_formula():
    golds = ["yes", "yes", "no", "no", "no"]
    preds = ["yes", "no", "yes", "no", "No."]
    m = pope_metrics(golds, preds)
    # tp=1 fp=1 fn=1 tn=2
    assert m["accuracy"] == pytest.approx(3 / 5) and m["precision"] == pytest.approx(0.5)
    assert m["recall"] == pytest.approx(0.5) and m["f1"] == pytest.approx(0.5) and m["yes_ratio"] == pytest.approx(0.4)


def test_mmu_exact_match_is_normalised():
    assert normalize_answer("  Two .") == "two"
    records = [MMURecord("counting", "two", "Two."), MMURecord("counting", "two", "three"),
               MMURecord("color", "red", "red")]
    r = score_mmu(records)
    assert r["accuracy"]["counting"] == 0.5 and r["accuracy"]["color"] == 1.0
    assert r["accuracy"]["overall"] == pytest.approx(2 / 3)


def test_chance_baselines(world):
    b = chance_baselines(world, "test", 60)
    for kind in ("random", "popular", "adversarial"):
        assert b["mmu_always_yes"]["pope"][kind]["yes_ratio"] == 1.0
        assert b["mmu_always_yes"]["pope"][kind]["accuracy"] == pytest.approx(0.5)
    assert b["t2i_ground_truth"]["overall"] >= 0.99 and b["t2i_random_image"]["overall"] <= 0.1
    assert 0.2 < b["mmu_most_frequent_answer"]["accuracy"]["overall"] < 0.6


def test_t2i_failure_names_what_is_wrong():
    from omnimamba.data.shapes import Shape, ShapesConfig, render
    from omnimamba.evaluation.shapes_scorer import t2i_failure

    cfg = ShapesConfig()
    red_sq = Shape("square", "red", "large", 16, 32, 9)
    blue_ci = Shape("circle", "blue", "large", 48, 32, 9)
    draw = lambda *objects: render(list(objects), cfg)
    pair = parse_prompt("a red square left of a blue circle")
    assert t2i_failure(draw(red_sq, blue_ci), pair) is None
    assert t2i_failure(draw(), pair) == "nothing drawn"
    assert t2i_failure(draw(red_sq), pair) == "too few objects"
    assert t2i_failure(draw(red_sq, blue_ci, Shape("triangle", "green", "small", 32, 10, 6)), pair) == "too many objects"
    assert t2i_failure(draw(red_sq, Shape("circle", "green", "large", 48, 32, 9)), pair) == "wrong colour"
    assert t2i_failure(draw(red_sq, Shape("triangle", "blue", "large", 48, 32, 9)), pair) == "wrong shape"
    swapped = draw(Shape("square", "red", "large", 48, 32, 9), Shape("circle", "blue", "large", 16, 32, 9))
    assert t2i_failure(swapped, pair) == "wrong relation"
    result = score_t2i([draw(red_sq, blue_ci), draw(), draw(red_sq)], ["a red square left of a blue circle"] * 3)
    assert result["failures"] == {"nothing drawn": 1, "too few objects": 1} and result["position"] == 1 / 3
