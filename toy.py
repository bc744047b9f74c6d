"""The toy world of the CPU demo, low enough for the tests, the `area` scorer (reward.py) and the demo to share it.

World: prompts "a <colour> <shape>" (red/green/blue x circle/square); 16x16 images of one shape at a random size
and place on white. The rule (the demo's "human" preference): the larger shape wins, area = the fraction of
pixels far from the background (`area`, a scorer like the real ones). Fidelity: the shape's dominant colour is
the prompt's colour. Also here: small CLIP-style BPE, T5-style Unigram and Qwen-style byte-level BPE tokenizer folders
that HF CLIPTokenizer / T5TokenizerFast / Qwen2Tokenizer load, for the toy models and the tests' tiny reference models.
"""
import json
import os

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------------
# The tokenizer

# A small CLIP-style BPE vocabulary: the 256 byte symbols (with and without the end-of-word mark), merges
# that spell out the words below, and the two special tokens last (so <|endoftext|> has the largest id, as
# in the real 49408-token vocabulary, where pooling takes the argmax id).
WORDS = ["a", "photo", "of", "the", "cat", "dog", "red", "green", "blue", "big", "small", "circle",
         "square", "on", "with", "and", "painting", "astronaut", "horse", "riding", "in", "space"]


def _bytes_to_unicode():
    """CLIP/GPT-2's reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizer(folder, pad_token="<|endoftext|>"):
    """A tokenizer folder (vocab.json, merges.txt, configs) that HF CLIPTokenizer loads; returns the vocab size."""
    os.makedirs(folder, exist_ok=True)
    chars = _bytes_to_unicode()
    vocab = chars + [c + "</w>" for c in chars]
    merges = []
    for w in WORDS:
        syms = list(w[:-1]) + [w[-1] + "</w>"]
        while len(syms) > 1:
            pair = (syms[0], syms[1])
            if f"{pair[0]} {pair[1]}" not in merges:
                merges.append(f"{pair[0]} {pair[1]}")
                vocab.append(pair[0] + pair[1])
            syms = [pair[0] + pair[1]] + syms[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(vocab))}
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    cfg = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
           "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
           "pad_token": pad_token, "errors": "replace", "add_prefix_space": False}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f)
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump({k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, f)
    return len(vocab)


def write_t5_tokenizer(folder, words=WORDS, model_max_length=512):
    """A T5-style tokenizer.json made with the tokenizers library: SentencePiece Unigram pieces (<pad> 0, </s> 1,
    <unk> 2, then "▁"-marked words and single characters), a Metaspace pre-tokenizer, </s> appended; returns the
    vocab size. model_max_length caps the T5 token count clip.load pads prompts to (the toy FLUX's short prompts)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    chars = "abcdefghijklmnopqrstuvwxyzA!:123"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -3.0 - i / 10) for i, w in enumerate(words)]
    vocab += [(w, -6.0 - i / 10) for i, w in enumerate(words)]
    vocab += [(c, -9.0 - i / 10) for i, c in enumerate(chars)] + [("▁" + c, -12.0) for c in chars[:10]]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(dict(eos_token="</s>", pad_token="<pad>", unk_token="<unk>", model_max_length=model_max_length), f)
    return len(vocab)


# Qwen's byte-level BPE at toy size: the 256 byte symbols, then merges spelling each word below as one token, then
# the special tokens and Qwen3's <think>, </think> (added, not special). The chat template's words and the prompts',
# "Ġ" (a leading space in the byte-to-unicode map) forms first; in this order no word's merge splits a later word
# (red's "r e" would split a later "green" or "square").
QWEN_WORDS = ["user", "assistant", "Ġa", "Ġred", "Ġgreen", "Ġblue", "Ġcircle", "Ġsquare", "green", "square", "red",
              "blue", "circle"]
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_ADDED = ["<think>", "</think>"]


def qwen_bpe(words=QWEN_WORDS):
    """(vocabulary {token: id}: the 256 byte symbols, then the merges' products; merges [(left, right)]) spelling
    each word by merging its first two symbols until one is left."""
    vocab, merges = list(_bytes_to_unicode()), []
    for w in words:
        syms = list(w)
        while len(syms) > 1:
            if (syms[0], syms[1]) not in merges:
                merges.append((syms[0], syms[1]))
                vocab.append(syms[0] + syms[1])
            syms = [syms[0] + syms[1]] + syms[2:]
    return {t: i for i, t in enumerate(dict.fromkeys(vocab))}, merges


def write_qwen_tokenizer(folder, split, words=QWEN_WORDS, chat_template=None):
    """A Qwen-style tokenizer folder (tokenizer.json: byte-level BPE of qwen_bpe(words), NFC, the regex split, the
    special and added tokens last; tokenizer_config.json: <|im_end|> eos, <|endoftext|> pad, the chat template when
    given) that llm.Tokenizer reads and AutoTokenizer loads as Qwen2Tokenizer; returns the vocab size. split: the
    pre-tokenizer's regex, llm.PRETOKENIZE_REGEX (passed in: toy.py imports no other file of the project)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    vocab, merges = qwen_bpe(words)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_ADDED])
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    added = {str(tok.token_to_id(t)): dict(content=t, lstrip=False, normalized=False, rstrip=False, single_word=False,
                                           special=t in QWEN_SPECIAL) for t in QWEN_SPECIAL + QWEN_ADDED}
    cfg = dict(tokenizer_class="Qwen2Tokenizer", added_tokens_decoder=added, additional_special_tokens=QWEN_SPECIAL[1:],
               bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None, errors="replace",
               add_prefix_space=False, model_max_length=131072, split_special_tokens=False,
               clean_up_tokenization_spaces=False)
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f)
    return tok.get_vocab_size()


# ----------------------------------------------------------------------------------------------------
# The world: prompts, rendering, the rule, fidelity

COLOURS = {"red": (0.85, 0.10, 0.10), "green": (0.10, 0.70, 0.15), "blue": (0.10, 0.20, 0.90)}
SHAPES = ("circle", "square")
PROMPTS = [f"a {c} {s}" for c in COLOURS for s in SHAPES]
SIZE = 16  # image side in pixels
RADIUS = (2.0, 6.5)  # shape "radius" range (circle radius, half the square's side), pixels
BACKGROUND = (1.0, 1.0, 1.0)
FG_THRESHOLD = 0.35  # a pixel is foreground when its RGB distance from the background exceeds this


def render(colour: str, shape: str, radius: float, cx: float, cy: float, size: int = SIZE) -> np.ndarray:
    """One anti-aliased shape on the background: float32 (size, size, 3) in [0, 1]."""
    ss = 4  # supersampling per axis
    c = (np.arange(size * ss) + 0.5) / ss  # sub-pixel centres
    y, x = np.meshgrid(c, c, indexing="ij")
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= radius ** 2
    else:
        inside = (np.abs(x - cx) <= radius) & (np.abs(y - cy) <= radius)
    cover = inside.reshape(size, ss, size, ss).mean(axis=(1, 3))[..., None]  # (size, size, 1)
    return (cover * np.array(COLOURS[colour]) + (1 - cover) * np.array(BACKGROUND)).astype(np.float32)


def random_image(prompt: str, rng: np.random.Generator, radius: float = None) -> np.ndarray:
    """A random instance of a prompt: size uniform in RADIUS (unless given), position anywhere it fits."""
    _, colour, shape = prompt.split()
    r = rng.uniform(*RADIUS) if radius is None else radius
    cx, cy = rng.uniform(r + 1, SIZE - r - 1, size=2)
    return render(colour, shape, r, cx, cy)


def foreground(images: torch.Tensor) -> torch.Tensor:
    """Boolean mask (B, H, W) of pixels far from the background colour; images (B, 3, H, W) in [0, 1]."""
    bg = torch.tensor(BACKGROUND, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - bg).norm(dim=1) > FG_THRESHOLD


def area(images: torch.Tensor, prompts=None) -> torch.Tensor:
    """The rule as a scorer (reward.py's interface: images, prompts -> (B,)): each image's foreground fraction."""
    return foreground(images).float().mean(dim=(1, 2))


def dominant_colour(images: torch.Tensor) -> list:
    """Per image, the palette colour that most foreground pixels are nearest to (None if there is no foreground)."""
    mask = foreground(images)  # (B, H, W)
    palette = torch.tensor(list(COLOURS.values()), dtype=images.dtype)  # (K, 3)
    nearest = (images.permute(0, 2, 3, 1)[..., None, :] - palette).norm(dim=-1).argmin(-1)  # (B, H, W) palette index
    names = []
    for near, m in zip(nearest, mask):
        votes = torch.bincount(near[m], minlength=len(COLOURS))
        names.append(list(COLOURS)[int(votes.argmax())] if m.any() else None)
    return names


def fidelity(images: torch.Tensor, prompts) -> torch.Tensor:
    """1 where the image shows a shape (>= 1% of pixels) whose colour is the prompt's colour, else 0."""
    found = dominant_colour(images)
    big_enough = area(images) >= 0.01
    return torch.tensor([float(f == p.split()[1] and bool(b)) for f, p, b in zip(found, prompts, big_enough)])
