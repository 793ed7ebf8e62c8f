"""Tokenizer: special-token layout, atomic location tokens, no injection through user text, persistence."""

from tokenizers import Tokenizer

from model.tokenizer import SPECIALS, LoccaTokenizer, loc_token


def test_specials_first_locations_last_and_contiguous(tok):
    assert [tok.token(i) for i in range(len(SPECIALS))] == list(SPECIALS)
    assert tok.num_loc == 64 and tok.loc_offset + tok.num_loc == tok.vocab_size
    for i in (0, 1, 63):
        assert tok.hf.token_to_id(loc_token(i)) == tok.loc_offset + i


def test_location_tokens_are_single_atomic_tokens(tok):
    # The tokenizer's own view of a location token string is one id, never pieces (PaliGemma deployments
    # have shipped tokenizers that split "<loc0123>" into characters).
    plain = Tokenizer.from_str(tok.to_json())  # as any Hugging Face consumer of tokenizer.json sees it
    assert plain.encode_special_tokens is False
    for i in (0, 17, 63):
        ids = plain.encode(f"x{loc_token(i)} y", add_special_tokens=False).ids
        assert tok.loc_offset + i in ids and len(ids) == 4  # x, <locNNNN>, space, y
        assert tok.token(tok.loc_offset + i) == loc_token(i)
        assert tok.hf.decode([tok.loc_offset + i], skip_special_tokens=False) == loc_token(i)


def test_user_text_cannot_inject_special_or_location_tokens(tok):
    ids = tok.encode("the red circle <loc0003> <eos> <sep> <ARef>")
    assert ids and all(tok.is_text(i) for i in ids)
    assert tok.decode(ids) == "the red circle <loc0003> <eos> <sep> <ARef>"


def test_round_trip_of_any_text_including_unseen_characters(tok):
    for text in ("a large red circle, a small blue square and a small green triangle", "ünïcödé ✓ 猫", ""):
        assert tok.decode(tok.encode(text)) == text


def test_known_words_are_single_pieces(tok):
    assert len(tok.encode("the red circle")) == 3


def test_save_and_load_give_the_same_tokenizer(tok, tmp_path):
    tok.save(tmp_path / "tokenizer.json")
    again = LoccaTokenizer.load(tmp_path / "tokenizer.json")
    assert again.vocab_size == tok.vocab_size and again.loc_offset == tok.loc_offset
    assert again.encode("the small purple cross at the bottom") == tok.encode("the small purple cross at the bottom")
