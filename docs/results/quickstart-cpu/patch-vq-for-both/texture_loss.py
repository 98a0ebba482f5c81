"""T2I loss (nats per code) of a trained model on textured vs plain test scenes, and on the plain renders of
the textured scenes; how much of the code entropy the texture takes."""
import sys, itertools, torch, numpy as np
from omnimamba.model import OmniMamba
from omnimamba.data.shapes import ShapesWorld, ShapesConfig
from omnimamba.evaluation.shapes_eval import _t2i_batches
from omnimamba.data.formats import images_to_tensor
model = OmniMamba.from_pretrained(sys.argv[1]).eval()
tok = model.tokenizer
world = ShapesWorld(ShapesConfig(), seed=0)
samples = [world.sample("test", i) for i in range(120)]
def loss(images, captions):
    codes = model.vq.encode(images_to_tensor(images) * 2 - 1).long()
    tot = n = 0
    with torch.no_grad():
        for b in _t2i_batches(model, tok, captions, codes, False, 32):
            r = model.forward_t2i(b, reduction="sum"); tot += float(r[1]); n += int(r[2])
    return tot / n, codes
tex = [s for s in samples if s.textured]; pla = [s for s in samples if not s.textured]
lt, ct = loss([s.image for s in tex], [s.captions[0] for s in tex])
lp, cp = loss([s.image for s in pla], [s.captions[0] for s in pla])
lr, cr = loss([world.plain_image("test", s.index) for s in tex], [s.captions[0] for s in tex])
print(f"textured {len(tex)}: {lt:.3f} nats/code; plain {len(pla)}: {lp:.3f}; textured scenes rendered plain: {lr:.3f}")
print(f"share of the loss in textured images: {lt*len(tex)/(lt*len(tex)+lp*len(pla)):.1%}")
for name, c in (("textured", ct), ("plain", cp)):
    print(name, "distinct codes", len(torch.unique(c)), "per image", float(np.mean([len(torch.unique(r)) for r in c])))
