"""The three LocCa tasks as token sequences: training targets, inference prompts, output grammars.

    Cap    <bos> <Cap>  caption <eos>
    ARef   <bos> <ARef> expression <sep> box <eos>          prompt up to <sep> = refer (expression -> box)
    GCap   <bos> <GCap> box <sep> expression <eos>          prompt up to <sep> = describe a box
                                                            prompt <bos> <GCap> = ground: box an object, describe it

`box` is four location tokens from the codec. Sequences are built from ids, never by parsing strings, so no
user text can turn into structure.
"""

from __future__ import annotations

from collections.abc import Sequence

from .codec import BoxCodec
from .tokenizer import LoccaTokenizer

# Output grammars: phases of what may be generated after a prompt (see model/decoding.py).
#   ("loc", 4)  four location tokens, each later corner strictly after its earlier one
#   ("sep", 1)  the separator
#   ("text", 0) one or more text pieces, then <eos>
#   ("eos", 1)  <eos>
GRAMMARS = {
    "caption": (("text", 0),),
    "refer": (("loc", 4), ("eos", 1)),
    "describe": (("text", 0),),
    "ground": (("loc", 4), ("sep", 1), ("text", 0)),
}
MIN_NEW_TOKENS = {"caption": 2, "refer": 5, "describe": 2, "ground": 7}


class Tasks:
    def __init__(self, tok: LoccaTokenizer, codec: BoxCodec):
        if codec.loc_offset != tok.loc_offset or codec.bins != tok.num_loc:
            raise ValueError("codec and tokenizer disagree on the location tokens")
        self.tok, self.codec = tok, codec

    # --- prompts -------------------------------------------------------------------------------
    def caption_prompt(self) -> list[int]:
        return [self.tok.bos_id, self.tok.cap_id]

    def refer_prompt(self, expression: str) -> list[int]:
        return [self.tok.bos_id, self.tok.aref_id, *self.tok.encode(expression), self.tok.sep_id]

    def describe_prompt(self, box: Sequence[float], width: float, height: float) -> list[int]:
        return [self.tok.bos_id, self.tok.gcap_id, *self.codec.encode(box, width, height), self.tok.sep_id]

    def ground_prompt(self) -> list[int]:
        return [self.tok.bos_id, self.tok.gcap_id]

    # --- training targets ----------------------------------------------------------------------
    def cap_sequence(self, caption: str) -> list[int]:
        return [*self.caption_prompt(), *self.tok.encode(caption), self.tok.eos_id]

    def aref_sequence(self, expression: str, box: Sequence[float], width: float, height: float) -> list[int]:
        return [*self.refer_prompt(expression), *self.codec.encode(box, width, height), self.tok.eos_id]

    def gcap_sequence(self, expression: str, box: Sequence[float], width: float, height: float) -> list[int]:
        return [*self.describe_prompt(box, width, height), *self.tok.encode(expression), self.tok.eos_id]

    # --- outputs -------------------------------------------------------------------------------
    def parse(self, task: str, tokens: Sequence[int], width: float, height: float) -> dict:
        """Generated tokens (after the prompt, <eos> optional) -> {"box": [...]} and/or {"text": str}."""
        tokens = [int(t) for t in tokens if int(t) != self.tok.eos_id]
        out = {}
        if GRAMMARS[task][0][0] == "loc":
            out["box"] = self.codec.decode(tokens[:4], width, height)
            tokens = tokens[4:]
            if tokens and tokens[0] == self.tok.sep_id:
                tokens = tokens[1:]
        if task != "refer":
            out["text"] = self.tok.decode(tokens).strip()
        return out
