"""The decoder-only text encoders of Qwen-Image (Qwen2.5-VL-7B's language model) and Z-Image (Qwen3-4B), from
scratch, with their byte-level BPE tokenizer.

Both pipelines wrap the prompt in a chat template, run the language model over it once (no generation) and hand
its hidden states at the real tokens to the transformer as context:
- Qwen-Image: a system message asking to describe the image, the prompt as the user turn, the assistant turn
  opened; hidden_states[-1] (the last layer, after the final norm); the 34 template tokens before the prompt are
  dropped afterwards (QWEN_IMAGE_DROP), the rest zero-padded to the batch's longest with a mask;
- Z-Image: Qwen3's chat template for one user message with add_generation_prompt=True, enable_thinking=True;
  hidden_states[-2] (the second-to-last decoder layer's output, no final norm), the real tokens kept.
The models are textbook pre-norm decoders: RMSNorm, grouped-query causal attention (a few k/v heads shared by
groups of query heads), rotary positions, a SwiGLU MLP. The two differ in small ways: Qwen2.5 has biases on q, k
and v; Qwen3 has none but RMS-normalises each head of q and k (over head_dim, given explicitly in its config).

Qwen2.5-VL rotates by "multimodal" RoPE: three position ids per token (time, row, column), each owning a slice of
the frequencies (mrope_section). Text tokens get the same id on all three axes, so for text-only input every slice
sees the same position and M-RoPE reduces exactly to ordinary 1-D RoPE, which is what is built here.

With right padding and causal attention a real token only attends to earlier tokens, all real, so no attention mask
is needed: states at real tokens are exact, states at pads are garbage the pipelines discard (forward returns the
mask of real tokens). Modules are named after transformers' state-dict keys (embed_tokens, layers.N.self_attn.
q_proj, ..., norm); folders in both Qwen2.5-VL key layouts, Qwen3 folders and ComfyUI's single files load key for
key, the vision tower and lm_head skipped.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
import weights
from mmdit import heads, merge
from t5 import RMSNorm  # x / rms(x) in fp32, times a learned scale: transformers' Qwen2/Qwen3 RMSNorm too
from weights import CheckpointError

# The released language models, as their config.json files name the fields (Qwen2.5-VL-7B-Instruct's text part,
# which Qwen-Image ships as text_encoder/; Qwen3-4B's, which Z-Image ships).
QWEN25_VL_7B = dict(model_type="qwen2_5_vl", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                    num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, hidden_act="silu",
                    rms_norm_eps=1e-6, rope_theta=1000000.0,
                    rope_scaling=dict(type="mrope", mrope_section=[16, 24, 24]))
QWEN3_4B = dict(model_type="qwen3", vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, hidden_act="silu", rms_norm_eps=1e-6,
                rope_theta=1000000.0, attention_bias=False)
FAMILIES = {"qwen2_5_vl": "qwen2", "qwen2_5_vl_text": "qwen2", "qwen2": "qwen2", "qwen3": "qwen3"}
PAD_ID = 151643  # <|endoftext|>, the Qwen tokenizers' pad token

# The pipelines' prompt templates (diffusers' QwenImagePipeline and ZImagePipeline).
QWEN_IMAGE_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                       "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n"
                       "{}<|im_end|>\n<|im_start|>assistant\n")
QWEN_IMAGE_DROP = 34  # the template's tokens before the prompt, dropped from the states
QWEN_IMAGE_MAX_LENGTH = 1024 + QWEN_IMAGE_DROP  # the pipeline's tokenizer cap (template included)
# What Qwen3's chat template renders for one user message, add_generation_prompt=True, enable_thinking=True (the
# empty <think></think> block is only added when thinking is off).
Z_IMAGE_TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
Z_IMAGE_MAX_LENGTH = 512

# transformers' Qwen2Tokenizer pre-tokenizer split (contractions, letter runs, single digits, punctuation, spaces).
PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                     r"""\s*[\r\n]+|\s+(?!\S)|\s+""")


# ----------------------------------------------------------------------------------------------------
# Tokenizer


class Tokenizer:
    """The Qwen byte-level BPE tokenizer from a folder's tokenizer.json, as transformers' Qwen2Tokenizer uses it.

    transformers 5 keeps the file's vocabulary, merges and post-processor (Qwen's adds no tokens: no BOS, no EOS) but
    sets Qwen2's own normalizer (NFC) and pre-tokenizer (the regex split, then bytes to printable characters),
    whatever the file says; so does this. Each prompt is formatted into the template, cut to max_length ids and
    right-padded with the pad token to the batch's longest (transformers' padding=True, truncation=True).
    """

    def __init__(self, folder_or_file, max_length, template="{}"):
        from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers
        from tokenizers import Tokenizer as Tok
        path = os.path.join(folder_or_file, "tokenizer.json") if os.path.isdir(folder_or_file) else folder_or_file
        if not os.path.isfile(path):
            raise CheckpointError(f"{folder_or_file} is not a Qwen tokenizer folder (no tokenizer.json)")
        if "{}" not in template:
            raise ValueError(f"template must hold '{{}}' where the prompt goes: {template!r}")
        try:
            tok = Tok.from_file(path)
        except Exception as e:  # not JSON, or not a tokenizers serialization
            raise CheckpointError(f"cannot read Qwen tokenizer {path}: {(str(e).splitlines() or ['?'])[0]}") from None
        kind = type(tok.model).__name__
        if kind != "BPE":
            raise CheckpointError(f"{path} is not a Qwen tokenizer (a {kind} model, Qwen's is byte-level BPE)")
        folder = os.path.dirname(path)
        config = weights.read_json(os.path.join(folder, "tokenizer_config.json"), {})
        for t in config.get("added_tokens_decoder", {}).values():  # what transformers adds from the config
            if tok.token_to_id(t["content"]) is None:
                tok.add_tokens([AddedToken(t["content"], special=t.get("special", True),
                                           normalized=t.get("normalized", False))])
        pad = weights.special_tokens(folder, dict(pad_token="<|endoftext|>"))["pad_token"]
        pad_id = tok.token_to_id(pad)
        if pad_id is None:
            raise CheckpointError(f"{path}: no pad token {pad} in its vocabulary")
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.enable_truncation(max_length)
        tok.enable_padding(pad_id=pad_id, pad_token=pad)  # no length: to the batch's longest
        self.tok, self.max_length, self.template, self.pad_id = tok, max_length, template, pad_id

    def __call__(self, prompts):
        """list of str -> LongTensor (B, L) of token ids, L the longest (templated, cut) prompt's length."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        texts = [self.template.format(p) for p in prompts]
        return torch.tensor([e.ids for e in self.tok.encode_batch(texts)], dtype=torch.long)


# ----------------------------------------------------------------------------------------------------
# The model


def check_config(config):
    """The language model's fields of a transformers config.json dict (Qwen2.5-VL's sit in text_config from
    transformers 4.5x on, at the top before; text_config wins as in transformers), the released model's values
    for what it lacks; refuse what is not built here, in one line (ValueError)."""
    kind = config.get("model_type")
    if kind not in FAMILIES:
        raise ValueError(f"model_type {kind!r} is not a Qwen2.5-VL / Qwen2 / Qwen3 language model")
    family = FAMILIES[kind]
    text = config.get("text_config") or config
    base = QWEN3_4B if family == "qwen3" else QWEN25_VL_7B
    cfg = {k: text[k] if text.get(k) is not None else base.get(k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "hidden_act", "rms_norm_eps", "head_dim", "attention_bias")}
    cfg["model_type"], cfg["family"] = kind, family
    if text.get("num_attention_heads") is not None and text.get("num_key_value_heads") is None:
        cfg["num_key_value_heads"] = cfg["num_attention_heads"]  # transformers: no grouping
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}  # transformers 5 / older files
    cfg["rope_theta"] = float(rope.get("rope_theta", text.get("rope_theta", base["rope_theta"])))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if family == "qwen2":
        cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]  # Qwen2's config has no head_dim
        cfg["attention_bias"] = True  # q, k and v (not o)
    if rope_type not in ("default", "mrope"):
        raise ValueError(f"unsupported {kind} config: RoPE type {rope_type!r} (the released models use plain RoPE)")
    if cfg["hidden_act"] != "silu":
        raise ValueError(f"unsupported {kind} config: hidden_act {cfg['hidden_act']!r} (SwiGLU takes silu)")
    if text.get("use_sliding_window"):
        raise ValueError(f"unsupported {kind} config: use_sliding_window (the released models attend to all tokens)")
    if cfg["num_attention_heads"] % cfg["num_key_value_heads"]:
        raise ValueError(f"unsupported {kind} config: {cfg['num_attention_heads']} heads do not share "
                         f"{cfg['num_key_value_heads']} k/v heads evenly")
    return cfg


def rope(L, head_dim, theta, device, dtype):
    """cos, sin (L, head_dim) for positions 0..L-1: frequency j rotates channels j and j + head_dim/2 (transformers'
    rotate-half layout), computed in fp32 as transformers computes them, then cast to the model's dtype."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))  # (D/2,), on the CPU
    angles = torch.arange(L, device=device).float()[:, None] * inv_freq.to(device)[None]  # (L, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (L, D)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x (B, H, L, D) rotated: x cos + rotate_half(x) sin, rotate_half(x) = (-x2, x1) for halves x1, x2."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    """Grouped-query causal self-attention: q/k/v projections (+ Qwen3's per-head q/k RMSNorm), RoPE, each k/v head
    repeated for its group of query heads."""

    def __init__(self, cfg):
        super().__init__()
        d, hd, self.n, self.n_kv = cfg["hidden_size"], cfg["head_dim"], cfg["num_attention_heads"], \
            cfg["num_key_value_heads"]
        bias, qwen3 = cfg["attention_bias"], cfg["family"] == "qwen3"
        self.q_proj = nn.Linear(d, self.n * hd, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv * hd, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv * hd, bias=bias)
        self.o_proj = nn.Linear(self.n * hd, d, bias=bias and qwen3)  # Qwen2's output projection has no bias
        if qwen3:
            self.q_norm, self.k_norm = RMSNorm(hd, cfg["rms_norm_eps"]), RMSNorm(hd, cfg["rms_norm_eps"])

    def forward(self, x, cos, sin):  # x (B, L, d)
        q, k, v = heads(self.q_proj(x), self.n), heads(self.k_proj(x), self.n_kv), heads(self.v_proj(x), self.n_kv)
        if hasattr(self, "q_norm"):  # (B, H, L, D): each head's vector normed over D
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        group = self.n // self.n_kv
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, H, L, D)
        return self.o_proj(merge(kernels.attention(q, k, v, causal=True)))  # (B, L, d)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg):
        super().__init__()
        d, f = cfg["hidden_size"], cfg["intermediate_size"]
        self.gate_proj, self.up_proj = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm residual block: attention, then the MLP."""

    def __init__(self, cfg):
        super().__init__()
        self.self_attn, self.mlp = Attention(cfg), MLP(cfg)
        self.input_layernorm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LanguageModel(nn.Module):
    """A Qwen2.5-VL / Qwen2 / Qwen3 language model from its transformers config dict (m.config: check_config's),
    built up to hidden_states[layer] only: -1 (Qwen-Image) runs every layer and the final norm, -2 (Z-Image) all
    but the last layer and no norm, i in 0..N the first i layers (N: with the norm). pad_id marks padding."""

    def __init__(self, config, layer=-1, pad_id=PAD_ID):
        super().__init__()
        self.config = cfg = check_config(config)
        n = cfg["num_hidden_layers"]
        if not -(n + 1) <= layer <= n:
            raise ValueError(f"layer {layer} is not a hidden state of a {n}-layer model (-{n + 1}..{n})")
        self.layer, self.pad_id, self.depth = layer, pad_id, layer % (n + 1)  # depth: decoder layers run
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(self.depth)])
        self.norm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"]) if self.depth == n else None

    def mask(self, ids):
        """(B, L) bool: the real tokens, with right padding every position up to the last non-pad token."""
        pos = torch.arange(1, ids.shape[1] + 1, device=ids.device)  # (L,)
        length = ((ids != self.pad_id) * pos).amax(dim=1, keepdim=True)  # (B, 1): the last real position, 1-based
        return pos[None] <= length

    def forward(self, ids):
        """ids (B, L), right-padded -> (states (B, L, hidden_size) = transformers' hidden_states[layer] at the real
        tokens, mask (B, L) bool of the real tokens)."""
        ids = ids.to(self.embed_tokens.weight.device)
        x = self.embed_tokens(ids)  # (B, L, d)
        cos, sin = rope(ids.shape[1], self.config["head_dim"], self.config["rope_theta"], x.device, x.dtype)
        for block in self.layers:
            x = block(x, cos, sin)
        if self.norm is not None:
            x = self.norm(x)
        return x, self.mask(ids)


# ----------------------------------------------------------------------------------------------------
# Checkpoints

SKIPPED = ("visual.", "model.visual.", "lm_head.")  # the vision tower and the LM head: never read
TOP_LEVEL = ("", "model.", "model.language_model.")  # the LM's prefix in a file that holds only this model


def _prefixes(ckpt):
    """{prefix: family} for each language model in ckpt: a key prefix under which embed_tokens and decoder layers
    sit, with Qwen2.5's q bias or Qwen3's q norm (a Llama-style LM has neither, and is not one of these)."""
    found = {}
    for k in ckpt.keys():
        if k.endswith("embed_tokens.weight"):
            p = k[:-len("embed_tokens.weight")]
            if p + "layers.0.self_attn.q_norm.weight" in ckpt:
                found[p] = "qwen3"
            elif p + "layers.0.self_attn.q_proj.bias" in ckpt:
                found[p] = "qwen2"
    return found


def _prefix(ckpt, path):
    """The key prefix of the one Qwen language model in ckpt, and its family."""
    found = _prefixes(ckpt)
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(sorted(found))})"
        raise CheckpointError(f"{path}: {what} Qwen2.5-VL / Qwen3 language model keys (embed_tokens.weight beside "
                              "layers.0.self_attn.q_proj.bias or q_norm.weight)")
    return next(iter(found.items()))


def in_file(ckpt) -> bool:
    """Whether a single file (weights.Checkpoint) holds a Qwen2.5-VL or Qwen3 language model, under any prefix."""
    return bool(_prefixes(ckpt))


def single_file_config(ckpt, prefix, family) -> dict:
    """The released model's config with the sizes read off a single file's tensors (it holds no config). Head
    counts come from the projections' widths over head_dim: Qwen3's q_norm shows it, Qwen2.5's is 128."""
    layer = prefix + "layers.0."
    vocab, d = ckpt.shape(prefix + "embed_tokens.weight")
    start = prefix + "layers."
    n = 1 + max(int(k[len(start):].split(".")[0]) for k in ckpt.keys() if k.startswith(start))
    head_dim = ckpt.shape(layer + "self_attn.q_norm.weight")[0] if family == "qwen3" else 128
    sizes = dict(vocab_size=vocab, hidden_size=d, num_hidden_layers=n,
                 intermediate_size=ckpt.shape(layer + "mlp.gate_proj.weight")[0],
                 num_attention_heads=ckpt.shape(layer + "self_attn.q_proj.weight")[0] // head_dim,
                 num_key_value_heads=ckpt.shape(layer + "self_attn.k_proj.weight")[0] // head_dim)
    if family == "qwen3":
        return dict(QWEN3_4B, **sizes, head_dim=head_dim, attention_bias=layer + "self_attn.q_proj.bias" in ckpt)
    return dict(QWEN25_VL_7B, **sizes)


def _open(path):
    """(config, checkpoint, the LM's key prefix, whether the file holds nothing else), no weights read."""
    kind, where = weights.component(path, "text_encoder")
    if kind == "file":
        ckpt = weights.Checkpoint(where)
        prefix, family = _prefix(ckpt, where)
        return single_file_config(ckpt, prefix, family), ckpt, prefix, prefix in TOP_LEVEL
    config = weights.read_config(where)
    if config.get("model_type") not in FAMILIES:
        raise CheckpointError(f"{where} holds model_type {config.get('model_type')!r}, not a Qwen2.5-VL / Qwen2 / "
                              "Qwen3 language model")
    ckpt = weights.Checkpoint(weights.find_weights(where, stem="model"))
    prefix = next((p for p in TOP_LEVEL[::-1] if any(k.startswith(p + "layers.") for k in ckpt.keys())), "")
    return config, ckpt, prefix, True


def read_config(path) -> dict:
    """The language model's config of a model path (check_config's fields), no weights read."""
    config = _open(path)[0]
    try:
        return check_config(config)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _sources(m, ckpt, prefix, alone):
    """Our name -> a thunk reading its tensor. Skipped, never read: the vision tower, lm_head, and the decoder
    layers and final norm beyond m's layer. Every other key under the prefix (and, in a file of this model alone,
    every other key at all) must be one of ours: load_module names the missing and unexpected ones."""
    n = m.config["num_hidden_layers"]
    unused = tuple(f"layers.{i}." for i in range(m.depth, n)) + (() if m.norm is not None else ("norm.",))
    sources = {}
    for k in ckpt.keys():
        inside = k.startswith(prefix)
        if k.startswith(SKIPPED) or (inside and k[len(prefix):].startswith(unused)) or not (inside or alone):
            continue
        sources[k[len(prefix):] if inside else k] = lambda k=k: ckpt[k]  # a key outside: unexpected, by its name
    return sources


def _pad_id(path, config):
    """The pad token's id: from the tokenizer beside the model (a pipeline's tokenizer/, or the folder itself), else
    the config's pad_token_id, else Qwen's <|endoftext|>."""
    if os.path.isdir(path):
        for folder in (os.path.join(path, "tokenizer"), os.path.join(os.path.dirname(os.path.abspath(path)),
                                                                       "tokenizer"), path):
            if os.path.isfile(os.path.join(folder, "tokenizer.json")):
                return Tokenizer(folder, 1).pad_id
    pad = (config.get("text_config") or config).get("pad_token_id")
    return PAD_ID if pad is None else pad


def load(path, device="cpu", dtype=torch.float32, quantize=None, layer=-1, pad_id=None):
    """A Qwen2.5-VL / Qwen3 language model up to hidden_states[layer], from a pipeline root (holding text_encoder/),
    a transformers folder (config.json + model*.safetensors, sharded or not) of Qwen2_5_VLForConditionalGeneration
    (keys model.layers.* or transformers 5's model.language_model.*), Qwen3ForCausalLM or Qwen3Model, or a single
    .safetensors file (ComfyUI's qwen_2.5_vl_7b*.safetensors, qwen_3_4b*.safetensors: model.layers.*; any prefix).
    Built on the meta device, read one tensor at a time straight into dtype; quantize: its Linear layers in that
    format (weights.load_module). pad_id: the tokenizer's (None: read beside the model, see _pad_id)."""
    config, ckpt, prefix, alone = _open(path)
    try:
        with torch.device("meta"):
            m = LanguageModel(config, layer, PAD_ID if pad_id is None else pad_id)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if pad_id is None:
        m.pad_id = _pad_id(path, config)
    what = f"{m.config['model_type']} language model {ckpt.files[0]}"
    return weights.load_module(m, _sources(m, ckpt, prefix, alone), dtype, device, what, quantize).eval()
