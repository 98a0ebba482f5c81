"""The prediction loop every understanding benchmark shares: batched greedy answers to (image, question) items,
appended to a JSONL file as each batch finishes, so an interrupted run resumes and skips what is done."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError


@dataclass
class Item:
    """One benchmark question: `image` is a file path (or an (H, W, 3) array / PIL image); `prompt` is the
    text the model sees; `meta` is whatever the scorer needs back (gold answer, task, options...)."""

    id: str
    image: object
    prompt: str
    meta: dict = field(default_factory=dict)


def read_predictions(path: Path) -> dict[str, str]:
    """id -> prediction from a JSONL written by `predict`; a torn last line (a run killed mid-write) is
    ignored, any other malformed line is an error naming it."""
    done: dict[str, str] = {}
    if not path.is_file():
        return done
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            done[str(rec["id"])] = rec["prediction"]
        except (json.JSONDecodeError, KeyError, TypeError):
            if n == len(lines):  # the interrupted write of the last record: redo that item
                break
            raise UserError(f"{path}:{n}: not a prediction record; delete the file to start over") from None
    return done


def predict(model, tokenizer, items: list[Item], out: str | Path, batch_size: int = 16, max_new_tokens: int = 32,
            progress: bool = True) -> dict[str, str]:
    """Answer every item not yet in `out` (JSONL: {"id", "prediction", **meta}); returns id -> prediction
    for all items. Greedy decoding, as the benchmarks' reference scripts use."""
    from tqdm import tqdm

    from ..inference import answer

    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise UserError(f"question id {dup!r} occurs more than once in the benchmark files")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = read_predictions(out)
    _drop_torn_tail(out, len(done))
    todo = [it for it in items if it.id not in done]
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc="answering", unit="q", disable=not progress)
    with out.open("a") as f:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            preds = answer(model, tokenizer, [it.image for it in chunk], [it.prompt for it in chunk],
                           max_new_tokens=max_new_tokens)
            for it, pred in zip(chunk, preds):
                done[it.id] = pred
                f.write(json.dumps({"id": it.id, "prediction": pred, **it.meta}) + "\n")
            f.flush()
            bar.update(len(chunk))
    bar.close()
    return {i: done[i] for i in ids}


def _drop_torn_tail(path: Path, records: int) -> None:
    """Rewrite the file without a torn last line, so appended records start on a line of their own."""
    if not path.is_file():
        return
    text = path.read_text()
    if text and not text.endswith("\n"):
        lines = text.splitlines()
        keep = lines if len([ln for ln in lines if ln.strip()]) == records else lines[:-1]
        path.write_text("".join(ln + "\n" for ln in keep))
