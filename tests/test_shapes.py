"""The Shapes world: determinism, disjoint splits, held-out combinations, language coverage."""

import numpy as np
import pytest

from omnimamba.data.shapes import BACKGROUND, HELDOUT_PAIRS, QUESTION_TYPES, ShapesConfig, ShapesWorld, image_hash
from omnimamba.tokenizer import TextTokenizer


def test_same_seed_same_bytes_different_seed_differs():
    a, b, c = ShapesWorld(seed=0), ShapesWorld(seed=0), ShapesWorld(seed=1)
    for i in range(20):
        sa, sb = a.sample("train", i), b.sample("train", i)
        assert sa.image.tobytes() == sb.image.tobytes()
        assert sa.captions == sb.captions and [q.__dict__ for q in sa.questions] == [q.__dict__ for q in sb.questions]
    assert sum(a.sample("train", i).image.tobytes() != c.sample("train", i).image.tobytes() for i in range(20)) >= 19


def test_splits_never_share_an_image_and_hold_out_combinations():
    w = ShapesWorld()
    hashes = {split: {image_hash(w.sample(split, i).image) for i in range(300)} for split in
              ("train", "val", "test", "heldout")}
    for s1 in hashes:
        for s2 in hashes:
            if s1 < s2:
                assert not hashes[s1] & hashes[s2], (s1, s2)
    for split in ("train", "val", "test"):
        for i in range(300):
            assert not {(o.color, o.shape) for o in w.sample(split, i).objects} & HELDOUT_PAIRS
    for i in range(300):
        assert {(o.color, o.shape) for o in w.sample("heldout", i).objects} & HELDOUT_PAIRS


def test_scenes_respect_the_config_and_all_question_types_occur():
    w = ShapesWorld(ShapesConfig(image_size=96, min_objects=2, max_objects=3))
    types = set()
    for i in range(100):
        s = w.sample("val", i)
        assert s.image.shape == (96, 96, 3) and s.image.dtype == np.uint8
        assert 2 <= len(s.objects) <= 3
        types |= {q.type for q in s.questions}
    assert types == set(QUESTION_TYPES)
    pope = [q.pope for i in range(50) for q in w.sample("val", i).questions if q.type == "existence"]
    assert {"random", "popular", "adversarial", None} <= set(pope)


def test_every_text_is_covered_by_the_shapes_tokenizer():
    tok, w = TextTokenizer.shapes(), ShapesWorld()
    for split in ("train", "heldout"):
        for i in range(200):
            s = w.sample(split, i)
            for text in s.captions + [t for q in s.questions for t in (q.question, q.answer)]:
                assert 1 not in tok.encode(text), text  # 1 is [UNK]


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        ShapesWorld().sample("dev", 0)
    with pytest.raises(ValueError, match="max_objects"):
        ShapesConfig(min_objects=3, max_objects=2)


def test_plain_image_is_the_scene_without_its_texture():
    world = ShapesWorld()
    textured = next(world.sample("train", i) for i in range(50) if world.sample("train", i).textured)
    plain = next(world.sample("train", i) for i in range(50) if not world.sample("train", i).textured)
    assert np.array_equal(world.plain_image("train", plain.index), plain.image)
    image = world.plain_image("train", textured.index)
    background = (image == np.array(BACKGROUND, dtype=np.uint8)).all(-1)
    drawn = (textured.image != image).any(-1)
    # the texture is gone from the background and only from there: every changed pixel was background
    assert background.mean() > 0.5 and drawn.any() and background[drawn].all()
