"""The two sequence formats of OmniMamba (section 3.6), their loss masks, and batching.

    MMU: [MMU][SOI]{image features}[EOI][SOT]{prompt + answer text}[EOT]   loss on the answer and [EOT]
    T2I: [T2I][SOT]{caption text}[EOT][SOI]{image codes}[EOI]              loss on the image codes

Special tokens live in the text vocabulary, appended after the tokenizer's own tokens in the order of
SPECIAL_TOKENS: id(SPECIAL_TOKENS[i]) = base_vocab_size + i. (Mamba-2's GPT-NeoX vocabulary has 50,277 tokens,
so they take ids 50,277..50,282, inside the embedding's padding to 50,288: real weights load unchanged.)
Image codes have their own vocabulary (the VQ codebook) and their own embedding and head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SPECIAL_TOKENS = ("[MMU]", "[T2I]", "[SOI]", "[EOI]", "[SOT]", "[EOT]")
IGNORE_INDEX = -100

# The official release's conventions (hustvl/OmniMamba, models/cobra/prompting_utils.py and mamba_vlm.py): a
# [PAD] token, then nine tokens, after GPT-NeoX's vocabulary; three of them (<|soc|>, <|eoc|>, <|lvg|>) are
# unused by its two tasks but hold their ids.
OFFICIAL_SPECIAL_TOKENS = ("[PAD]", "<|soi|>", "<|eoi|>", "<|sot|>", "<|eot|>", "<|t2i|>", "<|mmu|>", "<|soc|>",
                           "<|eoc|>", "<|lvg|>")
OFFICIAL_NULL_PROMPT = "A picture"  # util/coco_dataset.py: the caption of an unconditional image
CONVENTIONS = ("omnimamba", "official")


@dataclass(frozen=True)
class SpecialIds:
    mmu: int
    t2i: int
    soi: int
    eoi: int
    sot: int
    eot: int
    pad: int = -1  # what fills padding; -1: [EOT]
    end: int = -1  # the token that ends an answer; -1: [EOT]

    def __post_init__(self) -> None:
        for name in ("pad", "end"):
            if getattr(self, name) < 0:
                object.__setattr__(self, name, self.eot)

    @classmethod
    def after(cls, base_vocab_size: int) -> "SpecialIds":
        return cls(*(base_vocab_size + i for i in range(len(SPECIAL_TOKENS))))

    @classmethod
    def official_after(cls, base_vocab_size: int, eos_id: int) -> "SpecialIds":
        """The official ids: [PAD] at base_vocab_size, then OFFICIAL_SPECIAL_TOKENS in order; an answer ends at
        the base tokenizer's end-of-text token (its inference_mmu.py stops at eos_token_id)."""
        at = {t: base_vocab_size + i for i, t in enumerate(OFFICIAL_SPECIAL_TOKENS)}
        return cls(mmu=at["<|mmu|>"], t2i=at["<|t2i|>"], soi=at["<|soi|>"], eoi=at["<|eoi|>"], sot=at["<|sot|>"],
                   eot=at["<|eot|>"], pad=at["[PAD]"], end=eos_id)


def check_conventions(conventions: str) -> str:
    if conventions not in CONVENTIONS:
        from .errors import UserError

        raise UserError(f"unknown conventions {conventions!r}; known: {list(CONVENTIONS)}")
    return conventions


def mmu_prompt(question: str, conventions: str = "omnimamba") -> str:
    """The answer template, used by training and inference alike: one turn of a conversation. The official
    release uses its "phi1.5" conversation template (empty system prompt, stripped)."""
    if check_conventions(conventions) == "official":
        return f"USER: {question.strip()} ASSISTANT:"
    return f"user: {question.strip()} assistant:"


@dataclass
class MMUExample:
    text_ids: list[int]  # prompt + answer + [EOT]
    labels: list[int]    # IGNORE_INDEX on the prompt


def mmu_example(tokenizer, turns: list[tuple[str, str]]) -> MMUExample:
    """Text part of an MMU sequence for (question, answer) turns; the answers (and [EOT]) are the targets."""
    ids: list[int] = []
    labels: list[int] = []
    for question, answer in turns:
        prompt = tokenizer.encode(mmu_prompt(question, tokenizer.conventions))
        reply = tokenizer.encode(" " + answer.strip())
        ids += prompt + reply
        labels += [IGNORE_INDEX] * len(prompt) + reply
    ids.append(tokenizer.special.end)
    labels.append(tokenizer.special.end)
    return MMUExample(ids, labels)


def mmu_prefix_ids(special: SpecialIds) -> tuple[list[int], list[int]]:
    """The special tokens around the image features: ([MMU][SOI], [EOI][SOT])."""
    return [special.mmu, special.soi], [special.eoi, special.sot]


def t2i_prefix(tokenizer, caption: str, max_caption_tokens: int) -> tuple[list[int], list[bool]]:
    """[T2I][SOT]{caption}[EOT][SOI] and a mask marking the caption's own tokens (what CFG drops). Official
    conventions fill the caption's max_caption_tokens slots in front with [PAD] tokens, which the model reads
    as input (its inference_t2i.py), so every prefix has the same length."""
    s = tokenizer.special
    text = tokenizer.encode(caption)
    if len(text) > max_caption_tokens:
        from .errors import UserError

        raise UserError(f"caption has {len(text)} tokens; this model accepts at most {max_caption_tokens}: "
                        f"{caption[:80]!r}")
    pad = [s.pad] * (max_caption_tokens - len(text)) if tokenizer.conventions == "official" else []
    ids = [s.t2i, s.sot, *pad, *text, s.eot, s.soi]
    return ids, [False, False] + [False] * len(pad) + [True] * len(text) + [False, False]


def pad_right(seqs: list[list[int]], value: int, multiple: int = 1) -> Tensor:
    """(b, width) right-padded with `value`; width: the longest sequence rounded up to a multiple of `multiple`."""
    width = -(-max(len(s) for s in seqs) // multiple) * multiple
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def pad_rows_left(t: Tensor, width: int, value) -> Tensor:
    """Left-pad the rows of t (b, T) with `value` to `width` positions (rows already that wide: t itself)."""
    if t.size(1) == width:
        return t
    return torch.cat([t.new_full((t.size(0), width - t.size(1)), value), t], 1)


def pad_left(seqs: list[list], value) -> tuple[Tensor, Tensor]:
    """Left-pad to a common length; returns (padded, mask) with mask 1 on real tokens."""
    width = max(len(s) for s in seqs)
    padded = torch.tensor([[value] * (width - len(s)) + list(s) for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long)
    return padded, mask


@dataclass
class MMUBatch:
    pixel_values: Tensor  # (b, 3, H, W) in [0, 1]
    text_ids: Tensor      # (b, T) right-padded with [EOT]
    labels: Tensor        # (b, T) IGNORE_INDEX on prompt and padding

    @classmethod
    def collate(cls, pixel_values: Tensor, examples: list[MMUExample], special: SpecialIds, multiple: int = 1
                ) -> "MMUBatch":
        """`multiple`: the text padded to a multiple of this many positions (the padding is never a target, and
        a causal model's outputs before it do not change), so that batches come in few lengths."""
        return cls(pixel_values, pad_right([e.text_ids for e in examples], special.pad, multiple),
                   pad_right([e.labels for e in examples], IGNORE_INDEX, multiple))

    def to(self, device) -> "MMUBatch":
        return MMUBatch(self.pixel_values.to(device), self.text_ids.to(device), self.labels.to(device))


@dataclass
class T2IBatch:
    prefix_ids: Tensor    # (b, P) left-padded [T2I][SOT]{caption}[EOT][SOI]
    prefix_mask: Tensor   # (b, P) 1 on real tokens
    caption_mask: Tensor  # (b, P) True on caption tokens
    image_codes: Tensor   # (b, N)
    drop: Tensor | None = None  # (b,) True where the caption is replaced by the null caption (CFG training)

    @classmethod
    def collate(cls, prefixes: list[tuple[list[int], list[bool]]], image_codes: Tensor,
                special: SpecialIds, drop: list[bool] | None = None) -> "T2IBatch":
        ids, mask = pad_left([p[0] for p in prefixes], special.pad)
        cap, _ = pad_left([p[1] for p in prefixes], False)
        return cls(ids, mask, cap.bool(), image_codes, None if drop is None else torch.tensor(drop))

    def to(self, device) -> "T2IBatch":
        return T2IBatch(self.prefix_ids.to(device), self.prefix_mask.to(device), self.caption_mask.to(device),
                        self.image_codes.to(device), None if self.drop is None else self.drop.to(device))
