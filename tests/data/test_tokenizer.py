"""Byte tokenizer: ids are the UTF-8 bytes, specials are 256..258, JSON round trip."""

import pytest

from labcore.data.tokenizer import ByteTokenizer


def test_encode_is_utf8_bytes_and_round_trips():
    tok = ByteTokenizer()
    assert tok.vocab_size == 259
    assert tok.encode("A") == [65]
    assert tok.encode("é") == [0xC3, 0xA9]
    assert tok.encode("hi", bos=True, eos=True) == [257, 104, 105, 258]
    for text in ["", "plain ascii", "naïve café — 東京 🚀", "tabs\tand\nnewlines", "\x00\x7f"]:
        assert tok.decode(tok.encode(text, bos=True, eos=True)) == text
        assert all(0 <= i < 256 for i in tok.encode(text))


def test_specials_and_errors():
    tok = ByteTokenizer()
    ids = tok.encode("ab", bos=True, eos=True) + [tok.pad_id]
    assert tok.decode(ids, skip_specials=False) == "<BOS>ab<EOS><PAD>"
    assert tok.decode([0xC3]) == "\ufffd"  # half a character is replaced, not an exception
    with pytest.raises(ValueError, match="id 300"):
        tok.decode([300])


def test_json_round_trip_and_mismatch():
    tok = ByteTokenizer()
    again = ByteTokenizer.from_json(tok.to_json())
    assert again == tok and again.to_dict() == tok.to_dict()
    d = tok.to_dict()
    d["specials"] = {"PAD": 0, "BOS": 1, "EOS": 2}
    with pytest.raises(ValueError, match="specials"):
        ByteTokenizer.from_dict(d)
    with pytest.raises(ValueError, match="kind"):
        ByteTokenizer.from_dict({"kind": "bpe", "version": 1})
