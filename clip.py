"""The text side of every family, from scratch: CLIP's BPE tokenizer and its causal text transformer (T5 in t5.py).

SD1.5 conditions on CLIP ViT-L/14's final (layer-normed) hidden states [B,77,768]. SDXL concatenates the
penultimate hidden states of CLIP-L and of OpenCLIP ViT-bigG/14 into [B,77,2048], and also feeds bigG's
projected pooled output [B,1280] (its end-of-text token, through text_projection) to the UNet. SD3 takes the same
2048 channels zero-padded to T5's 4096 and followed by T5's 256 tokens, and both projected pooled outputs [B,2048];
FLUX takes T5's states alone and CLIP-L's (unprojected) pooled output [B,768].

Modules are named after transformers' CLIPTextModelWithProjection (text_model.encoder.layers.0.self_attn.q_proj,
..., text_projection), so a diffusers text_encoder/ folder loads key for key. Single files keep CLIP-L in that
naming, but bigG in OpenCLIP's (fused in_proj, transposed text_projection): see open_clip_table below.
"""
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
import t5
from weights import (Checkpoint, CheckpointError, component, find_weights, load_module, read_config, read_json, rename,
                     renamed, save_safetensors, special_tokens)

MAX_LENGTH = 77
VOCAB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "clip_bpe")  # CLIP's BPE (see its README.md)
CLIP_VOCAB_SIZE = 49408
# transformers' CLIPTextConfig defaults, then the real full-size encoders (what single files hold).
DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                projection_dim=512, eos_token_id=49407)
CLIP_L = dict(DEFAULTS, hidden_size=768, intermediate_size=3072, num_attention_heads=12, projection_dim=768,
              eos_token_id=2)  # 123,060,480 parameters
BIG_G = dict(DEFAULTS, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
             hidden_act="gelu", projection_dim=1280, eos_token_id=2)  # 694,659,840 parameters with projection


def quick_gelu(x):
    """OpenAI CLIP's sigmoid approximation of GELU (CLIP-L was trained with it; bigG uses the exact one)."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


# ----------------------------------------------------------------------------------------------------
# Tokenizer


class Tokenizer:
    """CLIP's byte-level BPE, built as transformers' CLIPTokenizer builds it, from vocab.json + merges.txt.

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
        vocab, merges = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
        if not (os.path.isfile(vocab) and os.path.isfile(merges)):
            raise CheckpointError(f"{folder} is not a CLIP tokenizer folder (no vocab.json and merges.txt)")
        special = special_tokens(folder, dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                              unk_token="<|endoftext|>", pad_token="<|endoftext|>"))
        special["pad_token"] = pad_token or special["pad_token"]
        bos, eos, unk, pad = (special[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token"))
        tok = Tok(models.BPE(*models.BPE.read_file(vocab, merges), continuing_subword_prefix="",
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
    """Tokenizers and text encoders of one family: [CLIP-L] for SD1.5, [CLIP-L, OpenCLIP-bigG] for SDXL,
    [CLIP-L, bigG, T5] for SD3 (T5 may be absent, as diffusers allows: zeros then), [CLIP-L, T5] for FLUX."""

    def __init__(self, encoders, tokenizers, family):
        super().__init__()
        self.encoders = nn.ModuleList(encoders)
        self.tokenizers = list(tokenizers)
        self.family = family

    @property
    def is_sdxl(self):
        return self.family == "sdxl"

    def tokenize(self, prompts):
        """list of str -> one LongTensor (B, L) per encoder (cache these and pass them as encode(ids=...))."""
        return [t(prompts) for t in self.tokenizers]

    def encode(self, prompts=None, ids=None):
        """-> (context, pooled), what the family's denoiser takes: SDXL (B, 77, 2048), (B, 1280); SD1.5 (B, 77, 768),
        None; SD3 (B, 77 + 256, 4096), (B, 2048); FLUX (B, 512 or 256, 4096), (B, 768). Runs under the caller's
        grad mode (wrap in torch.no_grad() for a frozen encoder)."""
        ids = self.tokenize(prompts) if ids is None else ids
        dev = self.encoders[0].text_model.final_layer_norm.weight.device
        outs = [enc(i.to(dev)) for enc, i in zip(self.encoders, ids)]
        if self.family == "sd15":
            return outs[0]["last"], None
        if self.family == "flux":
            return outs[1], outs[0]["pooled"]  # T5's states, CLIP-L's pooled output
        clip = torch.cat([outs[0]["penultimate"], outs[1]["penultimate"]], dim=-1)  # (B, 77, 768 + 1280)
        pooled = torch.cat([outs[0]["projected"], outs[1]["projected"]], dim=-1) if self.family == "sd3" else None
        if self.family == "sdxl":
            return clip, outs[1]["projected"]
        B = clip.shape[0]
        t5 = outs[2] if len(outs) == 3 else clip.new_zeros(B, T5_LENGTH["sd3"], T5_WIDTH)  # (B, 256, 4096)
        return torch.cat([F.pad(clip, (0, t5.shape[-1] - clip.shape[-1])), t5], dim=1), pooled  # (B, 333, 4096)


# ----------------------------------------------------------------------------------------------------
# Checkpoints

T5_LENGTH = {"sd3": 256, "flux": 512, "flux-schnell": 256}  # the pipelines' default max_sequence_length
T5_WIDTH = 4096
# Single files: (prefix, layout, full-size config, metadata key of a stored config, pad token) per CLIP encoder.
SINGLE = {"sdxl": [("conditioner.embedders.0.transformer.", "hf", CLIP_L, "text_encoder_config", None),
                   ("conditioner.embedders.1.model.", "open_clip", BIG_G, "text_encoder_2_config", "!")],
          "sd15": [("cond_stage_model.transformer.", "hf", CLIP_L, "text_encoder_config", None)],
          "sd3": [("text_encoders.clip_l.transformer.", "hf", CLIP_L, "text_encoder_config", None),
                  ("text_encoders.clip_g.transformer.", "hf", BIG_G, "text_encoder_2_config", "!")],
          "flux": [("", "hf", CLIP_L, "text_encoder_config", None)]}  # FLUX's split clip_l.safetensors
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


def _load_folder(folder, device, dtype):
    ckpt = Checkpoint(find_weights(folder, "model"))
    keys = [k for k in ckpt.keys() if not k.endswith("position_ids")]  # a buffer older files saved
    with torch.device("meta"):
        model = TextTransformer(read_config(folder), projection="text_projection.weight" in keys)
    return load_module(model, {_hf_name(k): (lambda k=k: ckpt[k]) for k in keys}, dtype, device,
                       f"text encoder ({folder})")


def _load_single(ckpt, prefix, layout, cfg, device, dtype, projection):
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
    return load_module(model, sources, dtype, device, f"text encoder ({ckpt.files[0]}, {prefix}*)")


def _file_family(ckpt, path, t5_file):
    keys = ckpt.keys()
    for fam in ("sd3", "sdxl", "sd15"):
        if any(k.startswith(SINGLE[fam][-1][0]) for k in keys):
            return fam
    if any(k in keys for k in ("text_model.embeddings.token_embedding.weight", "embeddings.token_embedding.weight")):
        if t5_file is None:
            raise CheckpointError(f"{path}: a CLIP-L file alone (FLUX's clip_l.safetensors?): pass t5_file=FILE too")
        return "flux"
    raise CheckpointError(f"{path}: holds no SDXL, SD1.5 or SD3 text encoder (no conditioner.embedders.1.model., "
                          "cond_stage_model.transformer. or text_encoders.clip_l. keys)")


def _clip_tokenizers(folder, encoders, pads, what):
    """CLIP tokenizers: tokenizer/ [and tokenizer_2/] of a diffusers model folder, one tokenizer folder, or (folder
    None) the vocabulary shipped in clip_bpe/, which every full-size CLIP encoder here uses."""
    n = len(encoders)
    if folder is None:
        for enc in encoders:
            if enc.config["vocab_size"] != CLIP_VOCAB_SIZE:
                raise CheckpointError(f"{what} holds no tokenizer and its vocabulary ({enc.config['vocab_size']} "
                                      f"tokens) is not CLIP's: pass tokenizer=FOLDER (a diffusers model folder with "
                                      f"tokenizer/{' and tokenizer_2/' if n == 2 else ''})")
        return [Tokenizer(VOCAB, pad_token=p) for p in pads]
    subs = [os.path.join(folder, s) for s in ("tokenizer", "tokenizer_2")[:n]]
    if all(os.path.isdir(s) for s in subs):
        return [Tokenizer(s) for s in subs]
    if n == 1 and os.path.isfile(os.path.join(folder, "vocab.json")):
        return [Tokenizer(folder)]
    t5_only = os.path.isfile(os.path.join(folder, "tokenizer.json"))
    if t5_only and not os.path.isfile(os.path.join(folder, "vocab.json")):
        return [Tokenizer(VOCAB, pad_token=p) for p in pads]  # a T5 tokenizer folder: CLIP's from clip_bpe/
    raise CheckpointError(f"{what}: no tokenizer in {folder}: pass tokenizer=FOLDER (a diffusers model folder with "
                          f"tokenizer/{' and tokenizer_2/' if n == 2 else ''})")


def _t5_tokenizer(folder, fam, length, what, capped=True):
    """T5's tokenizer (tokenizer.json): tokenizer_3/ (SD3) or tokenizer_2/ (FLUX) of a model folder, or the folder.
    capped: the pipeline's token count, cut to the tokenizer's own model_max_length where that is smaller (T5's
    tokenizers say 512; a model made for short prompts, as the flow demo's, says fewer)."""
    sub = os.path.join(folder or "", "tokenizer_3" if fam == "sd3" else "tokenizer_2")
    if folder is None:
        raise CheckpointError(f"{what} holds no T5 tokenizer: pass tokenizer=FOLDER (a diffusers model folder with "
                              f"{os.path.basename(sub)}/, or a folder with T5's tokenizer.json)")
    where = sub if os.path.isdir(sub) else folder
    cap = read_json(os.path.join(where, "tokenizer_config.json"), {}).get("model_max_length") if capped else None
    if isinstance(cap, int) and 1 < cap < length:
        length = cap
    return t5.Tokenizer(where, max_length=length)


def _folder_family(root):
    if os.path.isdir(os.path.join(root, "text_encoder_3")):
        return "sd3"
    if os.path.isdir(os.path.join(root, "text_encoder_2")):
        cfg = read_config(os.path.join(root, "text_encoder_2"))
        return "flux" if cfg.get("model_type") == "t5" else "sdxl"
    return "sd15"


def _flux_length(root):
    """512 tokens for FLUX-dev, 256 for schnell (no guidance embedding), as their pipelines are run."""
    cfg = os.path.join(root or "", "transformer", "config.json")
    if root is not None and os.path.isfile(cfg) and not read_config(os.path.dirname(cfg)).get("guidance_embeds"):
        return T5_LENGTH["flux-schnell"]
    return T5_LENGTH["flux"]


def load(path, device="cpu", dtype=torch.float32, tokenizer=None, t5_file=None, max_length=None):
    """Tokenizers + text encoders of the model in path: a diffusers root (or its text_encoder/ folder), a single
    SDXL / SD1.5 / SD3.5 .safetensors file, or FLUX's split clip_l.safetensors with t5_file=t5xxl_fp16.safetensors.
    Single files hold no tokenizer: CLIP's comes from clip_bpe/ unless tokenizer= names a diffusers model folder
    (tokenizer/, tokenizer_2/) or a tokenizer folder; T5's from tokenizer= (tokenizer_3/ or tokenizer_2/ in it, or
    a folder with tokenizer.json). max_length: T5's token count (default: the family pipeline's, or the
    tokenizer's model_max_length where smaller)."""
    kind, where = component(path, "text_encoder")
    if kind == "file":
        ckpt = Checkpoint(path)
        fam = _file_family(ckpt, path, t5_file)
        encoders = []
        for prefix, layout, cfg, meta, _ in SINGLE[fam]:  # a config stored in the file (save() does) wins
            cfg = json.loads(ckpt.metadata[meta]) if meta in ckpt.metadata else cfg
            proj = layout == "open_clip" or fam == "sd3"
            encoders.append(_load_single(ckpt, prefix, layout, cfg, device, dtype, proj))
        toks = _clip_tokenizers(tokenizer, encoders, [p[-1] for p in SINGLE[fam]], path)
        if fam == "flux" or (fam == "sd3" and any(k.endswith(t5.REL) for k in ckpt.keys())):  # else SD3 without T5
            encoders.append(t5.load(t5_file or path, device, dtype))  # finds its prefix in a whole SD3.5 file
            toks.append(_t5_tokenizer(tokenizer, fam, max_length or T5_LENGTH[fam], path, max_length is None))
        return TextEncoders(encoders, toks, fam).eval()
    if os.path.basename(os.path.normpath(where)) != "text_encoder":  # another component's folder (unet/, ...)
        raise CheckpointError(f"{path} is neither a diffusers model folder (no text_encoder/) nor a text_encoder "
                              "folder")
    root = path if where == os.path.join(path, "text_encoder") else os.path.dirname(os.path.abspath(where))
    fam = _folder_family(root)
    subs = {"sd15": ["text_encoder"], "sdxl": ["text_encoder", "text_encoder_2"], "flux": ["text_encoder"],
            "sd3": ["text_encoder", "text_encoder_2"]}[fam]
    encoders = [_load_folder(os.path.join(root, s), device, dtype) for s in subs]
    toks = _clip_tokenizers(tokenizer or root, encoders, [None, "!"][:len(encoders)], path)
    if fam in ("sd3", "flux"):
        folder = os.path.join(root, "text_encoder_3" if fam == "sd3" else "text_encoder_2")
        encoders.append(t5.load(folder, device, dtype))
        length = max_length or (T5_LENGTH["sd3"] if fam == "sd3" else _flux_length(root))
        toks.append(_t5_tokenizer(tokenizer or root, fam, length, path, max_length is None))
    return TextEncoders(encoders, toks, fam).eval()


def save(te, path, layout="single"):
    """Write the CLIP text encoders as their part of an original-layout single file, configs in its metadata."""
    if layout != "single":
        raise ValueError(f"layout must be 'single', got {layout!r}")
    if te.family not in ("sdxl", "sd15"):
        raise ValueError(f"clip.save writes SDXL / SD1.5 text encoders, not {te.family}'s")
    out, meta = {}, {}
    for enc, (prefix, kind, _, meta_key, _) in zip(te.encoders, SINGLE[te.family]):
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
