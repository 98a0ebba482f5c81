"""The official release's checkpoint: its key set (tests/data/official_layout.json, written down from the
release's code), a small random-weight checkpoint in that layout loaded and run against an independent forward
(tests/official_reference.py), conversion both ways, and the errors a wrong file gets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from helpers.official_reference import OfficialReference
from omnimamba.errors import UserError
from omnimamba.mamba2 import Mamba2Config
from omnimamba.model import OmniMamba, OmniMambaConfig, preset
from omnimamba.model.official import load_official, save_official, to_official
from omnimamba.sequence import OFFICIAL_SPECIAL_TOKENS, mmu_prompt
from omnimamba.tokenizer import TextTokenizer
from omnimamba.vision.understanding import UnderstandingConfig
from omnimamba.vision.vq import VQConfig, VQModel

LAYOUT = json.loads((Path(__file__).parent / "data" / "official_layout.json").read_text())
WORDS = ["<|endoftext|>", "USER:", "ASSISTANT:", "what", "colour", "is", "the", "circle", "?", "a", "red", "blue",
         "square", "two", "picture", "A", "green", "big", "small", "on", "left", "right"]
TIMM_PAIR = ("vit_tiny_patch16_224", "deit_tiny_patch16_224")  # small stand-ins for the dinosiglip pair


def base_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def tiny_config() -> OmniMambaConfig:
    base = len(WORDS)
    return OmniMambaConfig(
        backbone=Mamba2Config(d_model=64, n_layer=2, vocab_size=base + len(OFFICIAL_SPECIAL_TOKENS), d_state=16,
                              headdim=16, chunk_size=8),
        understanding=UnderstandingConfig(backbones=TIMM_PAIR, image_size=32),
        vq=VQConfig.shapes(ch=8, codebook_size=64),
        text_base_vocab_size=base, conventions="official", mmu_positions=64, caption_dropout=0.0, lora_dropout=0.0,
    )


def expand(dims: dict) -> dict[str, tuple[int, ...]]:
    """The layout's keys with {i} over the layers and shapes evaluated for `dims`."""
    out = {}
    for entry in LAYOUT["keys"]:
        shape = tuple(int(eval(s, {}, dict(dims))) for s in entry["shape"])
        keys = [entry["key"].format(i=i) for i in range(dims["n_layer"])] if "{i}" in entry["key"] else [entry["key"]]
        out.update({k: shape for k in keys})
    return out


def official_checkpoint(dims: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the layout's names (not produced by our model): the LLM part from the JSON, the
    vision part from timm models built as dinosiglip_vit.py builds them, the VQ from LlamaGen's layout."""
    import timm

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in expand(dims).items():
        if key.endswith(("A_log",)):
            sd[key] = torch.empty(shape).uniform_(0, 2.7, generator=g)
        elif key.endswith(("D", "norm.weight", "norm_f.weight")):
            sd[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            sd[key] = 0.1 * torch.randn(shape, generator=g)
    for tied, source in (("lm_head.weight", "backbone.embedding.weight"),
                         ("img_head.weight", "backbone.img_embeddings.word_embeddings.weight")):
        sd["llm_backbone.mamba." + tied] = sd["llm_backbone.mamba." + source]
    for prefix, name in zip(("vision_backbone.dino_featurizer.", "vision_backbone.siglip_featurizer."), TIMM_PAIR):
        torch.manual_seed(seed)
        m = timm.create_model(name, pretrained=False, num_classes=0, img_size=32)
        sd.update({prefix + k: v for k, v in m.state_dict().items()})
    vq = VQModel(tiny_config().vq)
    sd.update({"llm_backbone.vqvae." + k: v for k, v in vq.state_dict().items()})
    sd["llm_backbone.vqvae.quantize.codebook_used"] = torch.zeros(65536)
    return sd


TINY = {"d": 64, "n_layer": 2, "vocab_rows": 32, "d_state": 16, "headdim": 16, "K": 64, "N": 256, "F": 384,
        "mmu_positions": 64, "rank": 8}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    folder = tmp_path_factory.mktemp("official")
    sd = official_checkpoint(TINY)
    torch.save(sd, folder / "OmniMamba-1.3b.pth")
    base_tokenizer().save(str(folder / "tokenizer.json"))
    return folder, sd


def test_layout_of_the_release_matches_our_13b_model_key_for_key():
    """Our 1.3B official preset, written under the official names, has exactly the release's keys and shapes."""
    import timm

    with torch.device("meta"):
        model = OmniMamba(preset("omnimamba-1.3b-official"))
        names = {k: tuple(v.shape) for k, v in to_official(model).items()}
        want = expand(LAYOUT["dims"]["omnimamba-1.3b"])
        for group in LAYOUT["groups"]:
            if "timm" in group:
                m = timm.create_model(group["timm"], pretrained=False, num_classes=0, img_size=group["img_size"])
                want.update({group["prefix"] + k: tuple(v.shape) for k, v in m.state_dict().items()})
    vq = {k: v for k, v in names.items() if k.startswith("llm_backbone.vqvae.")}
    assert len(vq) > 100 and names["llm_backbone.vqvae.quantize.embedding.weight"] == (16384, 8)
    rest = {k: v for k, v in names.items() if k not in vq}
    assert sorted(set(rest) - set(want)) == [] and sorted(set(want) - set(rest)) == []
    assert {k: v for k, v in rest.items() if want[k] != v} == {}


def test_tokenizer_gets_the_official_ids(tmp_path):
    base_tokenizer().save(str(tmp_path / "tokenizer.json"))
    tok = TextTokenizer.official(tmp_path / "tokenizer.json")
    n = len(WORDS)
    # prompting_utils.py: [PAD] first, then the nine tokens in their order
    assert [tok.tokenizer.token_to_id(t) for t in OFFICIAL_SPECIAL_TOKENS] == list(range(n, n + 10))
    s = tok.special
    assert (s.pad, s.soi, s.eoi, s.sot, s.eot, s.t2i, s.mmu) == (n, n + 1, n + 2, n + 3, n + 4, n + 5, n + 6)
    assert s.end == 0 and tok.vocab_size == n + 10  # answers end at <|endoftext|>
    tok.save(tmp_path / "saved.json")
    again = TextTokenizer.from_file(tmp_path / "saved.json")
    assert again.conventions == "official" and again.special == s
    assert mmu_prompt(" what colour? ", "official") == "USER: what colour? ASSISTANT:"
    assert tiny_config().special == s


def test_official_checkpoint_loads_and_answers_as_the_official_forward(release):
    folder, sd = release
    model = load_official(folder, config=tiny_config(), backend="reference")
    tok = model.tokenizer
    assert tok is not None and tok.conventions == "official"
    ref = OfficialReference(sd, d_state=16, headdim=16)
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    question = tok.encode(mmu_prompt("what colour is the circle ?", "official"))
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].double() / 255
    import timm

    featurizers = {}
    for prefix, name in zip(("dino_featurizer", "siglip_featurizer"), TIMM_PAIR):
        m = timm.create_model(name, pretrained=False, num_classes=0, img_size=32).eval()
        m.load_state_dict({k.split(prefix + ".", 1)[1]: v for k, v in sd.items() if prefix + "." in k})
        featurizers[prefix] = m
    with torch.no_grad():
        image_emb = ref.vision(featurizers, pixels)
    s = tok.special
    want, want_logits = ref.mmu_greedy(image_emb, {"mmu": s.mmu, "soi": s.soi, "eoi": s.eoi, "sot": s.sot},
                                       question, steps=6)
    ours = model.generate_text(pixels.float(), torch.tensor([question]), max_new_tokens=6, stop_at_eot=False)
    # Our answers may hold text tokens and end-of-text only: compare where the reference stays inside them.
    allowed = [t < model.config.text_base_vocab_size for t in want]
    k = allowed.index(False) if False in allowed else len(want)
    assert k >= 3 and ours[0, :k].tolist() == want[:k]
    # the first step's logits, float32 against float64
    with torch.no_grad():
        x = model.mmu_embeddings(pixels.float(), torch.tensor([question]))  # positions included
        logits = model.text_logits(model.backbone(x, task="mmu")[:, -1])[0].double()
    assert torch.allclose(logits, want_logits[0][: logits.numel()], rtol=1e-4, atol=1e-4)


def test_official_checkpoint_generates_the_official_codes(release):
    folder, sd = release
    model = load_official(folder, config=tiny_config(), backend="reference")
    tok = model.tokenizer
    from omnimamba.sequence import t2i_prefix

    ids, caption = t2i_prefix(tok, "two red circle", model.config.max_caption_tokens)
    assert len(ids) == 72 and ids[2:2 + 65] == [tok.special.pad] * 65  # inference_t2i.py: 68 slots, padded in front
    want = OfficialReference(sd, d_state=16, headdim=16).t2i_greedy(ids, steps=10)
    codes = model.generate_image_codes(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long),
                                       torch.tensor([caption]), **model.config.image_sampling)
    assert codes.shape == (1, 256) and codes[0, :10].tolist() == want
    # guidance runs the release's null prompt ("A picture") as the unconditional row
    images = model.generate_images(["two red circle"], guidance_scale=2.0, seed=0)
    assert images[0].size == (64, 64)


def test_convert_both_ways_keeps_every_tensor(release, tmp_path):
    folder, sd = release
    model = load_official(folder, config=tiny_config(), backend="reference")
    save_official(model, tmp_path / "back.pth")
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    model.save_pretrained(tmp_path / "ours")
    again = OmniMamba.from_pretrained(tmp_path / "ours", backend="reference")
    assert again.config.conventions == "official" and again.tokenizer.special == model.tokenizer.special
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


def test_cli_convert_official(release, tmp_path):
    from omnimamba.cli import main

    folder, _ = release
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(tiny_config().to_dict()))
    assert main(["convert", "official", str(folder), str(tmp_path / "out"), "--config", str(cfg)]) == 0
    model = OmniMamba.from_pretrained(tmp_path / "out", backend="reference")
    assert model.config.conventions == "official"
    from PIL import Image

    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(tmp_path / "photo.png")
    out = str(tmp_path / "out")
    assert main(["answer", "what colour is the circle ?", "--image", str(tmp_path / "photo.png"), "--model", out,
                 "--max-new-tokens", "3", "--device", "cpu"]) == 0
    assert main(["generate", "a red circle", "--n", "1", "--model", out, "--out", str(tmp_path / "gen"),
                 "--device", "cpu"]) == 0
    assert (tmp_path / "gen" / "image-000.png").is_file()
    assert main(["convert", "to-official", str(tmp_path / "out"), str(tmp_path / "re.pth")]) == 0
    assert (tmp_path / "re.pth").is_file()


@pytest.mark.parametrize("damage, message", [
    (lambda sd: sd.update({"llm_backbone.mamba.backbone.extra": torch.zeros(1)}), "left over"),
    (lambda sd: sd.pop("llm_backbone.mamba.backbone.mmu_pos_embed"), "missing"),
    (lambda sd: sd.update({"llm_backbone.mamba.backbone.pos_embed": torch.zeros(1, 5, 64)}), "has shape"),
    (lambda sd: sd.update({"llm_backbone.mamba.lm_head.weight": torch.zeros(32, 64)}), "differs from"),
])
def test_a_wrong_checkpoint_is_an_error_that_names_the_key(release, tmp_path, damage, message):
    _, sd = release
    sd = dict(sd)
    damage(sd)
    torch.save(sd, tmp_path / "OmniMamba-1.3b.pth")
    with pytest.raises(UserError, match=message):
        load_official(tmp_path, config=tiny_config(), backend="reference")


def test_missing_vq_and_tokenizer_are_named(release, tmp_path):
    _, sd = release
    torch.save({k: v for k, v in sd.items() if not k.startswith("llm_backbone.vqvae.")}, tmp_path / "OmniMamba-1.3b.pth")
    with pytest.raises(UserError, match="vq_ds16_t2i.pt"):
        load_official(tmp_path, config=tiny_config(), backend="reference")
    torch.save({"model": VQModel(tiny_config().vq).state_dict()}, tmp_path / "vq_ds16_t2i.pt")
    model = load_official(tmp_path, config=tiny_config(), backend="reference")
    assert model.tokenizer is None
    with pytest.raises(UserError, match="tokenizer.json"):
        model.answer(np.zeros((32, 32, 3), np.uint8), "what")
    with pytest.raises(UserError, match="no such file or folder"):
        load_official(tmp_path / "nothing-here", config=tiny_config())
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no official checkpoint in it"):
        load_official(tmp_path / "empty", config=tiny_config())


def test_server_answers_as_the_model_does_and_guides_with_the_null_prompt(release):
    """The server on an official-conventions model: positions fed in the batcher, the null prompt's row."""
    pytest.importorskip("fastapi")
    import base64
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from omnimamba.serving.app import create_app

    folder, _ = release
    model = load_official(folder, config=tiny_config(), backend="reference")
    array = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    question = "what colour is the circle ?"
    alone = model.answer(array, question, max_new_tokens=6)
    with TestClient(create_app(model, max_batch=4)) as c:
        r = c.post("/v1/chat/completions", json={"max_tokens": 6, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}]})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == alone
        r = c.post("/v1/images/generations", json={"prompt": "a red circle", "guidance": 2.0, "seed": 1})
        assert r.status_code == 200 and len(r.json()["data"]) == 1
