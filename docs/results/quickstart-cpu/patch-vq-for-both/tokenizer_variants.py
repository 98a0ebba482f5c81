"""Train the quickstart's tokenizer with architecture variants; measure round trip and how deterministic the codes
are: distinct codes per plain image, codes used for a plain-background patch, code entropy over plain images."""
import sys, json, time, torch, numpy as np
from collections import Counter
from omnimamba.vision.vq import VQConfig, VQModel
from omnimamba.training.vq import train_vq
from omnimamba.data.shapes import ShapesWorld, ShapesConfig, BACKGROUND
from omnimamba.data.formats import images_to_tensor
from omnimamba.evaluation.shapes_eval import tokenizer_round_trip
name, steps, batch, lr = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
kw = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
restart = kw.pop("restart", "split"); seed = kw.pop("seed", 0)
torch.manual_seed(seed)
cfg = VQConfig.shapes(ch=kw.pop("ch", 8), codebook_size=kw.pop("codebook_size", 256)).replace(**kw)
vq = VQModel(cfg)
world = ShapesWorld(ShapesConfig(), seed=0, cache=True)
t = time.time()
train_vq(vq, lambda i: world.sample("train", i).image, 10000, steps, lr, batch, seed=seed, foreground_weight=10.0,
         restart=restart, progress=False)
train_s = time.time() - t
trip = tokenizer_round_trip(vq, world, "test", 96)
plain = [s for s in (world.sample("test", i) for i in range(300)) if not s.textured][:150]
codes = vq.encode(images_to_tensor([s.image for s in plain]) * 2 - 1).view(-1, 16, 16)
bgcodes = Counter()
for s, c in zip(plain, codes):
    img = s.image.reshape(16, 4, 16, 4, 3).transpose(0, 2, 1, 3, 4).reshape(16, 16, -1)
    bg = (img == np.array(BACKGROUND * 16)).all(-1)
    bgcodes.update(c[torch.from_numpy(bg)].tolist())
cnt = Counter(codes.flatten().tolist()); p = np.array(list(cnt.values())) / codes.numel()
nbg = sum(bgcodes.values()); top = bgcodes.most_common(1)[0][1] / nbg
res = {"name": name, "cfg": {k: getattr(cfg, k) for k in ("norm", "attention", "ch", "codebook_size")}, "restart": restart,
       "seed": seed, "train_s": round(train_s), "round_trip": trip["round_trip"]["overall"],
       "colours_kept": trip["colours_kept"], "distinct_per_plain_image": float(np.mean([len(torch.unique(c)) for c in codes])),
       "bg_patch_codes": len(bgcodes), "bg_modal_share": top, "unigram_entropy_plain": float(-(p * np.log(p)).sum())}
print(json.dumps(res)); open("/tmp/exp/tok/results.jsonl", "a").write(json.dumps(res) + "\n")
