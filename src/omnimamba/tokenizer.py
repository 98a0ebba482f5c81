"""Text tokenizers. Real presets load Mamba-2's GPT-NeoX `tokenizer.json` with `tokenizers`; the embedded
default builds a word-level tokenizer from the Shapes vocabulary. Both get OmniMamba's special tokens the
same way, appended after the base vocabulary (see `omnimamba.sequence`). conventions="official" appends the
official release's [PAD] and nine tokens instead, at the ids its checkpoints use."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

from .errors import UserError
from .sequence import OFFICIAL_SPECIAL_TOKENS, SPECIAL_TOKENS, SpecialIds, check_conventions

EOS_TOKEN = "<|endoftext|>"  # GPT-NeoX's end of text: where an official answer ends


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer, conventions: str = "omnimamba"):
        self.conventions = check_conventions(conventions)
        added = SPECIAL_TOKENS if conventions == "omnimamba" else OFFICIAL_SPECIAL_TOKENS
        present = [t for t in added if tokenizer.token_to_id(t) is not None]
        if present:
            raise UserError(f"the tokenizer already holds {present}: give the base tokenizer (without OmniMamba's "
                            "special tokens), or a tokenizer.json that omnimamba saved")
        self.base_vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        tokenizer.add_special_tokens(list(added))
        self.tokenizer = tokenizer
        self.special = self._special_ids()
        got = [tokenizer.token_to_id(t) for t in added]
        if got != list(range(self.base_vocab_size, self.base_vocab_size + len(added))):
            raise UserError(f"the tokenizer did not append {added} after its vocabulary (got ids {got})")

    def _special_ids(self) -> SpecialIds:
        if self.conventions == "omnimamba":
            return SpecialIds.after(self.base_vocab_size)
        eos = self.tokenizer.token_to_id(EOS_TOKEN)
        if eos is None:
            raise UserError(f"official conventions: the tokenizer has no {EOS_TOKEN!r} token (GPT-NeoX's end of "
                            "text, where answers end); give GPT-NeoX-20B's tokenizer.json")
        return SpecialIds.official_after(self.base_vocab_size, eos)

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

    @staticmethod
    def _read(path: str | Path) -> tuple[Path, Tokenizer]:
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"{path}: tokenizer.json not found")
        try:
            return path, Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for damaged or foreign files
            raise UserError(f"{path}: the tokenizer file is damaged or not a tokenizers JSON "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None

    @classmethod
    def _saved(cls, path: Path, tok: Tokenizer) -> "TextTokenizer | None":
        """A saved TextTokenizer already carries its specials at the right ids: strip nothing, read which."""
        for conventions, added in (("omnimamba", SPECIAL_TOKENS), ("official", OFFICIAL_SPECIAL_TOKENS)):
            if tok.token_to_id(added[0]) is not None and tok.token_to_id(added[-1]) is not None:
                self = cls.__new__(cls)
                self.tokenizer, self.conventions = tok, conventions
                self.base_vocab_size = tok.token_to_id(added[0])
                self.special = self._special_ids()
                ids = [tok.token_to_id(t) for t in added]
                if ids != list(range(self.base_vocab_size, self.base_vocab_size + len(added))):
                    raise UserError(f"{path}: the special tokens {added} are not consecutive ids ({ids})")
                return self
        return None

    @classmethod
    def from_file(cls, path: str | Path) -> "TextTokenizer":
        """A tokenizer.json that omnimamba saved, or a base one (omnimamba's special tokens are then added)."""
        path, tok = cls._read(path)
        return cls._saved(path, tok) or cls(tok)

    @classmethod
    def official(cls, path: str | Path) -> "TextTokenizer":
        """GPT-NeoX-20B's tokenizer.json (EleutherAI/gpt-neox-20b) with the official release's tokens added (or
        one saved with them already)."""
        path, tok = cls._read(path)
        saved = cls._saved(path, tok)
        if saved is not None and saved.conventions != "official":
            raise UserError(f"{path}: holds omnimamba's own special tokens; give GPT-NeoX-20B's tokenizer.json")
        return saved or cls(tok, conventions="official")

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
