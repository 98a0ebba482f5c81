"""The A/B of the quickstart's stage-2 step behind this folder's README: fwd + bwd seconds of a shapes-tiny stage-2
step (16 : 16, configs/shapes-tiny.yaml) with a given source tree, the tokenizers of an earlier run reused so that
only the step is timed; median over steps 4-15 of 16. Run it once per tree, alternating:

    PYTHONPATH=OLD/src python docs/results/quickstart-cpu/conv2d/step_ab.py old RUN_WITH_TOKENIZERS
    PYTHONPATH=src     python docs/results/quickstart-cpu/conv2d/step_ab.py new RUN_WITH_TOKENIZERS

(OLD: `git archive 0ee2556~1 src | tar x -C OLD`; RUN_WITH_TOKENIZERS: a quickstart's run.out, holding vq/ and
understanding-vq/). step_ab.log holds what the runs of 2026-12-07 printed, in order old, new, old, new.
"""

import statistics
import sys
import time

from omnimamba.training.config import load_train_config
from omnimamba.training.loop import Trainer

label, run = sys.argv[1], sys.argv[2]
cfg = load_train_config("configs/shapes-tiny.yaml", [
    f"model.vq={run}/vq", f"model.understanding_vq={run}/understanding-vq", f"run.out=/tmp/step_ab_{label}",
    "stages.0.steps=1", "stages.1.steps=1", "stages.2.steps=16", "run.eval_every=1000", "run.progress=false",
    "run.ckpt_every=1000", "run.eval_images=0", "run.eval_prompts=0"])
timed_step, seconds = Trainer._forward_backward, []


def forward_backward(self, engine, step, stage):
    t = time.perf_counter()
    out = timed_step(self, engine, step, stage)
    if stage.name == "stage2-unified":
        seconds.append(time.perf_counter() - t)
    return out


Trainer._forward_backward = forward_backward
Trainer(cfg, log=lambda *a, **k: None).run()
print(label, "median fwd+bwd s/step over steps 4-15: %.3f" % statistics.median(seconds[4:]), flush=True)
