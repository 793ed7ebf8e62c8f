"""Tokenizer: byte-level BPE text pieces, LocCa's special tokens, and atomic location tokens.

Id layout (contiguous ranges, so the decoding constraints are cheap slices):

    0 .. 7                  <pad> <bos> <eos> <Cap> <ARef> <GCap> <sep> <mask>
    8 .. T-1                byte-level BPE text pieces (all 256 bytes are in the alphabet: no <unk>)
    T .. T+bins-1           <loc0000> .. <loc{bins-1}>

Location tokens are *added special tokens* of the Hugging Face tokenizer: always one id each, never
split into pieces. User text is encoded with `encode_special_tokens` on, so a request that types
"<loc0001>" or "<eos>" gets ordinary text pieces and can never inject a box or end a sequence.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIALS = ("<pad>", "<bos>", "<eos>", "<Cap>", "<ARef>", "<GCap>", "<sep>", "<mask>")
TASKS = {"Cap": "<Cap>", "ARef": "<ARef>", "GCap": "<GCap>"}


def loc_token(i: int) -> str:
    return f"<loc{i:04d}>"


class LoccaTokenizer:
    def __init__(self, hf: Tokenizer):
        self.hf = hf
        self.hf.encode_special_tokens = True  # user text never turns into special or location tokens
        ids = [hf.token_to_id(s) for s in SPECIALS]
        if ids != list(range(len(SPECIALS))):
            raise ValueError(f"tokenizer special tokens must have ids 0..{len(SPECIALS) - 1}, got {ids}")
        self.pad_id, self.bos_id, self.eos_id, self.cap_id, self.aref_id, self.gcap_id, self.sep_id, \
            self.mask_id = ids
        self.task_ids = {"Cap": self.cap_id, "ARef": self.aref_id, "GCap": self.gcap_id}
        self.loc_offset = hf.token_to_id(loc_token(0))
        if self.loc_offset is None:
            raise ValueError("tokenizer has no location tokens")
        n = 0
        while hf.token_to_id(loc_token(n)) == self.loc_offset + n:
            n += 1
        self.num_loc = n
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        if self.loc_offset + self.num_loc != self.vocab_size:
            raise ValueError("location tokens must be the last ids of the vocabulary")
        self.text_start = len(SPECIALS)  # text ids are [text_start, loc_offset)

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 512, loc_bins: int = 1024) -> LoccaTokenizer:
        """Train byte-level BPE on `texts`; vocab_size counts the specials and text pieces, not locations."""
        hf = Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        hf.train_from_iterator(texts, trainer=trainer)
        hf.add_special_tokens([loc_token(i) for i in range(loc_bins)])
        return cls(hf)

    @classmethod
    def from_json(cls, text: str) -> LoccaTokenizer:
        return cls(Tokenizer.from_str(text))

    def to_json(self) -> str:
        return self.hf.to_str()

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> LoccaTokenizer:
        return cls.from_json(Path(path).read_text())

    # --- text ----------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Plain text -> text-piece ids (no specials, no location tokens, whatever the text says)."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text-piece ids -> text; special and location ids are dropped."""
        return self.hf.decode([int(i) for i in ids if self.is_text(i)], skip_special_tokens=True)

    def is_text(self, i: int) -> bool:
        return self.text_start <= int(i) < self.loc_offset

    def is_loc(self, i: int) -> bool:
        return self.loc_offset <= int(i) < self.vocab_size

    def token(self, i: int) -> str:
        return self.hf.id_to_token(int(i))

    def describe(self) -> str:
        return json.dumps({"vocab_size": self.vocab_size, "text_pieces": self.loc_offset - self.text_start,
                           "location_tokens": self.num_loc})
