from collections import Counter

import pytest

from rnnlm.vocab import BOS, EOS, UNK, Vocab, build_vocab, split_line


def vocab_of(lines, level, **kw):
    counts = Counter(t for line in lines for t in split_line(line, level))
    specials = [UNK, EOS] if level == "word" else []
    return build_vocab(counts, level, specials, **kw)


@pytest.mark.parametrize(
    "text",
    ["First Citizen:\nBefore we proceed any further, hear me speak.\n", "운동을 열심히 하는 것은\n근육을 늘린다\n"],
)
def test_char_round_trip_including_hangul(text):
    lines = text.splitlines()
    vocab = vocab_of(lines, "char")
    ids = [i for line in lines for i in vocab.encode_tokens(split_line(line, "char"))]
    assert vocab.decode(ids) == text
    assert set(vocab.tokens) == set(text)


def test_word_round_trip_marks_line_ends():
    lines = ["the cat sat", "on the  mat"]
    vocab = vocab_of(lines, "word")
    ids = [i for line in lines for i in vocab.encode_tokens(split_line(line, "word"))]
    assert vocab.decode(ids) == "the cat sat\non the mat\n"
    assert vocab.tokens[:2] == [UNK, EOS]
    assert vocab.line_end_id == vocab.index[EOS]


def test_word_vocab_limits_map_rare_words_to_unk():
    lines = ["a a a b b c", "a b d"]
    vocab = vocab_of(lines, "word", min_freq=2)
    assert vocab.tokens == [UNK, EOS, "a", "b"]  # by falling frequency after the specials
    assert vocab.encode_tokens(["a", "c", "zzz"]) == [2, 0, 0]
    capped = vocab_of(lines, "word", max_size=3)
    assert capped.tokens == [UNK, EOS, "a"]


def test_unknown_char_without_unk_is_an_error():
    vocab = vocab_of(["abc"], "char")
    with pytest.raises(KeyError):
        vocab.encode_tokens(["z"])


def test_vocab_plain_data_round_trip():
    vocab = Vocab("word", [UNK, EOS, BOS, "hello"])
    again = Vocab.from_dict(vocab.to_dict())
    assert again.tokens == vocab.tokens and again.level == "word" and again.bos_id == 2
    assert vocab.decode([2, 3, 1, 3]) == "hello\nhello"
