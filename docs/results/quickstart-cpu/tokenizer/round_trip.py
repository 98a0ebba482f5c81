"""Score tokenizers by their round trip: the T2I scorer on 96 ground-truth test renders after encode + decode
(per category and overall), and per colour the share of drawn objects found again with their colour.
  python round_trip.py VQ_DIR [VQ_DIR ...]        (prints one JSON line per tokenizer)"""
import json
import sys

import torch

from omnimamba.data.formats import images_to_tensor
from omnimamba.data.shapes import ShapesWorld
from omnimamba.evaluation.shapes_scorer import colours_kept, score_t2i, t2i_eval_set
from omnimamba.training.vq import load_vq
from omnimamba.vision.vq import to_uint8

world = ShapesWorld()
prompts = t2i_eval_set(world, "test", 96)
samples = [world.sample("test", i) for _, i in prompts]
for path in sys.argv[1:]:
    vq = load_vq(path).eval()
    with torch.no_grad():
        images = to_uint8(vq.decode(vq.encode(images_to_tensor([s.image for s in samples]) * 2 - 1)))
    print(json.dumps({"tokenizer": path, "round_trip": score_t2i(list(images), [p for p, _ in prompts]),
                      "colours_kept": colours_kept([s.objects for s in samples], list(images))}), flush=True)
