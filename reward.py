"""Reward models that score samples: PickScore, CLIP score, HPSv2 and the LAION aesthetic predictor, from scratch.

All four are CLIP: a vision transformer (below) and clip.py's text transformer, each ending in a projection
into one embedding space. They differ in the weights and in the formula on the two embeddings:
  pickscore  logit_scale.exp() * cos(image, prompt)       PickScore_v1 (a transformers CLIPModel folder, ViT-H/14)
  clip       max(100 * cos(image, prompt), 0)             CLIP score, as torchmetrics' CLIPScore (any CLIPModel folder)
  hps        cos(image, prompt)                           HPSv2 / v2.1 (an open_clip ViT-H-14 state dict in a .pt file)
  aesthetic  MLP(image embedding / its norm); no prompt   LAION aesthetic predictor v2 on CLIP ViT-L/14

A fifth kind, http, is a client: the scores of a reward server that speaks the protocol in docs/evaluation.md
(reward_server.py serves any of the four that way), for rewards that live in another environment.

Modules are named after transformers' CLIPModel (vision_model.*, text_model.*, visual_projection, text_projection,
logit_scale), so its folders load key for key; open_clip's layout is renamed by one table (open_clip_table).

    scorer = reward.load("pickscore", "PickScore_v1", tokenizer="CLIP-ViT-H-14-laion2B-s32B-b79K")
    scores = scorer(images, prompts)  # images (B, 3, H, W) in [0, 1], B prompts -> (B,) float32, higher is better

Images are preprocessed on tensors (see preprocess); the model's weights never require grad, so no graph is built
unless the images require one (then the score is differentiable in them).
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import clip
import hub
import kernels
import toy
from images import png_bytes
from weights import (Checkpoint, CheckpointError, find_weights, load_module, read_config, read_json, renamed,
                     torch_file)

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # OpenAI CLIP's, all four use it
# transformers' CLIPVisionConfig defaults (old configs leave some out).
VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, num_channels=3,
              image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
# open_clip's model_configs/ViT-H-14.json: what HPSv2 fine-tuned (exact GELU in both towers).
VIT_H_14 = {"embed_dim": 1024,
            "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}}


def preprocess(images, size):
    """images (B, 3, H, W) in [0, 1] -> CLIP's input (B, 3, size, size), as transformers' CLIPImageProcessor does it:
    bicubic resize of the short side to size (long side int(size * long / short)), centre crop at offset extra // 2,
    clamp to [0, 1] (its resize works on 8-bit images), then (x - mean) / std. Two small differences: the resize is
    torch's antialiased bicubic, which follows PIL's filter but not its 8-bit rounding (one 8-bit step apart on smooth
    images), and open_clip's crop (HPSv2's) rounds an odd extra's half the other way for some sizes (one pixel)."""
    B, C, H, W = images.shape
    short, long = min(H, W), max(H, W)
    new_long = int(size * long / short)
    h, w = (size, new_long) if H <= W else (new_long, size)
    x = F.interpolate(images.float(), size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    top, left = (h - size) // 2, (w - size) // 2
    x = x[:, :, top:top + size, left:left + size].clamp(0, 1)  # (B, 3, size, size)
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (MEAN, STD))
    return (x - mean) / std


# ----------------------------------------------------------------------------------------------------
# Model


class Attention(clip.Attention):
    """clip.py's attention without its causal mask: every patch sees every patch."""

    def forward(self, x):  # (B, L, D)
        B, L, D = x.shape
        q, k, v = (p(x).view(B, L, self.heads, D // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, H, L, D/H)
        return self.out_proj(kernels.attention(q, k, v).transpose(1, 2).reshape(B, L, D))


class Layer(clip.Layer):
    """clip.py's pre-LayerNorm block with the vision tower's attention."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.self_attn = Attention(cfg["hidden_size"], cfg["num_attention_heads"])


class CLIPModel(clip.TextTransformer):
    """transformers' CLIPModel: clip.py's text transformer with its projection, plus a ViT image encoder (patch conv,
    class token, positions, pre-norm, pre-LN layers, the class token's post-norm, projection) and logit_scale."""

    def __init__(self, text_cfg, vision_cfg, projection_dim):
        super().__init__(dict(text_cfg, projection_dim=projection_dim), projection=True)
        self.vision_config = v = {**VISION, **vision_cfg}
        if v["hidden_act"] not in clip.ACTIVATIONS:
            raise CheckpointError(f"unsupported image encoder activation {v['hidden_act']!r}")
        d, p, eps = v["hidden_size"], v["patch_size"], v["layer_norm_eps"]
        self.image_size = v["image_size"]
        self.vision_model = m = nn.Module()
        m.embeddings = nn.Module()
        m.embeddings.patch_embedding = nn.Conv2d(v["num_channels"], d, p, stride=p, bias=False)
        m.embeddings.class_embedding = nn.Parameter(torch.empty(d))
        m.embeddings.position_embedding = nn.Embedding((self.image_size // p) ** 2 + 1, d)
        m.pre_layrnorm = nn.LayerNorm(d, eps=eps)  # (sic): transformers' spelling, kept so its files load as they are
        m.encoder = nn.Module()
        m.encoder.layers = nn.ModuleList([Layer(v) for _ in range(v["num_hidden_layers"])])
        m.post_layernorm = nn.LayerNorm(d, eps=eps)
        self.visual_projection = nn.Linear(d, projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.empty(()))  # log of the contrastive temperature's inverse

    def image_embeds(self, pixels):
        """pixels (B, 3, S, S), preprocessed -> (B, P) the projected class token (transformers' get_image_features)."""
        m = self.vision_model
        x = m.embeddings.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (B, N, D): one token per patch
        cls = m.embeddings.class_embedding.expand(x.shape[0], 1, -1)  # (B, 1, D)
        x = m.pre_layrnorm(torch.cat([cls, x], 1) + m.embeddings.position_embedding.weight)  # (B, 1 + N, D)
        for layer in m.encoder.layers:
            x = layer(x)
        return self.visual_projection(m.post_layernorm(x[:, 0]))  # (B, P)

    def text_embeds(self, ids):
        """ids (B, L) -> (B, P) the projected end token (transformers' get_text_features)."""
        return self(ids)["projected"]


class Aesthetic(nn.Module):
    """The LAION aesthetic predictor v2's head (improved-aesthetic-predictor's MLP): linear layers, no activations."""

    def __init__(self, dim):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x):  # (B, dim) unit-length image embeddings -> (B, 1)
        return self.layers(x)


class Scorer:
    """scorer(images (B, 3, H, W) in [0, 1], prompts: list of B str) -> (B,) float32 scores, higher is better."""

    def __init__(self, kind, model, tokenizer=None, head=None):
        self.kind, self.model, self.tokenizer, self.head = kind, model, tokenizer, head

    def __call__(self, images, prompts=None):
        img = self.image_embeds(images)  # (B, P)
        if self.kind == "aesthetic":  # the predictor was trained on unit-length ViT-L/14 embeddings, in fp32
            return self.head(img).squeeze(-1)
        if prompts is None or len(prompts) != len(images):
            raise ValueError(f"{self.kind}: needs one prompt per image, got {len(images)} images and "
                             f"{'no' if prompts is None else len(prompts)} prompts")
        w = self.model.logit_scale
        cos = (img * self.text_embeds(prompts)).sum(-1)  # (B,)
        if self.kind == "pickscore":
            return w.float().exp() * cos
        if self.kind == "clip":
            return (100 * cos).clamp(min=0)
        return cos  # hps: hpsv2 takes the diagonal of image_features @ text_features.T, both unit length

    def image_embeds(self, images):
        """images (B, 3, H, W) in [0, 1] -> (B, P) unit-length fp32 image embeddings (also Diffusion-RPO's weights)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.kind}: images must be (B, 3, H, W), got {tuple(images.shape)}")
        w = self.model.logit_scale
        x = preprocess(images.to(w.device), self.model.image_size).to(w.dtype)
        return F.normalize(self.model.image_embeds(x).float(), dim=-1)

    def text_embeds(self, prompts):
        """prompts (list of B str) -> (B, P) unit-length fp32 text embeddings."""
        ids = self.tokenizer(prompts).to(self.model.logit_scale.device)  # (B, 77)
        return F.normalize(self.model.text_embeds(ids).float(), dim=-1)


# ----------------------------------------------------------------------------------------------------
# Loading


def _load_hf(path, device, dtype, kind):
    """A transformers CLIPModel folder: config.json and model.safetensors (or an older pytorch_model.bin)."""
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise CheckpointError(f"{kind}: {path} is not a transformers CLIPModel folder (no config.json)")
    cfg = read_config(path)
    if "vision_config" not in cfg or "text_config" not in cfg:
        raise CheckpointError(f"{kind}: {path} is not a transformers CLIPModel folder (its config.json, model_type "
                              f"{cfg.get('model_type')!r}, has no text_config and vision_config)")
    # Older configs also hold *_config_dict, which transformers lets win; the projection size is the top level's.
    text = {**cfg["text_config"], **(cfg.get("text_config_dict") or {})}
    vision = {**cfg["vision_config"], **(cfg.get("vision_config_dict") or {})}
    with torch.device("meta"):
        model = CLIPModel(text, vision, cfg.get("projection_dim", 512))
    if os.path.isfile(os.path.join(path, "pytorch_model.bin")) and not any(
            f.startswith("model") and f.endswith(".safetensors") for f in os.listdir(path)):
        ckpt = torch_file(os.path.join(path, "pytorch_model.bin"), f"{kind} weights")
    else:
        ckpt = Checkpoint(find_weights(path, "model"))
    sources = {k: (lambda k=k: ckpt[k]) for k in ckpt.keys() if not k.endswith("position_ids")}  # an old buffer
    return load_module(model, sources, dtype, device, f"{kind} ({path})")


def from_open_clip(config):
    """open_clip's model-config dict (model_configs/*.json) -> our text config, vision config, projection size.
    Only the plain ViT + text transformer is built here; other keys are refused rather than ignored."""
    vis, txt = config.get("vision_cfg", {}), config.get("text_cfg", {})
    unknown = ([k for k in config if k not in ("embed_dim", "quick_gelu", "vision_cfg", "text_cfg")]
               + [f"vision_cfg.{k}" for k in vis if k not in ("image_size", "layers", "width", "head_width",
                                                              "patch_size", "mlp_ratio")]
               + [f"text_cfg.{k}" for k in txt if k not in ("context_length", "vocab_size", "width", "heads",
                                                            "layers", "mlp_ratio")])
    if unknown:
        raise ValueError(f"hps: config keys not supported here: {', '.join(unknown)} (a plain open_clip ViT config is)")
    if "embed_dim" not in config or not isinstance(vis.get("layers", 12), int):
        raise ValueError("hps: config needs embed_dim and an integer vision_cfg.layers (a ViT, not a ResNet)")
    act = "quick_gelu" if config.get("quick_gelu") else "gelu"
    vw, tw = vis.get("width", 768), txt.get("width", 512)
    vision = dict(hidden_size=vw, intermediate_size=int(vw * vis.get("mlp_ratio", 4.0)), hidden_act=act,
                  num_hidden_layers=vis.get("layers", 12), num_attention_heads=vw // vis.get("head_width", 64),
                  image_size=vis.get("image_size", 224), patch_size=vis.get("patch_size", 16), layer_norm_eps=1e-5)
    # eos_token_id 2: pool at the largest id, as open_clip does (its end token is the last of the vocabulary).
    text = dict(vocab_size=txt.get("vocab_size", 49408), hidden_size=tw, intermediate_size=int(tw * txt.get(
        "mlp_ratio", 4.0)), num_hidden_layers=txt.get("layers", 12), num_attention_heads=txt.get("heads", 8),
        max_position_embeddings=txt.get("context_length", 77), hidden_act=act, layer_norm_eps=1e-5, eos_token_id=2)
    return text, vision, config["embed_dim"]


def open_clip_table(model):
    """Our name -> open_clip's: clip.py's text table, its layer table again under visual., and the vision ends.
    As there, q, k, v are thirds of a fused in_proj; visual.proj is visual_projection's weight transposed."""
    m = clip.open_clip_table(model.config)
    for ours, theirs in clip.open_clip_table(model.vision_config).items():
        if ours.startswith("text_model.encoder."):
            m[ours.replace("text_model.", "vision_model.", 1)] = "visual." + theirs
    m.update({"vision_model.embeddings.patch_embedding": "visual.conv1", "vision_model.pre_layrnorm": "visual.ln_pre",
              "vision_model.embeddings.class_embedding": "visual.class_embedding",
              "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
              "vision_model.post_layernorm": "visual.ln_post", "visual_projection.weight": "visual.proj"})
    return m  # logit_scale keeps its name


def _load_open_clip(path, config, device, dtype):
    """An HPSv2 checkpoint: {"state_dict": open_clip model state dict}, strictly (every key used, none missing)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"hps: {path} is not a file (HPS_v2_compressed.pt or HPS_v2.1_compressed.pt)")
    obj = torch_file(path, "hps checkpoint")
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        raise CheckpointError(f"hps: {path} holds no 'state_dict' (not an HPSv2 checkpoint)")
    sd = obj["state_dict"]
    with torch.device("meta"):
        model = CLIPModel(*from_open_clip(config))
    state = model.state_dict()
    names = renamed(sd, state, "", open_clip_table(model), f"hps ({path})", strict=True)
    sources = {}
    for name, src in names.items():
        t, part = sd[src], "T" if name == "visual_projection.weight" else clip.open_clip_part(name)
        if part == "T":
            sources[name] = t.t().contiguous()
        elif part is not None:
            n = state[name].shape[0]
            sources[name] = t[part * n:(part + 1) * n].clone()
        else:
            sources[name] = t
    return load_module(model, sources, dtype, device, f"hps ({path})")


def _tokenizer(folder, model, kind):
    if clip.bpe(folder) is None:
        raise CheckpointError(f"{kind}: no tokenizer in {folder} (vocab.json + merges.txt, or tokenizer.json): pass "
                              "tokenizer=FOLDER, "
                              "e.g. the CLIP-ViT-H-14-laion2B-s32B-b79K folder")
    return clip.Tokenizer(folder, max_length=model.config["max_position_embeddings"])


OPTIONS = {"pickscore": ("tokenizer",), "clip": ("tokenizer",), "hps": ("tokenizer", "config"), "aesthetic": ("head",),
           "area": (), "http": ("timeout", "retries")}
FILES = ("tokenizer", "config", "head")  # the options that name files (or folders, or hub ids)


class Http:
    """A reward server's scores (the protocol in docs/evaluation.md): POST {"prompts": [str], "images": [base64 PNG]}
    to url, read 200 {"scores": [one number per image, in order]}. A request is tried `retries` times, `timeout`
    seconds each; then, or on any other answer, one line naming the URL."""

    def __init__(self, url, timeout=120.0, retries=3):
        self.kind, self.url, self.timeout, self.retries = "http", url, float(timeout), int(retries)
        if not url.startswith(("http://", "https://")) or self.timeout <= 0 or self.retries < 1:
            raise ValueError(f"--score http={url}: needs an http:// or https:// URL, timeout > 0 and retries >= 1")

    def __call__(self, images, prompts=None):
        import base64
        import json
        import time
        import urllib.error
        import urllib.request
        if prompts is None or len(prompts) != len(images):
            raise ValueError(f"http: needs one prompt per image, got {len(images)} images")
        body = json.dumps({"prompts": list(prompts), "images": [base64.b64encode(png_bytes(x)).decode()
                                                                for x in images.detach().float().cpu()]}).encode()
        where = f"the reward server {self.url}"
        for attempt in range(1, self.retries + 1):
            request = urllib.request.Request(self.url, body, {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as r:
                    answer = r.read()
                break
            except urllib.error.HTTPError as e:  # it answered, with an error: retried only when it may pass
                why = f"answered HTTP {e.code}: {e.read()[:200].decode(errors='replace').strip()}"
                if e.code < 500:
                    raise ValueError(f"{where} {why}") from None
            except (OSError, TimeoutError) as e:  # refused, unreachable, or slower than timeout
                why = f"did not answer ({getattr(e, 'reason', None) or e})"
            if attempt == self.retries:
                raise ValueError(f"{where} {why}, {self.retries} tries of {self.timeout:g} s") from None
            time.sleep(min(2.0 ** attempt, 30.0))
        try:
            scores = json.loads(answer)["scores"]
            out = torch.tensor([float(v) for v in scores], dtype=torch.float32)
        except Exception:
            raise ValueError(f"{where} answered {answer[:100]!r}..., not JSON {{\"scores\": [number, ...]}}") from None
        if len(out) != len(images):
            raise ValueError(f"{where} gave {len(out)} scores for {len(images)} images")
        return out.to(images.device)


def load(kind, path, device="cpu", dtype=torch.float32, **options):
    """A Scorer of one kind (see the module docstring) from the files people have:
      pickscore, clip  path: a transformers CLIPModel folder; tokenizer=FOLDER when it holds no vocab.json/merges.txt
      hps              path: HPS_v2(.1)_compressed.pt; tokenizer=FOLDER optional (default: CLIP's BPE vocabulary in
                       clip_bpe/, which open_clip uses, padded with "!" as open_clip pads; open_clip also runs ftfy
                       and html.unescape on prompts, which leave ordinary prompts as they are); config=an open_clip
                       model-config dict (default ViT-H-14)
      aesthetic        path: a transformers CLIP ViT-L/14 folder; head=sac+logos+ava1-l14-linearMSE.pth (its MLP)
      area             no path: the CPU demo's rule "the larger shape wins" (toy.area), to try the tools on"""
    if kind not in OPTIONS:
        raise ValueError(f"unknown reward kind {kind!r} (one of {', '.join(OPTIONS)})")
    extra = [k for k in options if k not in OPTIONS[kind]]
    if extra:
        takes = ", ".join(OPTIONS[kind]) or "none"
        raise ValueError(f"{kind}: unknown option(s) {', '.join(extra)} (it takes {takes})")
    if kind == "http":
        return Http(path or "", **options)
    if kind == "area":
        if path is not None:
            raise ValueError(f"area: the demo's rule has no weights, so no path (got {path})")
        return toy.area
    if path is None:
        raise ValueError(f"{kind}: needs the path of its weights")
    if kind == "aesthetic" and options.get("head") is None:
        raise CheckpointError("aesthetic: pass head=FILE (the LAION predictor's MLP, sac+logos+ava1-l14-linearMSE.pth)")
    if kind == "hps":
        model = _load_open_clip(path, options.get("config") or VIT_H_14, device, dtype)
    else:
        model = _load_hf(path, device, dtype, kind)
    tok = head = None
    if kind == "aesthetic":
        with torch.device("meta"):
            head = Aesthetic(model.visual_projection.out_features)
        sd = torch_file(options["head"], "aesthetic head")
        if not isinstance(sd, dict):
            raise CheckpointError(f"aesthetic: {options['head']} is not a state dict (the LAION predictor's MLP)")
        head = load_module(head, sd, torch.float32, device, f"aesthetic head ({options['head']})")
        head.eval().requires_grad_(False)
    elif kind == "hps" and options.get("tokenizer") is None:  # the .pt holds none: CLIP's own, shipped in clip_bpe/
        if model.config["vocab_size"] != clip.CLIP_VOCAB_SIZE:
            raise CheckpointError(f"hps: pass tokenizer=FOLDER (a CLIP tokenizer folder with vocab.json and merges.txt;"
                                  f" the checkpoint holds none and its {model.config['vocab_size']} tokens are not "
                                  "CLIP's vocabulary)")
        tok = clip.Tokenizer(clip.VOCAB, max_length=model.config["max_position_embeddings"], pad_id=0)
    else:
        tok = _tokenizer(options.get("tokenizer") or path, model, kind)
    return Scorer(kind, model.eval().requires_grad_(False), tok, head)


# ----------------------------------------------------------------------------------------------------
# The --score flag of every tool: KIND[=PATH][,OPTION=VALUE...]


def parse_spec(spec: str):
    """--score KIND[=PATH][,OPTION=VALUE...] -> (kind, path or None, options), e.g. "hps=HPS_v2.1_compressed.pt,
    tokenizer=CLIP-ViT-H-14" -> ("hps", "HPS_v2.1_compressed.pt", {"tokenizer": "CLIP-ViT-H-14"}); "area" -> the
    demo's rule, which has no path."""
    head, *rest = spec.split(",")
    kind, _, path = head.partition("=")
    options = {}
    for r in rest:
        key, eq, value = r.partition("=")
        if not (key and eq and value):
            raise ValueError(f"--score {spec}: after KIND=PATH come OPTION=VALUE items separated by commas, got {r!r}")
        options[key] = value
    if kind not in OPTIONS:
        raise ValueError(f"--score {spec}: unknown kind {kind!r} (one of {', '.join(OPTIONS)})")
    return kind, path or None, options


def parse_flags(p, flags) -> list:
    """--score flags as parse_spec reads them; a bad spec, or a kind given twice (scores are keyed by kind), is one
    line (p.error)."""
    try:
        specs = [parse_spec(s) for s in flags]
    except ValueError as e:
        p.error(str(e))
    kinds = [kind for kind, _, _ in specs]
    if len(set(kinds)) < len(kinds):
        p.error(f"--score: each kind once (scores are keyed by kind), got {', '.join(kinds)}")
    return specs


def finite(kind, scores, where):
    """scores, unless some are NaN or infinite: then one line naming the scorer (a NaN ranks nothing, and would
    be written into JSON files that are then not JSON)."""
    bad = int((~torch.isfinite(scores)).sum())
    if bad:
        raise ValueError(f"--score {kind} gave {bad} non-finite score(s) {where}: check the scorer and its weights")
    return scores


def load_all(specs, device="cpu", dtype=torch.float32) -> dict:
    """kind -> Scorer for parsed --score specs, loaded before any image is made, so that a wrong folder or head
    file fails in seconds, not after hours of sampling. config= names an open_clip model-config JSON file."""
    out = {}
    for kind, path, options in specs:
        if kind != "http":  # hub ids: the scorer's files fetched (a path wins)
            path = hub.local(path, f"--score {kind}=")
            options = {k: hub.local(v, f"--score {kind}: {k}=") if k in FILES else v for k, v in options.items()}
        if kind not in ("area", "http") and path is not None and not os.path.exists(path):  # (area: load says so)
            raise CheckpointError(f"{kind}: no such file or folder: {path}")
        if "config" in options:
            options = dict(options, config=read_json(options["config"]))
        out[kind] = load(kind, path, device=device, dtype=dtype, **options)
    return out


# ----------------------------------------------------------------------------------------------------
# How two sets of scores compare: the win rate of one over the other, with its interval


def wilson(successes, n, z=1.96):
    """95% Wilson score interval for a proportion (stays inside [0, 1] even for small n)."""
    p, d = successes / n, 1 + z * z / n
    c, h = (p + z * z / (2 * n)) / d, z / d * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, c - h), min(1.0, c + h)


def win_rate(base: torch.Tensor, tuned: torch.Tensor) -> dict:
    """Paired scores (n,) each -> their means and the win rate of tuned over base, a tie counting 0.5, with a 95%
    Wilson interval on wins + ties / 2 out of n (each pair taken as one independent trial)."""
    n = len(base)
    wins = float((tuned > base).sum()) + 0.5 * float((tuned == base).sum())
    return dict(base=float(base.mean()), tuned=float(tuned.mean()), win_rate=wins / n, ci95=list(wilson(wins, n)), n=n)
