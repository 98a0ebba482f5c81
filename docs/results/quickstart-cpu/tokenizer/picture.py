"""Ground truth beside each tokenizer's round trip, for the first test renders holding a red or yellow object:
  python picture.py OUT.png VQ_DIR [VQ_DIR ...]"""
import sys

import numpy as np
import torch
from PIL import Image

from omnimamba.data.formats import images_to_tensor
from omnimamba.data.shapes import ShapesWorld
from omnimamba.training.vq import load_vq
from omnimamba.vision.vq import to_uint8

world = ShapesWorld()
samples = [s for s in world.samples("test", 200) if {"red", "yellow"} & {o.color for o in s.objects}][:6]
columns = [np.stack([s.image for s in samples])]
for path in sys.argv[2:]:
    with torch.no_grad():
        vq = load_vq(path).eval()
        columns.append(to_uint8(vq.decode(vq.encode(images_to_tensor([s.image for s in samples]) * 2 - 1))))
gap = np.full((64, 4, 3), 255, np.uint8)
rows = [np.concatenate([x for col in columns for x in (col[i], gap)][:-1], 1) for i in range(len(samples))]
grid = np.concatenate([np.concatenate([r, np.full((4, r.shape[1], 3), 255, np.uint8)]) for r in rows])
Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(sys.argv[1])
