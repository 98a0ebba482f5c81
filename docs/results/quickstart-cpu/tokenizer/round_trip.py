"""Score tokenizers by their round trip: the T2I scorer on 96 ground-truth test renders after encode + decode
(per category and overall), and per colour the share of drawn objects found again with their colour.
  python round_trip.py VQ_DIR [VQ_DIR ...]        (prints one JSON line per tokenizer)"""
import json
import sys

from omnimamba.data.shapes import ShapesWorld
from omnimamba.evaluation.shapes_eval import tokenizer_round_trip
from omnimamba.training.vq import load_vq

world = ShapesWorld()
for path in sys.argv[1:]:
    print(json.dumps({"tokenizer": path, **tokenizer_round_trip(load_vq(path).eval(), world, "test", 96)}), flush=True)
