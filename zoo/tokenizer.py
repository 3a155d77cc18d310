"""A tiny byte-level BPE vocabulary in CLIP's format, built offline for the zoo's text models.

CLIP's tokenizer lower-cases, splits words, maps bytes to unicode symbols and marks the last symbol of a word
with ``</w>``. The vocabulary here holds the 256 byte symbols, the 256 end-of-word symbols, one merge chain per
word of the zoo's captions (so every caption word is one token) and the two special tokens. Any other text still
tokenizes, symbol by symbol.
"""

from __future__ import annotations

import json
from pathlib import Path

from .data import CAPTION_TEMPLATES, DIGIT_WORDS

MODEL_MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    # The reversible byte -> printable-unicode table of GPT-2/CLIP BPE.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def caption_words() -> list[str]:
    words: set[str] = set()
    for template in CAPTION_TEMPLATES:
        words.update(w for w in template.replace("{word}", "").replace("{digit}", "").split())
    words.update(DIGIT_WORDS)
    words.update({"a", "an", "of", "the", "digit", "number", "handwritten", "picture", "photo", "image", "drawing"})
    return sorted(words)


def build_vocab() -> tuple[dict[str, int], list[str]]:
    byte_symbols = list(_bytes_to_unicode().values())
    vocab_list = byte_symbols + [s + "</w>" for s in byte_symbols]
    merges: list[str] = []
    seen = set(vocab_list)
    for word in caption_words():
        if len(word) < 2:
            continue
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        left = symbols[0]
        for right in symbols[1:]:
            merged = left + right
            if merged not in seen:
                merges.append(f"{left} {right}")
                vocab_list.append(merged)
                seen.add(merged)
            left = merged
    vocab_list += [BOS, EOS]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def write_tokenizer_files(folder: str | Path) -> Path:
    """Write vocab.json and merges.txt for `CLIPTokenizer.from_pretrained(folder, model_max_length=77)`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def build_tokenizer(folder: str | Path):
    """Write the files and load them as a `transformers.CLIPTokenizer` (pad = end-of-text, as in Stable Diffusion)."""
    from transformers import CLIPTokenizer

    write_tokenizer_files(folder)
    return CLIPTokenizer.from_pretrained(
        str(folder), model_max_length=MODEL_MAX_LENGTH, bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=EOS
    )


def build_t5_tokenizer(model_max_length: int | None = None):
    """A word-level `T5Tokenizer` (SentencePiece unigram format) holding every caption word, numerals and letters.

    Each caption word is one piece; anything else falls back to single letters, then to `<unk>`.
    `model_max_length`: the T5 sequence length the pipeline was trained with (the Flux/SD3 families read it).
    """
    from transformers import T5Tokenizer

    pieces = ["<pad>", "</s>", "<unk>", "\u2581"]
    pieces += [f"\u2581{w}" for w in caption_words()] + [f"\u2581{d}" for d in range(10)]
    pieces += [c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    # Unigram scores: whole words before letters (a higher score wins the segmentation).
    vocab = [(p, 0.0 if i < 3 else (-1.0 if p.startswith("\u2581") else -10.0)) for i, p in enumerate(pieces)]
    kw = {"model_max_length": model_max_length} if model_max_length is not None else {}
    return T5Tokenizer(vocab=vocab, extra_ids=0, **kw)
