"""A training run's metrics: records appended to <run.out>/metrics.jsonl and drawn in TensorBoard (when the
package is installed), cut back to where a resumed run restarts so no step is logged twice."""

from __future__ import annotations

import json
from pathlib import Path

from ..evaluation.curves import TOKENIZER_STAGES
from ..fileio import writing


def tb_step(stage_index: int, step: int) -> int:
    """TensorBoard's one step axis over all stages: stage k's step s."""
    return stage_index * 10_000_000 + step


class MetricsLog:
    def __init__(self, out: Path, tensorboard: bool):
        self.path = Path(out) / "metrics.jsonl"
        self.tensorboard = tensorboard
        self._file = None
        self._tb = None
        self._tb_purge_step: int | None = 0  # a fresh run's TensorBoard starts empty

    def cut(self, start: dict | None, stages: list[str], tokenizers_done: set[str]) -> None:
        """Make the run's logs end where it (re)starts: from checkpoint (stage k, step s) keep earlier stages,
        stage k's training records up to s and its evaluations before s (the ones at s follow the checkpoint
        and run again); a fresh start keeps only the records of the tokenizers it reuses (`tokenizers_done`,
        of TOKENIZER_STAGES)."""
        order = {name: i for i, name in reversed(list(enumerate(stages)))}
        k, s = (start["stage_index"], start["step"]) if start else (-1, -1)

        def keep(rec: dict) -> bool:
            if rec.get("stage") in TOKENIZER_STAGES:
                return rec["stage"] in tokenizers_done
            i = order.get(rec.get("stage"), len(order))
            if i != k:
                return i < k
            return rec["step"] < s if any(key.startswith("eval_") for key in rec) else rec["step"] <= s

        if self.path.is_file():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # the torn last line of a killed run
                    continue
                if keep(rec):
                    kept.append(line)
            with writing(self.path, "metrics log"):
                self.path.write_text("".join(line + "\n" for line in kept))
        # TensorBoard drops its own events past the restart when the writer opens
        self._tb_purge_step = tb_step(k, s) + 1 if start else 0

    def write(self, rec: dict, index: int | None) -> None:
        """A record to metrics.jsonl and, for stage `index` (None: the tokenizer, not drawn there), TensorBoard."""
        if self._file is None:
            self._file = open(self.path, "a")
            if self.tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._tb = SummaryWriter(str(self.path.parent / "tensorboard"), purge_step=self._tb_purge_step)
                except ImportError:
                    self._tb = None
        with writing(self.path, "metrics log"):
            self._file.write(json.dumps(rec) + "\n")
            self._file.flush()
        if self._tb is not None and index is not None:
            global_step = tb_step(index, rec["step"])
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(f"{rec['stage']}/{k}", v, global_step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        self._tb_purge_step = None  # a writer opened again must not drop what this run drew
