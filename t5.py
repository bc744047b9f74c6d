"""The T5 text side of SD3 and FLUX.1, from scratch: T5 v1.1's encoder and its SentencePiece tokenizer.

SD3's text_encoder_3/ and FLUX.1's text_encoder_2/ are the encoder half of T5-v1.1-XXL; their
pipelines feed its last hidden states [B,L,4096], with no attention mask, to the transformer as context. T5 v1.1 is
not a textbook transformer, and each difference changes the numbers:
- its layer norm is RMSNorm: a learned scale, no mean subtraction and no bias (no Linear has a bias either);
- the feed-forward is gated: gelu_tanh(x Wi0) * (x Wi1), then Wo ("gated-gelu"; the tanh GELU is "gelu_new");
- positions enter as a learned bias on the attention logits, one per head and relative-distance bucket (exact up
  to 8 tokens apart, log-spaced up to 128, the same beyond); block 0 holds the table and every block reuses it;
- attention logits are not scaled by 1/sqrt(d) (the scale is folded into the initialization).

Modules are named after transformers' T5EncoderModel (shared, encoder.block.N.layer.0.SelfAttention.q, ...,
encoder.block.N.layer.1.DenseReluDense.wi_0, encoder.final_layer_norm), so its folders and ComfyUI's single
t5xxl_*.safetensors files load key for key.
"""
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from weights import Checkpoint, CheckpointError, find_weights, load_module, read_config, special_tokens

MAX_LENGTH = 256  # SD3's and FLUX.1-schnell's max_sequence_length (FLUX.1-dev uses 512)
# T5-v1.1-XXL's encoder, as its transformers config.json names the fields.
XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
           relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
           feed_forward_proj="gated-gelu")
REL = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"  # the key only a T5 encoder has


# ----------------------------------------------------------------------------------------------------
# Tokenizer


class Tokenizer:
    """T5's SentencePiece Unigram tokenizer, from a folder's tokenizer.json, as transformers' T5Tokenizer uses it.

    transformers 5 keeps the file's vocabulary and normalizer but sets T5's own pre-tokenizer (split on whitespace,
    then mark each word start with "▁") and appends </s>, whatever the file says; so does this. Prompts are cut
    to max_length ids (keeping the final </s>) and padded with <pad> to exactly max_length.
    """

    def __init__(self, folder_or_file, max_length=MAX_LENGTH):
        from tokenizers import Tokenizer as Tok
        from tokenizers import pre_tokenizers, processors
        path = os.path.join(folder_or_file, "tokenizer.json") if os.path.isdir(folder_or_file) else folder_or_file
        if not os.path.isfile(path):
            raise CheckpointError(f"{folder_or_file} is not a T5 tokenizer folder (no tokenizer.json)")
        try:
            tok = Tok.from_file(path)
        except Exception as e:  # not JSON, or not a tokenizers serialization
            raise CheckpointError(f"cannot read T5 tokenizer {path}: {(str(e).splitlines() or ['?'])[0]}") from None
        kind = json.loads(tok.to_str())["model"]["type"]
        if kind != "Unigram":  # e.g. a CLIP tokenizer folder (transformers 5 writes tokenizer.json there too)
            raise CheckpointError(f"{path} is not a T5 tokenizer (a {kind} model, T5's is Unigram)")
        special = special_tokens(os.path.dirname(path), dict(eos_token="</s>", pad_token="<pad>"))
        eos, pad = special["eos_token"], special["pad_token"]
        ids = {t: tok.token_to_id(t) for t in (eos, pad)}
        if None in ids.values():
            raise CheckpointError(f"{path}: no {' or '.join(t for t, i in ids.items() if i is None)} in its vocabulary")
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)])
        tok.post_processor = processors.TemplateProcessing(single=f"$A {eos}", pair=f"$A {eos} $B {eos}",
                                                           special_tokens=[(eos, ids[eos])])
        tok.enable_truncation(max_length)  # counts the </s> it appends
        tok.enable_padding(length=max_length, pad_id=ids[pad], pad_token=pad)
        self.tok, self.max_length, self.eos_id, self.pad_id = tok, max_length, ids[eos], ids[pad]

    def __call__(self, prompts):
        """list of str -> LongTensor (B, max_length) of token ids."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return torch.tensor([e.ids for e in self.tok.encode_batch(prompts)], dtype=torch.long)


# ----------------------------------------------------------------------------------------------------
# Encoder


def relative_position_bucket(rel, num_buckets, max_distance):
    """T5's bidirectional buckets for key position - query position: half the buckets for each direction; in each,
    distances below a quarter of num_buckets get their own bucket, longer ones log-spaced buckets up to
    max_distance, and all beyond it the last one. The same float operations as transformers, so ties round alike."""
    half = num_buckets // 2
    bucket = (rel > 0).long() * half  # keys after the query use the upper half
    rel = rel.abs()
    exact = half // 2
    far = exact + (torch.log(rel.float() / exact) / math.log(max_distance / exact) * (half - exact)).long()
    far = far.clamp(max=half - 1)
    return bucket + torch.where(rel < exact, rel, far)


class RMSNorm(nn.Module):
    """T5's layer norm: x / rms(x) times a learned scale, with the mean square taken in fp32 in any dtype."""

    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)  # fp32
        return self.weight * x.to(self.weight.dtype)


class Attention(nn.Module):
    def __init__(self, cfg, has_bias_table):
        super().__init__()
        d, inner, self.heads = cfg["d_model"], cfg["num_heads"] * cfg["d_kv"], cfg["num_heads"]
        self.q, self.k, self.v = (nn.Linear(d, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, d, bias=False)
        if has_bias_table:
            self.relative_attention_bias = nn.Embedding(cfg["relative_attention_num_buckets"], cfg["num_heads"])

    def forward(self, x, bias):  # x (B, L, D), bias (1, H, L, L)
        B, L, _ = x.shape
        q, k, v = (p(x).view(B, L, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))  # (B, H, L, Dk)
        # Plain PyTorch attention (as transformers' sdpa path): kernels.attention takes no additive bias, and T5
        # does not scale the logits.
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # (B, H, L, Dk)
        return self.o(o.transpose(1, 2).reshape(B, L, -1))


def gelu_new(x):
    """GELU's tanh approximation written out as transformers' "gelu_new" is (F.gelu(approximate="tanh") rounds
    differently in bf16 / fp16): the same operations give the same bits in every dtype."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class GatedGelu(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, d_ff = cfg["d_model"], cfg["d_ff"]
        self.wi_0, self.wi_1 = nn.Linear(d, d_ff, bias=False), nn.Linear(d, d_ff, bias=False)
        self.wo = nn.Linear(d_ff, d, bias=False)

    def forward(self, x):  # (B, L, D)
        h = gelu_new(self.wi_0(x)) * self.wi_1(x)  # (B, L, F)
        return self.wo(h.to(self.wo.weight.dtype))  # an fp16 model keeps wo in fp32 (see load)


def clamp_fp16(x):
    """transformers' guard for fp16 (T5's activations outgrow it): infinities become the largest finite half."""
    if x.dtype != torch.float16:
        return x
    big = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), big - 1000, big)
    return torch.clamp(x, min=-limit, max=limit)


class SelfAttentionLayer(nn.Module):
    def __init__(self, cfg, has_bias_table):
        super().__init__()
        self.SelfAttention = Attention(cfg, has_bias_table)
        self.layer_norm = RMSNorm(cfg["d_model"], cfg["layer_norm_epsilon"])

    def forward(self, x, bias):
        return clamp_fp16(x + self.SelfAttention(self.layer_norm(x), bias))


class FeedForwardLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.DenseReluDense = GatedGelu(cfg)
        self.layer_norm = RMSNorm(cfg["d_model"], cfg["layer_norm_epsilon"])

    def forward(self, x):
        return clamp_fp16(x + self.DenseReluDense(self.layer_norm(x)))


class Block(nn.Module):
    """Pre-norm residual block: self-attention (layer.0), then the gated feed-forward (layer.1)."""

    def __init__(self, cfg, has_bias_table):
        super().__init__()
        self.layer = nn.ModuleList([SelfAttentionLayer(cfg, has_bias_table), FeedForwardLayer(cfg)])

    def forward(self, x, bias):
        return self.layer[1](self.layer[0](x, bias))


class T5Encoder(nn.Module):
    """T5 v1.1's encoder from a transformers T5 config.json dict (fields it lacks: XXL's; other keys ignored)."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg = {**XXL, **{k: v for k, v in cfg.items() if k in XXL}}
        if cfg["feed_forward_proj"] != "gated-gelu":
            raise CheckpointError(f"unsupported T5 feed_forward_proj {cfg['feed_forward_proj']!r} (T5 v1.1's "
                                  "encoder, as SD3 and FLUX ship it, is 'gated-gelu')")
        self.shared = nn.Embedding(cfg["vocab_size"], cfg["d_model"])
        self.encoder = nn.Module()
        self.encoder.block = nn.ModuleList([Block(cfg, i == 0) for i in range(cfg["num_layers"])])
        self.encoder.final_layer_norm = RMSNorm(cfg["d_model"], cfg["layer_norm_epsilon"])

    def position_bias(self, L, device):
        """(1, H, L, L) additive attention bias from block 0's table, which every block uses."""
        pos = torch.arange(L, device=device)
        rel = pos[None, :] - pos[:, None]  # (L, L) key position - query position
        buckets = relative_position_bucket(rel, self.config["relative_attention_num_buckets"],
                                           self.config["relative_attention_max_distance"])
        table = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
        return table(buckets).permute(2, 0, 1)[None].contiguous()  # SDPA's fused kernels want a dense mask

    def forward(self, ids):
        """ids (B, L) -> last hidden state (B, L, d_model), final-normed (= T5EncoderModel(ids).last_hidden_state)."""
        ids = ids.to(self.shared.weight.device)
        x = self.shared(ids)  # (B, L, D)
        bias = self.position_bias(ids.shape[1], ids.device)  # (1, H, L, L)
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)


# ----------------------------------------------------------------------------------------------------
# Checkpoints


def _single_file_config(ckpt, prefix, path):
    """XXL's config with the sizes a single file's tensors show (layers, width, heads, ...): it holds no config."""
    emb = next((prefix + k for k in ("shared.weight", "encoder.embed_tokens.weight") if prefix + k in ckpt), None)
    block = prefix + "encoder.block.0.layer."
    q, wi = block + "0.SelfAttention.q.weight", block + "1.DenseReluDense.wi_0.weight"
    missing = [k for k in (q, wi) if k not in ckpt] + ([] if emb else [prefix + "shared.weight"])
    if missing:
        raise CheckpointError(f"{path}: T5 encoder keys missing: {', '.join(missing)}")
    start = prefix + "encoder.block."
    blocks = {int(k[len(start):].split(".")[0]) for k in ckpt.keys() if k.startswith(start)}
    buckets, heads = ckpt.shape(prefix + REL)
    vocab, d = ckpt.shape(emb)
    return dict(XXL, vocab_size=vocab, d_model=d, num_layers=max(blocks) + 1, num_heads=heads,
                d_kv=ckpt.shape(q)[0] // heads, d_ff=ckpt.shape(wi)[0], relative_attention_num_buckets=buckets)


def _sources(ckpt, prefix):
    """Our name -> a thunk reading its tensor. The decoder and lm_head of a whole T5 are skipped; the embedding may
    be stored as shared.weight, as encoder.embed_tokens.weight (its tied copy), or as both."""
    sources = {}
    for k in ckpt.keys():
        if not k.startswith(prefix) or k[len(prefix):].startswith(("decoder.", "lm_head.")):
            continue
        name = k[len(prefix):]
        if name == "encoder.embed_tokens.weight":
            if prefix + "shared.weight" in ckpt:
                continue
            name = "shared.weight"
        sources[name] = lambda k=k: ckpt[k]
    return sources


def in_file(ckpt) -> bool:
    """Whether a single file (weights.Checkpoint) holds a T5 encoder, under whatever prefix."""
    return any(k.endswith(REL) for k in ckpt.keys())


def load(path, device="cpu", dtype=torch.float32, quantize=None):
    """T5 encoder from a transformers folder (config.json + model*.safetensors, sharded or not) or one .safetensors
    file in transformers' key names (ComfyUI's t5xxl_fp16.safetensors; keys may sit under a prefix such as
    text_encoders.t5xxl.transformer.). Built on the meta device, read one tensor at a time straight into dtype;
    in fp16 each DenseReluDense.wo stays fp32, as transformers keeps it (_keep_in_fp32_modules, fp16 only).
    quantize: its Linear layers in that format (weights.load_module)."""
    if not os.path.exists(path):
        raise CheckpointError(f"T5 encoder path does not exist: {path}")
    if os.path.isdir(path):
        cfg = read_config(path)
        if cfg.get("model_type", "t5") != "t5":
            raise CheckpointError(f"{path} is not a T5 encoder folder (config.json model_type "
                                  f"{cfg.get('model_type')!r})")
        ckpt, prefix = Checkpoint(find_weights(path, stem="model")), ""
    else:
        ckpt = Checkpoint(path)
        prefixes = sorted(k[:-len(REL)] for k in ckpt.keys() if k.endswith(REL))
        if len(prefixes) != 1:
            raise CheckpointError(f"{path}: not a T5 encoder file ({len(prefixes)} keys ending in {REL})")
        prefix = prefixes[0]
        cfg = _single_file_config(ckpt, prefix, path)
    with torch.device("meta"):
        model = T5Encoder(cfg)
    dtypes = {name: torch.float32 if dtype == torch.float16 and name.endswith(".wo.weight") else dtype
              for name in model.state_dict()}
    return load_module(model, _sources(ckpt, prefix), dtypes, device, f"T5 encoder ({path})", quantize).eval()
