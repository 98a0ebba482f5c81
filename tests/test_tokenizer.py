"""Text tokenizers: special tokens at fixed ids for both the embedded default and a real tokenizer.json."""

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from omnimamba.data.vocabulary import WORDS
from omnimamba.sequence import SPECIAL_TOKENS, IGNORE_INDEX, mmu_example, t2i_prefix
from omnimamba.tokenizer import TextTokenizer


def test_shapes_tokenizer_is_deterministic_and_covers_its_words():
    a, b = TextTokenizer.shapes(), TextTokenizer.shapes()
    assert a.tokenizer.to_str() == b.tokenizer.to_str()
    ids = a.encode(" ".join(WORDS))
    assert len(ids) == len(WORDS) and 1 not in ids  # no [UNK]
    assert a.decode(a.encode("Two red circles, left of a square?")) == "two red circles, left of a square?"


def test_special_tokens_follow_the_base_vocabulary():
    t = TextTokenizer.shapes()
    assert [t.tokenizer.token_to_id(s) for s in SPECIAL_TOKENS] == list(range(t.base_vocab_size,
                                                                              t.base_vocab_size + 6))
    assert t.special.eot == t.base_vocab_size + 5 and t.vocab_size == t.base_vocab_size + 6
    assert t.decode([t.special.sot, *t.encode("red"), t.special.eot]) == "red"


def test_real_tokenizer_json_gets_the_same_specials(tmp_path):
    # A byte-level BPE like GPT-NeoX's, trained on a few words and saved as tokenizer.json.
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    bpe.train_from_iterator(["a red circle left of a blue square"] * 20, trainers.BpeTrainer(vocab_size=300))
    bpe.save(str(tmp_path / "tokenizer.json"))
    t = TextTokenizer.from_file(tmp_path)
    base = bpe.get_vocab_size()
    assert t.base_vocab_size == base and t.special.mmu == base
    t.save(tmp_path / "again.json")
    again = TextTokenizer.from_file(tmp_path / "again.json")
    assert again.special == t.special and again.encode("red circle") == t.encode("red circle")


def test_mmu_example_masks_the_prompt_and_t2i_prefix_marks_the_caption():
    t = TextTokenizer.shapes()
    ex = mmu_example(t, [("how many circles?", "two")])
    prompt_len = len(t.encode("user: how many circles? assistant:"))
    assert ex.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert ex.labels[prompt_len:] == t.encode("two") + [t.special.eot]
    assert ex.text_ids[-1] == t.special.eot and len(ex.text_ids) == len(ex.labels)
    ids, caption = t2i_prefix(t, "a red circle", 24)
    s = t.special
    assert ids == [s.t2i, s.sot, *t.encode("a red circle"), s.eot, s.soi]
    assert caption == [False, False, True, True, True, False, False]
