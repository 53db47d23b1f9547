"""CLIP's byte-level BPE tokenizer, written offline from the vocabulary prcore carries.

Stable Diffusion's text encoders (OpenAI CLIP ViT-L/14 in SD 1.x and SDXL, OpenCLIP ViT-H/14 in
SD 2.x and ViT-bigG/14 in SDXL) share one BPE vocabulary of 49,408 tokens. A single-file checkpoint
carries the encoders' weights but no tokenizer, so prcore ships the vocabulary itself
(``clip_bpe/bpe_simple_vocab_16e6.txt.gz``, MIT, from OpenAI CLIP via open_clip) and builds the
Hugging Face ``CLIPTokenizer`` files from it: the same ``vocab.json`` / ``merges.txt`` as the hub's
``openai/clip-vit-large-patch14`` (``"a photo of a cat"`` -> 49406 320 1125 539 320 2368 49407).
"""

from __future__ import annotations

import gzip
import json
from importlib import resources
from pathlib import Path

CLIP_VOCAB_SIZE = 49408
START, END = "<|startoftext|>", "<|endoftext|>"
OPENCLIP_PAD = "!"  # the SD 2.x / SDXL-tokenizer_2 padding token (id 0); SD 1.x pads with END
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


def bytes_to_unicode() -> dict[int, str]:
    """Byte-level BPE alphabet as in CLIP / GPT-2: every byte maps to one printable unicode char."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def clip_merges() -> list[str]:
    """The 48,894 BPE merges, ranked, as ``"left right"`` lines."""
    data = resources.files("prcore.method").joinpath("clip_bpe", _BPE_FILE).read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    return lines[1 : 1 + CLIP_VOCAB_SIZE - 2 * 256 - 2]  # after the header line: 49408 - 512 byte symbols - START/END


def clip_vocab(merges: list[str]) -> dict[str, int]:
    """Token -> id: the 256 byte symbols, the same with ``</w>``, one token per merge, then START, END."""
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [a + "</w>" for a in alphabet] + [m.replace(" ", "") for m in merges] + [START, END]
    return {t: i for i, t in enumerate(tokens)}


def write_clip_tokenizer(path: str | Path, *, pad_token: str = END) -> Path:
    """Write the real CLIP tokenizer (``save_pretrained`` layout) to ``path``; ``pad_token`` is END
    for SD 1.x / SDXL ``tokenizer`` and ``"!"`` for SD 2.x / SDXL ``tokenizer_2``."""
    from transformers import CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    merges = clip_merges()
    vocab = clip_vocab(merges)
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"the carried CLIP vocabulary has {len(vocab)} tokens, expected {CLIP_VOCAB_SIZE}")
    tok = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], model_max_length=77,
                        bos_token=START, eos_token=END, unk_token=END, pad_token=pad_token)
    tok.save_pretrained(path)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return path
