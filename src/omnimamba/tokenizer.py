"""Text tokenizers. Real presets load Mamba-2's GPT-NeoX `tokenizer.json` with `tokenizers`; the embedded
default builds a word-level tokenizer from the Shapes vocabulary. Both get OmniMamba's special tokens the
same way, appended after the base vocabulary (see `omnimamba.sequence`)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

from .errors import UserError
from .sequence import SPECIAL_TOKENS, SpecialIds


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer):
        self.base_vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
        self.tokenizer = tokenizer
        self.special = SpecialIds.after(self.base_vocab_size)
        got = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
        if got != [getattr(self.special, f.name) for f in SpecialIds.__dataclass_fields__.values()]:
            raise UserError(f"the tokenizer already holds some of {SPECIAL_TOKENS} at other ids ({got}); "
                            "use a tokenizer without them")

    @property
    def vocab_size(self) -> int:
        """Tokens including the special tokens."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        text = self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)
        for p in (" .", " ,", " ?", " !", " :", " '"):
            text = text.replace(p, p[1:])
        return text.replace("' ", "'")

    def save(self, path: str | Path) -> None:
        """Writes tokenizer.json with the special tokens in it; `from_file` reads it back unchanged."""
        Path(path).write_text(self.tokenizer.to_str())

    @classmethod
    def from_file(cls, path: str | Path) -> "TextTokenizer":
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"{path}: tokenizer.json not found")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for damaged or foreign files
            raise UserError(f"{path}: the tokenizer file is damaged or not a tokenizers JSON "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        # A saved TextTokenizer already carries the specials at the right ids: strip nothing, verify.
        if tok.token_to_id(SPECIAL_TOKENS[0]) is not None:
            self = cls.__new__(cls)
            self.tokenizer = tok
            self.base_vocab_size = tok.token_to_id(SPECIAL_TOKENS[0])
            self.special = SpecialIds.after(self.base_vocab_size)
            return self
        return cls(tok)

    @classmethod
    def word_level(cls, words, punctuation=()) -> "TextTokenizer":
        """A deterministic lower-cased word-level tokenizer: [PAD]=0, [UNK]=1, then words and punctuation."""
        vocab = {"[PAD]": 0, "[UNK]": 1}
        for w in list(words) + list(punctuation):
            vocab.setdefault(w, len(vocab))
        tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                      pre_tokenizers.Punctuation()])
        tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
        return cls(tok)

    @classmethod
    def shapes(cls) -> "TextTokenizer":
        from .data.vocabulary import PUNCTUATION, WORDS

        return cls.word_level(WORDS, PUNCTUATION)
