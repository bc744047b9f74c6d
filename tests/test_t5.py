"""t5.py against transformers' T5EncoderModel and T5TokenizerFast on the same (tiny, random) weights and vocabulary,
in every layout SD3 and FLUX.1 checkpoints come in: a transformers folder (plain or sharded) and single files."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

import t5
from tiny import read_tensors, rel_error, write_t5_tokenizer
from weights import CheckpointError

# T5 v1.1's structure at toy width; the real bucket count and max distance, so inputs of 150 tokens reach the
# log-spaced buckets and the shared one beyond 128 (and single files, which hold no config, get them right).
TINY = dict(vocab_size=100, d_model=32, d_kv=8, d_ff=40, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
            relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6)
L = 150


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    """A transformers T5EncoderModel folder with random weights (every one off its init), the model, and ids."""
    from transformers import T5Config, T5EncoderModel
    folder = str(tmp_path_factory.mktemp("t5"))
    torch.manual_seed(0)
    model = T5EncoderModel(T5Config(**TINY, dropout_rate=0.0)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    model.save_pretrained(folder)
    ids = torch.randint(0, TINY["vocab_size"], (2, L), generator=g)
    with torch.no_grad():
        truth = model(ids).last_hidden_state
    return folder, model, ids, truth


# ----------------------------------------------------------------------------------------------------
# Encoder


@pytest.mark.parametrize("buckets,max_distance", [(32, 128), (16, 20)])
def test_position_buckets_match_transformers(buckets, max_distance):
    from transformers.models.t5.modeling_t5 import T5Attention
    rel = torch.arange(-300, 301)
    ours = t5.relative_position_bucket(rel, buckets, max_distance)
    ref = T5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=buckets, max_distance=max_distance)
    assert torch.equal(ours, ref)
    assert len(set(ours.tolist())) == buckets - 1  # all in use but "distance 0, key after query"


def test_matches_transformers_fp32(t5_dir):
    folder, model, ids, truth = t5_dir
    enc = t5.load(folder)
    assert set(enc.state_dict()) == set(model.state_dict()) - {"encoder.embed_tokens.weight"}
    with torch.no_grad():
        out = enc(ids)
    assert out.shape == (2, L, TINY["d_model"]) and out.dtype == torch.float32
    assert rel_error(out, truth) <= 1e-4
    with torch.no_grad():  # the position bias matters: without it (all zeros) the output differs
        table = enc.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
        table.zero_()
        assert rel_error(enc(ids), truth) > 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_as_transformers(dtype, t5_dir):
    """Loaded in bf16 / fp16 as transformers loads it (fp16 keeps each wo in fp32, bf16 does not) and computed with
    the same operations: the same bits as transformers' result in that dtype, close to the fp32 truth."""
    from transformers import T5EncoderModel
    folder, _, ids, truth = t5_dir
    ref = T5EncoderModel.from_pretrained(folder, dtype=dtype).eval()
    enc = t5.load(folder, dtype=dtype)
    ref_dtypes = {k: v.dtype for k, v in ref.state_dict().items() if k != "encoder.embed_tokens.weight"}
    assert {k: v.dtype for k, v in enc.state_dict().items()} == ref_dtypes
    assert (enc.encoder.block[1].layer[1].DenseReluDense.wo.weight.dtype == torch.float32) == (dtype == torch.float16)
    with torch.no_grad():
        out, ref_out = enc(ids), ref(ids).last_hidden_state
    assert out.dtype == ref_out.dtype == dtype
    assert torch.equal(out, ref_out)
    assert 0 < rel_error(out, truth) < 0.1


def test_clamps_fp16_infinities():
    x = torch.tensor([1.0, float("inf"), -float("inf")], dtype=torch.float16)
    near = torch.tensor(torch.finfo(torch.float16).max - 1000, dtype=torch.float16).item()  # as fp16 rounds it
    assert t5.clamp_fp16(x).tolist() == [1.0, near, -near]
    assert torch.isinf(t5.clamp_fp16(x.float())).sum() == 2  # only fp16 is clamped


def test_xxl_parameter_count_on_meta():
    from transformers import T5Config, T5EncoderModel
    with torch.device("meta"):
        ours = t5.T5Encoder(dict(t5.XXL, model_type="t5", dropout_rate=0.1))  # unknown keys are ignored
        ref = T5EncoderModel(T5Config(**t5.XXL))
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for name, p in ref.named_parameters() if name != "encoder.embed_tokens.weight")
    assert all(p.is_meta for p in ours.parameters()) and n > 4_700_000_000
    assert set(ours.state_dict()) == set(ref.state_dict()) - {"encoder.embed_tokens.weight"}


# ----------------------------------------------------------------------------------------------------
# Layouts


@pytest.mark.parametrize("variant", ["as_saved", "embed_tokens", "both", "prefixed", "whole_t5", "fp16"])
def test_single_file_layouts(variant, t5_dir, tmp_path):
    """ComfyUI-style single files (transformers key names, no config): the embedding as shared.weight, as
    encoder.embed_tokens.weight, or both; under a checkpoint's prefix beside other models; a whole T5 (decoder and
    lm_head ignored); stored in fp16 and loaded in fp32."""
    folder, _, ids, _ = t5_dir
    state = read_tensors(os.path.join(folder, "model.safetensors"))
    emb = state.pop("shared.weight", None)
    emb = state.pop("encoder.embed_tokens.weight") if emb is None else emb
    if variant in ("as_saved", "prefixed", "whole_t5", "fp16"):
        state["shared.weight"] = emb
    if variant in ("embed_tokens", "both"):
        state["encoder.embed_tokens.weight"] = emb
    if variant == "both":
        state["shared.weight"] = emb.clone()
    if variant == "prefixed":
        state = {"text_encoders.t5xxl.transformer." + k: v for k, v in state.items()}
        state["model.diffusion_model.x_embedder.proj.weight"] = torch.zeros(3)
    if variant == "whole_t5":
        state["decoder.block.0.layer.0.SelfAttention.q.weight"] = torch.zeros(3)
        state["decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = torch.zeros(32, 4)
        state["lm_head.weight"] = torch.zeros(3)
    if variant == "fp16":
        state = {k: v.half() for k, v in state.items()}
    path = str(tmp_path / "t5xxl.safetensors")
    save_file(state, path)
    enc = t5.load(path)
    assert enc.config == {**t5.XXL, **TINY}  # the sizes read off the tensors
    with torch.no_grad():
        out, want = enc(ids), t5.load(folder)(ids)
    if variant == "fp16":
        assert 0 < rel_error(out, want) < 1e-2
    else:
        assert torch.equal(out, want)


def test_sharded_folder(t5_dir, tmp_path):
    folder, model, ids, _ = t5_dir
    model.save_pretrained(str(tmp_path), max_shard_size="20KB")
    with open(tmp_path / "model.safetensors.index.json") as f:
        assert len(set(json.load(f)["weight_map"].values())) > 1
    with torch.no_grad():
        assert torch.equal(t5.load(str(tmp_path))(ids), t5.load(folder)(ids))


# ----------------------------------------------------------------------------------------------------
# Tokenizer

PROMPTS = ["a photo of the cat", "the dog on the mat", "", "  leading and trailing spaces  ",
           "a   photo\tof\n\nthe cat", "Astronaut riding a horse in space!", "xyz qq: unknown pieces 123",
           " ".join(["a red cat on the mat"] * 60), "catdog redmat", "<pad> </s> <unk> as text"]


@pytest.mark.parametrize("max_length", [t5.MAX_LENGTH, 16])
def test_tokenizer_matches_transformers(max_length, tmp_path):
    from transformers import T5TokenizerFast
    write_t5_tokenizer(str(tmp_path))
    ref = T5TokenizerFast.from_pretrained(str(tmp_path))
    want = ref(PROMPTS, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True).input_ids
    tok = t5.Tokenizer(str(tmp_path), max_length=max_length)
    ids = tok(PROMPTS)
    assert ids.dtype == torch.long and ids.shape == (len(PROMPTS), max_length)
    assert ids.tolist() == want
    assert tok.pad_id == ref.pad_token_id == 0 and tok.eos_id == ref.eos_token_id == 1
    assert ids[2, 0] == 1 and (ids[2, 1:] == 0).all()  # "": just </s>, then padding
    assert ids[7, -1] == 1 and (ids[7] != 0).all()  # over-long: cut, </s> kept at the end
    assert (ids[0] == 1).sum() == 1 and ids[0, -1] == 0  # short: one </s>, padded after it
    assert torch.equal(tok("a photo of the cat"), ids[:1])
    assert torch.equal(t5.Tokenizer(str(tmp_path / "tokenizer.json"), max_length)(PROMPTS), ids)  # the file itself


# ----------------------------------------------------------------------------------------------------
# Bad input


def _one_line_error(call, *names):
    with pytest.raises(CheckpointError) as e:
        call()
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in names), msg
    return msg


def test_bad_input(t5_dir, tmp_path):
    folder, _, _, _ = t5_dir
    empty = str(tmp_path / "no_tokenizer")
    os.makedirs(empty)
    _one_line_error(lambda: t5.Tokenizer(empty), empty, "tokenizer.json")
    _one_line_error(lambda: t5.load(str(tmp_path / "nowhere")), "nowhere")

    data = open(os.path.join(folder, "model.safetensors"), "rb").read()
    cut = str(tmp_path / "truncated.safetensors")
    with open(cut, "wb") as f:
        f.write(data[:len(data) // 2])
    _one_line_error(lambda: t5.load(cut), cut)

    flux = str(tmp_path / "flux.safetensors")  # another model's file
    save_file({"transformer_blocks.0.attn.to_q.weight": torch.zeros(4, 4), "x_embedder.weight": torch.zeros(4)}, flux)
    _one_line_error(lambda: t5.load(flux), flux, "not a T5 encoder")

    extra = str(tmp_path / "extra.safetensors")  # a T5 file with a key the encoder does not have: named
    save_file({**read_tensors(os.path.join(folder, "model.safetensors")),
               "encoder.block.0.layer.2.weight": torch.zeros(3)}, extra)
    _one_line_error(lambda: t5.load(extra), extra, "encoder.block.0.layer.2.weight")

    clip_like = tmp_path / "clip_folder"
    clip_like.mkdir()
    (clip_like / "config.json").write_text(json.dumps({"model_type": "clip_text_model"}))
    _one_line_error(lambda: t5.load(str(clip_like)), str(clip_like), "clip_text_model")
