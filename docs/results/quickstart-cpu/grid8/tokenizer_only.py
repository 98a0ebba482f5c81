"""The quickstart's tokenizer alone, with config overrides, and its round trip through the T2I scorer (grid8/README.md)."""
import sys, time
from omnimamba.training.config import load_train_config
from omnimamba.training.loop import Trainer
from omnimamba.evaluation.shapes_eval import tokenizer_round_trip
out, sets = sys.argv[1], sys.argv[2:]
cfg = load_train_config("configs/shapes-tiny.yaml", [f"run.out={out}", "run.progress=false", *sets])
tr = Trainer(cfg, log=print)
tr.out.mkdir(parents=True, exist_ok=True)
t = time.perf_counter(); tr.prepare_vq(); dt = time.perf_counter() - t
r = tokenizer_round_trip(tr.model.vq, tr.world, "test", 48)
print(sets, f"vq {dt:.0f} s, round trip {r['round_trip']['overall']:.1%}", {k: round(v, 2) for k, v in r['round_trip'].items() if k in ('single_object','two_object','counting','position')}, r['colours_kept'])
