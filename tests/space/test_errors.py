"""Messages (space/errors.py): `shorten` keeps a message or stored reason on one line and cuts a long one at a word,
never inside one ("torch.Siz")."""

from __future__ import annotations

from space.errors import shorten


def test_shorten_keeps_short_text_and_collapses_whitespace():
    assert shorten("a  b\n\tc", 10) == "a b c"
    assert shorten("x" * 10, 10) == "x" * 10


def test_shorten_cuts_at_a_word_and_says_so():
    text = ("RuntimeError: Error(s) in loading state_dict for DetectionModel: size mismatch for model.24.m.0.weight: "
            "copying a param with shape torch.Size([21, 64, 1, 1]) from checkpoint, the shape in current model is "
            "torch.Size([27, 64, 1, 1]).")
    for limit in range(20, len(text)):
        short = shorten(text, limit)
        assert len(short) <= limit and short.endswith("…"), (limit, short)
        assert text.startswith(short[:-1]) and text[len(short) - 1] in " ,;:(", (limit, short)  # a whole last word
    assert shorten("/a/very/long/path/without/any/space/at/all.yaml", 20) == "/a/very/long/path/w…"  # one word: marked
