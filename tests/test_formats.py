"""Real-format readers (LLaVA conversations, COCO captions), the Shapes writer, and their errors."""

import json

import pytest

from omnimamba.cli import main
from omnimamba.data.formats import DataError, load_image, read_coco_captions, read_llava
from omnimamba.data.shapes import ShapesWorld


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    assert main(["data", "shapes", "--out", str(out), "--n", "6", "--split", "val"]) == 0
    return out


def test_written_split_reads_back_in_real_formats(written):
    world = ShapesWorld()
    conv = read_llava(written / "llava.json")
    caps = read_coco_captions(written / "captions.json")
    assert len(conv.samples) == 6 and not conv.skipped
    first = world.sample("val", 0)
    assert conv.samples[0].turns == [(q.question, q.answer) for q in first.questions]
    assert conv.samples[0].meta["question_types"] == [q.type for q in first.questions]
    assert (load_image(conv.samples[0].image) == first.image).all()
    assert [c.caption for c in caps.samples if c.image == conv.samples[0].image] == first.captions
    assert (written / "grid.png").stat().st_size > 0


def test_llava_jsonl_bad_line_is_named(tmp_path, written):
    good = json.dumps({"image": str(written / "images" / "val-000000.png"),
                       "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]})
    (tmp_path / "d.jsonl").write_text(good + "\n{not json\n" + good + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: malformed JSON line"):
        read_llava(tmp_path / "d.jsonl")
    r = read_llava(tmp_path / "d.jsonl", skip_bad=True)
    assert len(r.samples) == 2 and len(r.skipped) == 1 and "d.jsonl:2" in r.skipped[0]


def test_missing_image_and_caption_without_image(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}],
                                                 "annotations": [{"image_id": 1, "caption": "x"}]}))
    with pytest.raises(DataError, match=r"c.json\[annotations 0\]: image file not found"):
        read_coco_captions(tmp_path / "c.json")
    (tmp_path / "d.json").write_text(json.dumps({"images": [], "annotations": [{"image_id": 7, "caption": "x"}]}))
    with pytest.raises(DataError, match=r"caption with no image \(image_id 7"):
        read_coco_captions(tmp_path / "d.json")
    (tmp_path / "e.json").write_text("[\n{\"image\": 1,\n")
    with pytest.raises(DataError, match=r"e.json:3: malformed JSON"):
        read_llava(tmp_path / "e.json")


def test_unreadable_image(tmp_path):
    (tmp_path / "x.png").write_text("not an image")
    with pytest.raises(DataError, match="not a readable image"):
        load_image(tmp_path / "x.png")
    with pytest.raises(DataError, match="image file not found"):
        load_image(tmp_path / "y.png")


def test_picture_grid_makes_room_for_long_texts_and_cuts_past_its_line_limit(tmp_path):
    """The quickstart's picture used to clip a long answer at a fixed 64-pixel text row (its fifth line half
    drawn, the rest dropped): rows are now as tall as their longest text, up to `max_lines` lines, then '...'."""
    import numpy as np
    from PIL import Image

    from omnimamba.data.formats import picture_grid

    img = np.full((64, 64, 3), 200, np.uint8)
    short, long_ = "prompt: a red square", "Q: how many triangles are there? A: zero. " * 4
    sizes = {}
    for name, texts in (("short", [short] * 2), ("long", [short, long_]), ("endless", [short, "word " * 300])):
        picture_grid([(img, t) for t in texts], tmp_path / f"{name}.png", columns=2)
        sheet = np.asarray(Image.open(tmp_path / f"{name}.png").convert("L"))
        sizes[name] = sheet.shape[0]
        assert (sheet[-6:] == 255).all(), name  # the bottom margin stays blank: no text clipped at the edge
    assert sizes["short"] < sizes["long"] < sizes["endless"]
    picture_grid([(img, "word " * 300)], tmp_path / "eight.png", max_lines=8)
    picture_grid([(img, "word " * 3000)], tmp_path / "eight_more.png", max_lines=8)
    assert Image.open(tmp_path / "eight.png").size == Image.open(tmp_path / "eight_more.png").size
    # a row of short texts stays short beside a row with a long one: the long row alone grows
    picture_grid([(img, short)] * 2 + [(img, long_), (img, short)], tmp_path / "rows.png", columns=2)
    assert Image.open(tmp_path / "rows.png").size[1] == sizes["short"] + sizes["long"] - 8
