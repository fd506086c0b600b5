"""A tiny causal LM, tokenizer, prompt dataset and rule-based reward built in code (nothing downloaded).

Shared by the TRL integration tests. Vocabulary: 4 special tokens and 60 one-letter words, so
``V = 64``; the model is a 2-layer Qwen2 with hidden size 32 (about 50k parameters).
"""
from __future__ import annotations

import string

import torch

WORDS = list(string.ascii_lowercase) + list(string.ascii_uppercase) + list("01234567")
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>"]
VOCAB = SPECIAL + WORDS
HIDDEN = 32


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins tokens with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        padding_side="left",
    )


def make_model(seed: int = 0, tie_word_embeddings: bool = False):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=len(VOCAB),
        hidden_size=HIDDEN,
        intermediate_size=48,  # != V, so a [.., V] tensor can only come from the LM head
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    model.generation_config.eos_token_id = 1
    model.generation_config.pad_token_id = 0
    return model


def make_dataset(n: int = 8):
    from datasets import Dataset

    prompts = [" ".join(WORDS[(3 * i + j) % 26] for j in range(2 + i % 3)) for i in range(n)]
    return Dataset.from_dict({"prompt": prompts})


def reward_count_a(completions, **kwargs):
    """Rule-based reward: fraction of the completion's words that are lowercase vowels."""
    out = []
    for c in completions:
        words = c.split()
        out.append(sum(w in "aeiou" for w in words) / max(len(words), 1))
    return out
