"""Issue 11's "stage 0" as an experiment: a Shapes text language model to start the quickstart from, the way
the paper starts from a pretrained Mamba-2. It trains the quickstart's own backbone (shapes-tiny: 4 layers,
128 wide) as a plain Mamba-2 LM on the training split's text only (every caption, every question with its
answer, in the quickstart's own formats), then writes it as a Mamba-2 checkpoint that `model.mamba2` loads:

    python pretrain_lm.py OUT_DIR [STEPS] [BATCH] [LR]
    omnimamba quickstart --out RUN --set model.mamba2=OUT_DIR

No image is seen: answers are learned as text priors only (what a text-pretrained model knows).
"""

import sys
import time

import torch
import torch.nn.functional as F

from omnimamba.data.shapes import ShapesConfig, ShapesWorld
from omnimamba.mamba2 import Mamba2LM
from omnimamba.model import preset
from omnimamba.sequence import mmu_example, pad_right
from omnimamba.tokenizer import TextTokenizer

out, steps, batch, lr = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1000, \
    int(sys.argv[3]) if len(sys.argv) > 3 else 64, float(sys.argv[4]) if len(sys.argv) > 4 else 3e-3
torch.manual_seed(0)
tok = TextTokenizer.shapes()
s = tok.special
world = ShapesWorld(ShapesConfig(image_size=64, textured_background=0.3), seed=0, cache=True)  # the quickstart's
t0 = time.perf_counter()
texts = []
for k in range(10_000):  # configs/shapes-tiny.yaml: train_images 10000
    sample = world.sample("train", k)
    texts += [[s.sot, *tok.encode(c), s.eot] for c in sample.captions]
    texts += [[s.sot, *mmu_example(tok, [(q.question, q.answer)]).text_ids] for q in sample.questions]  # ends in [EOT]
print(f"{len(texts)} texts from 10,000 training scenes in {time.perf_counter() - t0:.0f} s")

model = Mamba2LM(preset("shapes-tiny").backbone, backend="reference").train()
opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
gen = torch.Generator().manual_seed(0)
t0, running = time.perf_counter(), None
for step in range(steps):
    pick = torch.randint(len(texts), (batch,), generator=gen).tolist()
    ids = pad_right([texts[i] for i in pick], s.pad)
    labels = pad_right([texts[i][1:] + [-100] for i in pick], -100)
    for g in opt.param_groups:  # linear warm-up over 50 steps, cosine to 10 %
        g["lr"] = lr * min(1.0, (step + 1) / 50) * (0.1 + 0.45 * (1 + torch.cos(torch.tensor(step / steps * 3.14159)).item()))
    logits = model(ids)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
    if step % 100 == 0 or step == steps - 1:
        print(f"step {step:5d}  loss {loss.item():.3f}  (running {running:.3f})  {time.perf_counter() - t0:.0f} s")
model.save_pretrained(out)
print(f"saved {out}: {steps} steps of batch {batch}, lr {lr:g}, {time.perf_counter() - t0:.0f} s of training")
