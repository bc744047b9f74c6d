"""The text side of SD1.5 and SDXL, from scratch: CLIP's BPE tokenizer and its causal text transformer.

SD1.5 conditions on CLIP ViT-L/14's final (layer-normed) hidden states [B,77,768]. SDXL concatenates the
penultimate hidden states of CLIP-L and of OpenCLIP ViT-bigG/14 into [B,77,2048], and also feeds bigG's
projected pooled output [B,1280] (its end-of-text token, through text_projection) to the UNet.

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
from weights import (Checkpoint, CheckpointError, component, find_weights, load_module, read_config, rename, renamed,
                     save_safetensors)

MAX_LENGTH = 77
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
    <|endoftext|>).
    """

    def __init__(self, folder, max_length=MAX_LENGTH):
        from tokenizers import Regex
        from tokenizers import Tokenizer as Tok
        from tokenizers import models, normalizers, pre_tokenizers, processors
        vocab, merges = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
        if not (os.path.isfile(vocab) and os.path.isfile(merges)):
            raise CheckpointError(f"{folder} is not a CLIP tokenizer folder (no vocab.json and merges.txt)")
        special = dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                       pad_token="<|endoftext|>")
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins, as in transformers
            p = os.path.join(folder, name)
            if os.path.isfile(p):
                with open(p) as f:
                    cfg = json.load(f)
                for k in special:
                    v = cfg.get(k)
                    special[k] = (v.get("content") if isinstance(v, dict) else v) or special[k]
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
    """Tokenizers and text encoders of one family: [CLIP-L] for SD1.5, [CLIP-L, OpenCLIP-bigG] for SDXL."""

    def __init__(self, encoders, tokenizers):
        super().__init__()
        self.encoders = nn.ModuleList(encoders)
        self.tokenizers = list(tokenizers)

    @property
    def is_sdxl(self):
        return len(self.encoders) == 2

    def tokenize(self, prompts):
        """list of str -> one LongTensor (B, 77) per encoder (cache these and pass them as encode(ids=...))."""
        return [t(prompts) for t in self.tokenizers]

    def encode(self, prompts=None, ids=None):
        """-> (context, pooled): SDXL (B, 77, 2048), (B, 1280); SD1.5 (B, 77, 768), None. Runs under the
        caller's grad mode (wrap in torch.no_grad() for a frozen encoder)."""
        ids = self.tokenize(prompts) if ids is None else ids
        dev = self.encoders[0].text_model.final_layer_norm.weight.device
        outs = [enc(i.to(dev)) for enc, i in zip(self.encoders, ids)]
        if self.is_sdxl:
            return torch.cat([outs[0]["penultimate"], outs[1]["penultimate"]], dim=-1), outs[1]["projected"]
        return outs[0]["last"], None


# ----------------------------------------------------------------------------------------------------
# Checkpoints

# Single files: (prefix, layout, full-size config, metadata key of a stored config) per encoder.
SINGLE = {"sdxl": [("conditioner.embedders.0.transformer.", "hf", CLIP_L, "text_encoder_config"),
                   ("conditioner.embedders.1.model.", "open_clip", BIG_G, "text_encoder_2_config")],
          "sd15": [("cond_stage_model.transformer.", "hf", CLIP_L, "text_encoder_config")]}
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


def _load_single(ckpt, prefix, layout, cfg, device, dtype):
    keys = [k for k in ckpt.keys() if k.startswith(prefix)]
    with torch.device("meta"):
        model = TextTransformer(cfg, projection=layout == "open_clip")
    if layout == "hf":
        sources = {_hf_name(k[len(prefix):]): (lambda k=k: ckpt[k]) for k in keys if not k.endswith("position_ids")}
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


def _tokenizers(folder, n, what):
    """Tokenizer folders under a diffusers model folder (tokenizer/ [and tokenizer_2/]), or one tokenizer folder."""
    subs = [os.path.join(folder, s) for s in ("tokenizer", "tokenizer_2")[:n]]
    if all(os.path.isdir(s) for s in subs):
        return [Tokenizer(s) for s in subs]
    if n == 1 and os.path.isfile(os.path.join(folder, "vocab.json")):
        return [Tokenizer(folder)]
    raise CheckpointError(f"{what}: no tokenizer in {folder}: pass tokenizer=FOLDER (a diffusers model folder with "
                          f"tokenizer/{' and tokenizer_2/' if n == 2 else ''})")


def load(path, device="cpu", dtype=torch.float32, tokenizer=None):
    """Tokenizers + text encoders of the model in path: a diffusers root (or its text_encoder/ folder), or a
    single SDXL / SD1.5 .safetensors file, which holds no tokenizer: then tokenizer= names a diffusers model
    folder with tokenizer/ (and tokenizer_2/ for SDXL), or for SD1.5 a tokenizer folder itself."""
    kind, where = component(path, "text_encoder")
    if kind == "file":
        ckpt = Checkpoint(path)
        fam = next((f for f, parts in SINGLE.items() if any(k.startswith(parts[-1][0]) for k in ckpt.keys())), None)
        if fam is None:
            raise CheckpointError(f"{path}: holds no SDXL or SD1.5 text encoder (no conditioner.embedders.1.model. "
                                  "or cond_stage_model.transformer. keys)")
        if tokenizer is None:
            raise CheckpointError(f"{path} holds no tokenizer: pass tokenizer=FOLDER (a diffusers model folder with "
                                  f"tokenizer/{' and tokenizer_2/' if fam == 'sdxl' else ''})")
        encoders = []
        for prefix, layout, cfg, meta in SINGLE[fam]:  # a config stored in the file (save() does) wins
            cfg = json.loads(ckpt.metadata[meta]) if meta in ckpt.metadata else cfg
            encoders.append(_load_single(ckpt, prefix, layout, cfg, device, dtype))
        return TextEncoders(encoders, _tokenizers(tokenizer, len(encoders), path)).eval()
    if os.path.basename(os.path.normpath(where)) != "text_encoder":  # another component's folder (unet/, ...)
        raise CheckpointError(f"{path} is neither a diffusers model folder (no text_encoder/) nor a text_encoder "
                              "folder")
    root = path if where == os.path.join(path, "text_encoder") else os.path.dirname(os.path.abspath(where))
    subs = ["text_encoder"] + (["text_encoder_2"] if os.path.isdir(os.path.join(root, "text_encoder_2")) else [])
    encoders = [_load_folder(os.path.join(root, s), device, dtype) for s in subs]
    return TextEncoders(encoders, _tokenizers(tokenizer or root, len(encoders), path)).eval()


def save(te, path, layout="single"):
    """Write the text encoders as their part of an original-layout single file, configs in its metadata."""
    if layout != "single":
        raise ValueError(f"layout must be 'single', got {layout!r}")
    out, meta = {}, {}
    for enc, (prefix, kind, _, meta_key) in zip(te.encoders, SINGLE["sdxl" if te.is_sdxl else "sd15"]):
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
