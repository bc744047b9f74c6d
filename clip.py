"""CLIP's text side from scratch: its BPE tokenizer and causal text transformer, and the text side of every family.

CLIP-L (OpenAI's ViT-L/14 text tower) and OpenCLIP's ViT-bigG/14 condition the SD families: SD1.5 on CLIP-L's final
states, SDXL and SD3 on both penultimate states side by side, FLUX on CLIP-L's pooled output beside T5 (t5.py).
`load` reads the encoders a family's record lists (families.py: where each lies, its tokenizer, its released size)
and TextEncoders.encode gives what that family's denoiser takes, as its diffusers pipeline's encode_prompt does.

Modules are named after transformers' CLIPTextModelWithProjection (text_model.encoder.layers.0.self_attn.q_proj,
..., text_projection), so a diffusers text_encoder/ folder loads key for key. Single files keep CLIP-L in that
naming, but bigG in OpenCLIP's (fused in_proj, transposed text_projection): see open_clip_table below.
"""
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import families
import kernels
from weights import (Checkpoint, CheckpointError, component, find_weights, load_module, read_config, read_json, rename,
                     renamed, save_safetensors, special_tokens)

MAX_LENGTH = 77
VOCAB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "clip_bpe")  # CLIP's BPE (see its README.md)
CLIP_VOCAB_SIZE = 49408
# transformers' CLIPTextConfig defaults (the released encoders' configs: families.CLIP_L, families.BIG_G)
DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                projection_dim=512, eos_token_id=49407)


def quick_gelu(x):
    """OpenAI CLIP's sigmoid approximation of GELU (CLIP-L was trained with it; bigG uses the exact one)."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


# ----------------------------------------------------------------------------------------------------
# Tokenizer


class Tokenizer:
    """CLIP's byte-level BPE, built as transformers' CLIPTokenizer builds it, from vocab.json + merges.txt or from the
    vocabulary and merges of a tokenizer.json (all that transformers 5 saves of a CLIP tokenizer).

    Text is NFC-normalized, whitespace-collapsed and lower-cased, split by CLIP's regex, byte-mapped, BPE'd
    with "</w>" marking word ends, wrapped in <|startoftext|> ... <|endoftext|>, cut to 77 (keeping the end
    token) and padded with the folder's own pad token (SDXL's tokenizer_2 pads with "!", the others with
    <|endoftext|>), or pad_token when given (a special token then, as in transformers), or pad_id (open_clip pads
    with id 0 and keeps "!" an ordinary character). The default folder is the vocabulary shipped in clip_bpe/.
    """

    def __init__(self, folder=VOCAB, max_length=MAX_LENGTH, pad_token=None, pad_id=None):
        from tokenizers import Regex
        from tokenizers import Tokenizer as Tok
        from tokenizers import models, normalizers, pre_tokenizers, processors
        vocab_merges = bpe(folder)
        if vocab_merges is None:
            raise CheckpointError(f"{folder} is not a CLIP tokenizer folder (no vocab.json and merges.txt, no "
                                  "tokenizer.json of a BPE model)")
        special = special_tokens(folder, dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                              unk_token="<|endoftext|>", pad_token="<|endoftext|>"))
        special["pad_token"] = pad_token or special["pad_token"]
        bos, eos, unk, pad = (special[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token"))
        tok = Tok(models.BPE(*vocab_merges, continuing_subword_prefix="",
                             end_of_word_suffix="</w>", fuse_unk=False, unk_token=unk))
        tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                               normalizers.Lowercase()])
        split = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
        words = pre_tokenizers.Split(Regex(split), behavior="removed", invert=True)
        tok.pre_tokenizer = pre_tokenizers.Sequence([words, pre_tokenizers.ByteLevel(add_prefix_space=False)])
        tok.add_special_tokens(list(dict.fromkeys([unk, bos, eos, pad])))  # matched whole, before normalizing
        ids = {t: tok.token_to_id(t) for t in (bos, eos, pad)}
        tok.post_processor = processors.RobertaProcessing((eos, ids[eos]), (bos, ids[bos]), trim_offsets=False,
                                                          add_prefix_space=False)
        tok.enable_truncation(max_length)  # counts the two added tokens: 75 text tokens at most
        if pad_id is not None:
            pad = tok.id_to_token(pad_id)
            ids[pad] = pad_id
        tok.enable_padding(length=max_length, pad_id=ids[pad], pad_token=pad)
        self.tok, self.folder, self.max_length = tok, folder, max_length
        self.pad_token, self.pad_id, self.eos_id = pad, ids[pad], ids[eos]

    def __call__(self, prompts):
        """list of str -> LongTensor (B, 77) of token ids."""
        if isinstance(prompts, str):
            prompts = [prompts]
        return torch.tensor([e.ids for e in self.tok.encode_batch(list(prompts))], dtype=torch.long)


# ----------------------------------------------------------------------------------------------------
# Text transformer


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):  # (B, L, D)
        B, L, D = x.shape
        q, k, v = (p(x).view(B, L, self.heads, D // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, H, L, D/H)
        o = kernels.attention(q, k, v, causal=True)  # each token sees itself and the tokens before it
        return self.out_proj(o.transpose(1, 2).reshape(B, L, D))


class Layer(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, cfg):
        super().__init__()
        d, eps = cfg["hidden_size"], cfg["layer_norm_eps"]
        self.self_attn = Attention(d, cfg["num_attention_heads"])
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(d, eps=eps), nn.LayerNorm(d, eps=eps)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(d, cfg["intermediate_size"]), nn.Linear(cfg["intermediate_size"], d)
        self.act = ACTIVATIONS[cfg["hidden_act"]]

    def forward(self, x):  # (B, L, D)
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp.fc2(self.act(self.mlp.fc1(self.layer_norm2(x))))


class TextTransformer(nn.Module):
    """CLIP's text encoder (CLIP-L, or OpenCLIP-bigG with projection=True), configured by a CLIPTextConfig dict."""

    def __init__(self, cfg, projection=False):
        super().__init__()
        self.config = cfg = {**DEFAULTS, **cfg}
        if cfg["hidden_act"] not in ACTIVATIONS:
            raise CheckpointError(f"unsupported text encoder activation {cfg['hidden_act']!r}")
        d = cfg["hidden_size"]
        self.text_model = m = nn.Module()
        m.embeddings = nn.Module()
        m.embeddings.token_embedding = nn.Embedding(cfg["vocab_size"], d)
        m.embeddings.position_embedding = nn.Embedding(cfg["max_position_embeddings"], d)
        m.encoder = nn.Module()
        m.encoder.layers = nn.ModuleList([Layer(cfg) for _ in range(cfg["num_hidden_layers"])])
        m.final_layer_norm = nn.LayerNorm(d, eps=cfg["layer_norm_eps"])
        self.text_projection = nn.Linear(d, cfg["projection_dim"], bias=False) if projection else None

    def forward(self, ids):
        """ids (B, L) -> dict: last (B, L, D) final-normed, penultimate (B, L, D) the input of the last layer
        (= transformers' hidden_states[-2], not normed), pooled (B, D) at the end token, projected (B, P) or None."""
        m, (B, L) = self.text_model, ids.shape
        x = m.embeddings.token_embedding(ids) + m.embeddings.position_embedding.weight[:L]  # (B, L, D)
        penultimate = x
        for layer in m.encoder.layers:
            penultimate, x = x, layer(x)
        last = m.final_layer_norm(x)
        # The end token as transformers finds it: configs from before its fix say eos_token_id=2 (the real SD
        # ones) and take the largest id (<|endoftext|> is the last of the vocabulary); others its first position.
        eos_id = self.config["eos_token_id"]
        eos = ids.argmax(-1) if eos_id == 2 else (ids == eos_id).int().argmax(-1)  # (B,) end token positions
        pooled = last[torch.arange(B, device=ids.device), eos]  # (B, D)
        projected = self.text_projection(pooled) if self.text_projection is not None else None
        return dict(last=last, penultimate=penultimate, pooled=pooled, projected=projected)


class TextEncoders(nn.Module):
    """The tokenizers and text encoders of one family (its record's text side, families.py), and what its denoiser is
    given of their outputs (text.combine). An optional encoder that is absent (SD3 without T5) gives it None."""

    def __init__(self, encoders, tokenizers, family, present=None):
        super().__init__()
        self.encoders = nn.ModuleList(encoders)
        self.tokenizers = list(tokenizers)
        self.family = family
        self.present = present or [True] * len(family.text.encoders)  # per encoder of the record: loaded or absent

    def tokenize(self, prompts):
        """list of str -> one LongTensor (B, L) per encoder (cache these and pass them as encode(ids=...))."""
        return [t(prompts) for t in self.tokenizers]

    def encode(self, prompts=None, ids=None):
        """-> (context, pooled), what the family's denoiser takes (families.py's sdxl_text, ...: e.g. SDXL's
        (B, 77, 2048), (B, 1280)). Runs under the caller's grad mode (torch.no_grad() for a frozen encoder)."""
        ids = self.tokenize(prompts) if ids is None else ids
        dev = next(self.encoders[0].parameters()).device
        outs = iter([enc(i.to(dev)) for enc, i in zip(self.encoders, ids)])
        return self.family.text.combine([next(outs) if here else None for here in self.present])


# ----------------------------------------------------------------------------------------------------
# Checkpoints: CLIP in the transformers layout (folders, CLIP-L in single files) and OpenCLIP's (bigG in single files)

LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
         "self_attn.out_proj": "attn.out_proj"}
QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}  # which third of OpenCLIP's fused in_proj


def open_clip_table(cfg):
    """Our name -> OpenCLIP's. Our q, k, v are thirds of its fused in_proj; text_projection is transposed."""
    m = {"text_model.embeddings.token_embedding": "token_embedding", "text_model.final_layer_norm": "ln_final",
         "text_model.embeddings.position_embedding.weight": "positional_embedding",
         "text_projection.weight": "text_projection"}
    for i in range(cfg["num_hidden_layers"]):
        ours, theirs = f"text_model.encoder.layers.{i}", f"transformer.resblocks.{i}"
        for a, b in LAYER.items():
            m[f"{ours}.{a}"] = f"{theirs}.{b}"
        for proj in QKV:
            for w in ("weight", "bias"):
                m[f"{ours}.self_attn.{proj}.{w}"] = f"{theirs}.attn.in_proj_{w}"
    return m


def open_clip_part(name):
    """How our tensor comes from OpenCLIP's: None (as is), "T" (transposed) or i (the i-th third of in_proj)."""
    if name == "text_projection.weight":
        return "T"
    return next((i for p, i in QKV.items() if f".self_attn.{p}." in name), None)


def _hf_name(key):
    """transformers >= 5.6 saves CLIPTextModel without the text_model. prefix; older files (and ours) have it."""
    return key if key.startswith(("text_model.", "text_projection")) else "text_model." + key


def _load_folder(folder, device, dtype, quantize=None):
    ckpt = Checkpoint(find_weights(folder, "model"))
    keys = [k for k in ckpt.keys() if not k.endswith("position_ids")]  # a buffer older files saved
    with torch.device("meta"):
        model = TextTransformer(read_config(folder), projection="text_projection.weight" in keys)
    return load_module(model, {_hf_name(k): (lambda k=k: ckpt[k]) for k in keys}, dtype, device,
                       f"text encoder ({folder})", quantize)


def _load_single(ckpt, prefix, layout, cfg, device, dtype, projection, quantize=None):
    keys = [k for k in ckpt.keys() if k.startswith(prefix) and not k.startswith("text_encoders.t5xxl")]
    with torch.device("meta"):
        model = TextTransformer(cfg, projection=projection)
    if layout == "hf":
        sources = {_hf_name(k[len(prefix):]): (lambda k=k: ckpt[k]) for k in keys if not k.endswith("position_ids")}
        if projection and "text_projection.weight" not in sources:  # SD3's CLIP-L: an identity, as diffusers has it
            sources["text_projection.weight"] = lambda: torch.eye(cfg["hidden_size"])
    else:  # open_clip: other keys there (logit_scale, attn_mask, ...) are not ours, as for diffusers' converter
        state = model.state_dict()
        names = renamed(ckpt, state, prefix, open_clip_table(model.config), f"{ckpt.files[0]}: text encoder")
        sources = {}
        for name, src in names.items():
            part, n = open_clip_part(name), state[name].shape[0]
            if part == "T":
                sources[name] = lambda src=src: ckpt[src].t()
            elif part is not None:
                sources[name] = lambda src=src, a=part * n: ckpt[src][a:a + n].clone()
            else:
                sources[name] = lambda src=src: ckpt[src]
    return load_module(model, sources, dtype, device, f"text encoder ({ckpt.files[0]}, {prefix}*)", quantize)


def _clip_prefix(fam):
    """Where a family's single files keep its (last) CLIP encoder: a key prefix ("": a bare CLIP file); None: none."""
    clips = [s for s in fam.text.encoders if s.module is None]
    return clips[-1].single[0] if clips else None


def _file_family(ckpt, path, t5_file):
    """The family whose text side a single file holds (families.of_keys), with its CLIP encoders under their prefix,
    or its other encoders in it; a bare CLIP file is a split text side (FLUX's clip_l.safetensors): t5_file too."""
    try:
        fam = families.of_keys(ckpt, path)
    except CheckpointError:
        fam = None
    prefix = _clip_prefix(fam) if fam else None
    if prefix:
        holds = any(k.startswith(prefix) for k in ckpt.keys())
    elif prefix == "":
        holds = any(k in ckpt for k in ("text_model.embeddings.token_embedding.weight", "embeddings.token_embedding."
                                        "weight"))
    else:
        holds = fam is not None and all(s.module.in_file(ckpt) for s in fam.text.encoders if not s.optional)
    if not holds:
        named = [f for f in families.FAMILIES if _clip_prefix(f)]
        raise CheckpointError(f"{path}: holds no {families.names(named)} text encoder (no "
                              f"{', '.join(_clip_prefix(f) for f in named)} keys)")
    missing = [s for s in fam.text.encoders if s.module and not s.optional and not s.module.in_file(ckpt)]
    if missing and t5_file is None:
        raise CheckpointError(f"{path}: a CLIP-L file alone ({fam.title}'s clip_l.safetensors?): pass t5_file=FILE too")
    return fam


def bpe(folder):
    """(vocab, merges) of a CLIP tokenizer folder: vocab.json + merges.txt, else a tokenizer.json's BPE model (its
    merges as "a b" strings or [a, b] pairs); None when the folder holds neither (e.g. T5's Unigram tokenizer.json)."""
    from tokenizers import models
    vocab, merges = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    if os.path.isfile(vocab) and os.path.isfile(merges):
        return models.BPE.read_file(vocab, merges)
    model = read_json(os.path.join(folder, "tokenizer.json"), {}).get("model", {})
    if model.get("type") != "BPE":
        return None
    return model["vocab"], [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]


def _clip_tokenizers(folder, specs, encoders, what):
    """The CLIP encoders' tokenizers: their subfolders of a diffusers model folder (tokenizer/, tokenizer_2/), one
    tokenizer folder, or (folder None) the vocabulary shipped in clip_bpe/, which every full-size CLIP here uses."""
    subs = [os.path.join(folder or "", s.tokenizer) for s in specs]
    need = f"tokenizer=FOLDER (a diffusers model folder with {' and '.join(s.tokenizer + '/' for s in specs)})"
    if folder is None:
        for enc in encoders:
            if enc.config["vocab_size"] != CLIP_VOCAB_SIZE:
                raise CheckpointError(f"{what} holds no tokenizer and its vocabulary ({enc.config['vocab_size']} "
                                      f"tokens) is not CLIP's: pass {need}")
        return [Tokenizer(VOCAB, pad_token=s.pad) for s in specs]
    if all(os.path.isdir(s) for s in subs):
        return [Tokenizer(s) for s in subs]
    if len(specs) == 1 and os.path.isdir(folder) and bpe(folder) is not None:
        return [Tokenizer(folder)]
    if os.path.isfile(os.path.join(folder, "tokenizer.json")) and bpe(folder) is None:  # another encoder's (T5's)
        return [Tokenizer(VOCAB, pad_token=s.pad) for s in specs]  # CLIP's from clip_bpe/
    raise CheckpointError(f"{what}: no tokenizer in {folder}: pass {need}")


def _tokenizer(spec, folder, length, what, capped=True):
    """Another encoder's tokenizer (T5's tokenizer.json): its subfolder of a model folder, or the folder. capped: the
    pipeline's token count, cut to the tokenizer's own model_max_length where that is smaller (T5's tokenizers say
    512; a model made for short prompts, as the flow demo's, says fewer)."""
    if folder is None:
        raise CheckpointError(f"{what} holds no tokenizer for its {spec.folder}: pass tokenizer=FOLDER (a diffusers "
                              f"model folder with {spec.tokenizer}/, or a folder with its tokenizer.json)")
    where = os.path.join(folder, spec.tokenizer) if os.path.isdir(os.path.join(folder, spec.tokenizer)) else folder
    cap = read_json(os.path.join(where, "tokenizer_config.json"), {}).get("model_max_length") if capped else None
    if isinstance(cap, int) and 1 < cap < length:
        length = cap
    if spec.template is not None:  # a language model's: each prompt goes into the pipeline's template
        return spec.module.Tokenizer(where, max_length=length, template=spec.template)
    return spec.module.Tokenizer(where, max_length=length)


def load(path, device="cpu", dtype=torch.float32, tokenizer=None, t5_file=None, max_length=None, quantize=None):
    """Tokenizers + text encoders of the model in path, as its family's record lists them (families.py): a diffusers
    root (or its text_encoder/ folder), a single SDXL / SD1.5 / SD3.5 .safetensors file, or FLUX's split
    clip_l.safetensors with t5_file=t5xxl_fp16.safetensors. Single files hold no tokenizer: CLIP's comes from
    clip_bpe/ unless tokenizer= names a diffusers model folder (tokenizer/, tokenizer_2/) or a tokenizer folder; T5's
    from tokenizer= (its tokenizer_3/ or tokenizer_2/, or a folder with tokenizer.json). max_length: T5's token count
    (default: the family pipeline's, or the tokenizer's model_max_length where smaller). quantize: the encoders'
    Linear layers stored in that format (fp8, int8, nf4: kernels.quantized_linear), as a quantized run's base."""
    kind, where = component(path, "text_encoder")
    if kind == "file":
        ckpt, config = Checkpoint(path), {}
        fam = _file_family(ckpt, path, t5_file)
    elif os.path.basename(os.path.normpath(where)) != "text_encoder":  # another component's folder (unet/, ...)
        raise CheckpointError(f"{path} is neither a diffusers model folder (no text_encoder/) nor a text_encoder "
                              "folder")
    else:
        root = path if where == os.path.join(path, "text_encoder") else os.path.dirname(os.path.abspath(where))
        fam = families.of(root)
        config = fam.read_config(root)  # the denoiser's (FLUX-dev and schnell encode T5 to other lengths)
    clips, others, present = [], [], []
    for spec in fam.text.encoders:
        if kind == "folder":
            folder = os.path.join(root, spec.folder)
            here = not spec.optional or os.path.isdir(folder)
            enc = None if not here else _load_folder(folder, device, dtype, quantize) if spec.module is None else \
                spec.module.load(folder, device, dtype, quantize, **dict(spec.options))
        elif spec.module is None:  # a stored config (save() writes one) wins over the released encoder's
            prefix, layout, meta = spec.single
            cfg = json.loads(ckpt.metadata[meta]) if meta in ckpt.metadata else spec.config
            enc = _load_single(ckpt, prefix, layout, cfg, device, dtype, spec.projection, quantize)
        else:  # t5_file, or the file itself (SD3.5's hold T5 under a prefix; without it, as diffusers allows: None)
            here = t5_file is not None or spec.module.in_file(ckpt)
            enc = spec.module.load(t5_file or path, device, dtype, quantize, **dict(spec.options)) if here else None
        present.append(enc is not None)
        if enc is not None:
            (clips if spec.module is None else others).append((spec, enc))
    if kind == "folder" and fam.text.width is not None:  # a language model of another size than the denoiser reads
        got, want = others[0][1].config["hidden_size"], fam.text.width(config)
        if got != want:
            raise CheckpointError(f"{path}: its text encoder's hidden size {got} is not the {want} its {fam.title} "
                                  f"{fam.kind} takes")
    folder = tokenizer or (root if kind == "folder" else None)
    toks = _clip_tokenizers(folder, [s for s, _ in clips], [e for _, e in clips], path)
    toks += [_tokenizer(s, folder, max_length or s.tokens(config), path, max_length is None) for s, _ in others]
    encs = [e for _, e in clips + others]
    for enc, tok in zip(encs, toks):  # a language model finds its prompts' ends by its tokenizer's pad token
        if getattr(enc, "pad_id", None) is not None:
            enc.pad_id = tok.pad_id
    return TextEncoders(encs, toks, fam, present).eval()


def save(te, path, layout="single"):
    """Write the CLIP text encoders as their part of an original-layout single file, configs in its metadata."""
    if layout != "single":
        raise ValueError(f"layout must be 'single', got {layout!r}")
    fams = [f for f in families.FAMILIES if "single" in f.layouts]  # the families whose single files are written
    if te.family not in fams:
        raise ValueError(f"clip.save writes the text encoders of {families.names(fams)}, not {te.family.title}'s")
    out, meta = {}, {}
    for enc, spec in zip(te.encoders, te.family.text.encoders):
        prefix, kind, meta_key = spec.single
        meta[meta_key] = json.dumps(enc.config)
        fused, table = {}, open_clip_table(enc.config)
        for name, t in enc.state_dict().items():
            if kind == "hf":
                out[prefix + name] = t
                continue
            src, part = rename(name, table), open_clip_part(name)
            if part == "T":
                out[prefix + src] = t.t()
            elif part is not None:
                fused.setdefault(prefix + src, [None] * 3)[part] = t
            else:
                out[prefix + src] = t
        out.update({k: torch.cat(qkv) for k, qkv in fused.items()})
    save_safetensors(out, path, metadata=meta)
