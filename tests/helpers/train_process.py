"""Run one training (optionally resumed) from a JSON config in its own process, as the crash tests need:
`python tests/helpers/train_process.py CONFIG.json [--resume]`. OMNIMAMBA_FAILPOINT kills it on the way."""

import json
import sys

import torch

from omnimamba.training.config import config_from_dict
from omnimamba.training.loop import Trainer

torch.set_num_threads(1)
config = config_from_dict(json.loads(open(sys.argv[1]).read()))
Trainer(config, log=lambda *a, **k: None).run(resume="--resume" in sys.argv)
