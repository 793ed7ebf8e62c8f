"""What a user would pick instead of our engine: Hugging Face `transformers`, same dimensions, `generate()`.

The peer is a VisionEncoderDecoderModel: a ViT encoder and a BERT decoder with cross-attention (the pairing
of TrOCR and of HF's image-captioning examples), random weights, built with our model's dimensions: image and
patch size, encoder width / depth / heads / MLP, decoder width / depth / heads / MLP, vocabulary and positions.
Its own choices stay (a [CLS] token and pooler in ViT, BERT's post-LN blocks and LM-head transform): a few %
more FLOPs than ours, which is what the user would run. Decoding is `generate()` as documented: greedy,
`use_cache=True` (cross-attention K/V computed once, self-attention K/V cached), under `torch.inference_mode`,
with no end token, so it makes exactly the tokens asked for.

Our side of the comparison is `engine_generate`: the inference interface of model/interface.py (ONNX Runtime
or PyTorch) driven by the same plain greedy loop, the same number of tokens from the same one-token prompt.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from model.config import ModelConfig

START = 1  # the one-token prompt of both sides (any id: weights are random or the id is just an input)


def hf_model(c: ModelConfig, device: str = "cpu", dtype: torch.dtype = torch.float32):
    from transformers import (  # noqa: PLC0415 (the bench extra; imported only when the peer runs)
        BertConfig,
        GenerationConfig,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
    )

    enc = ViTConfig(image_size=c.image_size, patch_size=c.patch_size, hidden_size=c.enc_width,
                    num_hidden_layers=c.enc_depth, num_attention_heads=c.enc_heads, intermediate_size=c.enc_mlp,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    dec = BertConfig(vocab_size=c.vocab_size, hidden_size=c.dec_width, num_hidden_layers=c.dec_depth,
                     num_attention_heads=c.dec_heads, intermediate_size=c.dec_mlp,
                     max_position_embeddings=c.max_seq_len, is_decoder=True, add_cross_attention=True,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "random weights" notices
        model = VisionEncoderDecoderModel(VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec))
    model.generation_config = GenerationConfig(decoder_start_token_id=START, pad_token_id=0, eos_token_id=None,
                                               do_sample=False, num_beams=1, use_cache=True)
    return model.to(device, dtype).eval()


def hf_generate(model, pixels: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """(B, 3, S, S) -> (B, 1 + new_tokens) token ids, greedy, KV cache on."""
    with torch.inference_mode():
        return model.generate(pixel_values=pixels, max_new_tokens=new_tokens)


def hf_encode(model, pixels: torch.Tensor):
    with torch.inference_mode():
        return model.encoder(pixel_values=pixels)


def engine_generate(inf, pixels: np.ndarray, new_tokens: int) -> np.ndarray:
    """Our engine, the same work as `hf_generate`: encode, then `new_tokens` decoder calls of one token per
    row, greedy. (B, 3, S, S) float32 numpy -> (B, new_tokens) token ids."""
    B = len(pixels)
    state = inf.start(inf.encode(pixels), np.arange(B))
    tokens, out = np.full((B, 1), START, dtype=np.int64), []
    for p in range(new_tokens):
        logits = inf.step(state, tokens, np.full((B, 1), p, dtype=np.int64))
        tokens = logits[:, -1].argmax(-1)[:, None]
        out.append(tokens)
    return np.concatenate(out, axis=1)
