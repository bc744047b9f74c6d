"""clip.py against transformers' CLIPTokenizer / CLIPTextModel(WithProjection) and diffusers' encode_prompt on
the same (tiny, random) weights, and its single-file layout against diffusers' own converters."""
import json
import os
import random
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import clip
import families
import t5
import vae
from weights import CheckpointError

PROMPTS = ["a photo of a cat", "hello!!! ... world??", "café naïve Ünïcödé", "東京の猫 and 中文", "🐱🚀 emoji 👍🏽!",
           "", "   lots \t of\n\n  whitespace   ", "A PhOtO oF ThE CaT", " ".join(["astronaut riding a horse"] * 50),
           "it's a dog's life, isn't it? we'll see", "<|endoftext|> special <|startoftext|>", "x!y, 3.14159 #tag @you"]


def _reference_encoders(root):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection
    refs = [CLIPTextModel.from_pretrained(os.path.join(root, "text_encoder")).eval()]
    if os.path.isdir(os.path.join(root, "text_encoder_2")):
        refs.append(CLIPTextModelWithProjection.from_pretrained(os.path.join(root, "text_encoder_2")).eval())
    return refs


def _prefixed(state):
    """transformers >= 5.6 names CLIPTextModel's weights without 'text_model.'; checkpoints (and we) keep it."""
    return {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v for k, v in state.items()}


def _close(a, b, tol=1e-4):
    assert a.shape == b.shape and a.dtype == b.dtype
    assert (a - b).abs().max().item() <= tol * max(b.abs().max().item(), 1.0)


def _read(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


# ----------------------------------------------------------------------------------------------------
# Tokenizer


@pytest.mark.parametrize("sub,pad", [("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")])
def test_tokenizer_matches_hf(sub, pad, sdxl_dir, tmp_path):
    from transformers import CLIPTokenizer
    folder = os.path.join(sdxl_dir, sub)
    bare = tmp_path / sub  # as a hub snapshot: no tokenizer.json
    shutil.copytree(folder, bare)
    os.remove(bare / "tokenizer.json")
    fast = tmp_path / (sub + "_json")  # as transformers 5 saves it: tokenizer.json (+ its config) alone
    CLIPTokenizer.from_pretrained(folder).save_pretrained(fast)
    assert not (fast / "vocab.json").exists() and not (fast / "merges.txt").exists()
    for f in (folder, str(bare), str(fast)):
        ref = CLIPTokenizer.from_pretrained(f)
        expected = torch.tensor(ref(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids)
        ours = clip.Tokenizer(f)
        ids = ours(PROMPTS)
        assert ids.dtype == torch.long and ids.shape == (len(PROMPTS), 77)
        assert torch.equal(ids, expected)
        assert ours.pad_token == pad and ours.pad_id == ref.pad_token_id
    eos = ours.eos_id
    assert ids[5, :2].tolist() == [ref.bos_token_id, eos] and (ids[5, 2:] == ref.pad_token_id).all()  # ""
    assert ids[8, -1] == eos and (ids[8, :-1] != ref.pad_token_id).all()  # over-long: cut to 77, end token kept
    assert torch.equal(ours("a photo of a cat"), ids[:1])
    # Random strings over a nasty alphabet (contractions, special-token text, combining marks, odd spaces).
    rng = random.Random(0)
    alphabet = list("abcXYZ '’!?.,;:-_()[]<>|/\\\"#$%&*+=~`0123456789\t\n\u00a0\u3000éÉñßü東京猫🐱👍🏽\u0301\u200b") + \
        ["<|endoftext|>", "<|startoftext|>", "'s", "'LL", "</w>", "cat", "photo"]
    fuzz = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(300)]
    want = ref(fuzz, padding="max_length", max_length=77, truncation=True).input_ids
    assert torch.equal(ours(fuzz), torch.tensor(want))


# ----------------------------------------------------------------------------------------------------
# Encoders


@pytest.mark.parametrize("which", ["sdxl", "sd15"])
def test_encoders_match_transformers(which, sdxl_dir, sd15_dir):
    root = sdxl_dir if which == "sdxl" else sd15_dir
    te = clip.load(root)
    refs = _reference_encoders(root)
    assert te.family.name == which and len(te.encoders) == len(refs)
    assert clip.load(os.path.join(root, "text_encoder")).family is te.family  # the text_encoder/ folder: its root
    for enc, ref, ids in zip(te.encoders, refs, te.tokenize(PROMPTS)):
        with torch.no_grad():
            out = enc(ids)
            r = ref(ids, output_hidden_states=True)
            text_model = getattr(ref, "text_model", ref)
            _close(out["last"], r.last_hidden_state)
            _close(out["penultimate"], r.hidden_states[-2])
            _close(out["pooled"], text_model(ids).pooler_output)
            if hasattr(ref, "text_projection"):
                _close(out["projected"], r.text_embeds)
            else:
                assert out["projected"] is None


@pytest.mark.parametrize("eos", [2, 500])
def test_eos_pooling_rules(eos, sd15_dir, tmp_path):
    """transformers' two pooling rules: configs with eos_token_id=2 (the real SD ones, from before its fix)
    pool at the largest id; others at the first eos_token_id. A token `eos` at position 3 tells them apart."""
    from transformers import CLIPTextModel
    root = tmp_path / "eos"
    shutil.copytree(sd15_dir, root)
    cfg = json.loads((root / "text_encoder" / "config.json").read_text())
    (root / "text_encoder" / "config.json").write_text(json.dumps({**cfg, "eos_token_id": eos}))
    te = clip.load(str(root))
    ref = CLIPTextModel.from_pretrained(str(root / "text_encoder")).eval()
    ids = te.tokenize(PROMPTS)[0]
    ids[:, 3] = eos
    with torch.no_grad():
        pooled, last = (te.encoders[0](ids)[k] for k in ("pooled", "last"))
        _close(pooled, ref(ids).pooler_output)
        assert torch.equal(pooled[0], last[0, 3]) == (eos == 500)


@pytest.mark.parametrize("which", ["sdxl", "sd15"])
def test_encode_matches_pipeline(which, sdxl_dir, sd15_dir, monkeypatch):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    root = sdxl_dir if which == "sdxl" else sd15_dir
    te = clip.load(root)
    with torch.no_grad():
        context, pooled = te.encode(PROMPTS)
        if which == "sdxl":
            pipe = StableDiffusionXLPipeline.from_pretrained(root)
            ref_context, _, ref_pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                               do_classifier_free_guidance=False)
            assert context.shape == (len(PROMPTS), 77, 64) and pooled.shape == (len(PROMPTS), 32)
            _close(pooled, ref_pooled)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(root, safety_checker=None, requires_safety_checker=False)
            ref_context, _ = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                do_classifier_free_guidance=False)
            assert pooled is None
        _close(context, ref_context)
        again, _ = te.encode(ids=te.tokenize(PROMPTS))  # pre-tokenized (cached) ids give the same
        assert torch.equal(again, context)
        monkeypatch.setenv("DPO_KERNELS", "triton")  # causal attention through the Triton kernel (interpreted on CPU)
        _close(te.encode(PROMPTS[:2])[0], context[:2])


def test_dtypes(sdxl_dir):
    te = clip.load(sdxl_dir, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in te.parameters())
    with torch.no_grad():
        context, pooled = te.encode(PROMPTS[:2])
        ref_context, ref_pooled = clip.load(sdxl_dir).encode(PROMPTS[:2])
    assert context.dtype == pooled.dtype == torch.bfloat16
    assert (context.float() - ref_context).abs().max() < 0.05 * ref_context.abs().max()


# ----------------------------------------------------------------------------------------------------
# Single files


@pytest.mark.parametrize("which", ["sdxl", "sd15"])
def test_single_file_round_trip(which, sdxl_dir, sd15_dir, tmp_path):
    """Our single-file layout is what diffusers' converters read back to the transformers weights; a whole
    checkpoint (text encoders + VAE, with the extra keys real files hold) loads with a tokenizer folder."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    root = sdxl_dir if which == "sdxl" else sd15_dir
    te, refs = clip.load(root), _reference_encoders(root)
    path = str(tmp_path / "text.safetensors")
    clip.save(te, path)
    ckpt, meta = _read(path)
    l_prefix = "conditioner.embedders.0.transformer." if which == "sdxl" else "cond_stage_model.transformer."
    assert all(k.startswith(l_prefix) or k.startswith("conditioner.embedders.1.model.") for k in ckpt)
    converted = convert_ldm_clip_checkpoint(ckpt)
    expected = _prefixed(refs[0].state_dict())
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[k], t) for k, t in expected.items())
    if which == "sdxl":
        g = "conditioner.embedders.1.model."
        assert ckpt[g + "transformer.resblocks.0.attn.in_proj_weight"].shape == (96, 32)  # fused q, k, v
        converted = convert_open_clip_checkpoint(refs[1], ckpt, prefix=g)
        expected = refs[1].state_dict()
        assert converted.keys() == expected.keys()
        assert all(torch.equal(converted[k], t) for k, t in expected.items())

    # A whole checkpoint: VAE too, plus keys that real files hold and nobody reads.
    vae.save(vae.load(root), str(tmp_path / "vae.safetensors"), layout="single")
    vae_ckpt, vae_meta = _read(str(tmp_path / "vae.safetensors"))
    extra = {l_prefix + "text_model.embeddings.position_ids": torch.arange(77)[None]}
    if which == "sdxl":
        extra["conditioner.embedders.1.model.logit_scale"] = torch.tensor(4.6)
    whole = str(tmp_path / "whole.safetensors")
    save_file({**ckpt, **vae_ckpt, **extra}, whole, metadata={**meta, **vae_meta})
    te2 = clip.load(whole, tokenizer=root)
    assert te2.family.name == which
    with torch.no_grad():
        c1, p1 = te.encode(PROMPTS)
        c2, p2 = te2.encode(PROMPTS)
    assert torch.equal(c1, c2) and (p1 is None if which == "sd15" else torch.equal(p1, p2))
    if which == "sd15":  # SD1.5: the tokenizer folder itself works too
        assert torch.equal(clip.load(whole, tokenizer=os.path.join(root, "tokenizer")).encode(PROMPTS[:1])[0], c1[:1])


def test_full_size_matches_transformers():
    """The real CLIP-L and OpenCLIP-bigG: parameter counts and key sets equal to transformers' on meta."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    with torch.device("meta"):
        ours = [clip.TextTransformer(families.CLIP_L), clip.TextTransformer(families.BIG_G, projection=True)]
        refs = [CLIPTextModel(CLIPTextConfig(**families.CLIP_L)),
                CLIPTextModelWithProjection(CLIPTextConfig(**families.BIG_G))]
    for o, r, n in zip(ours, refs, (123_060_480, 694_659_840)):
        assert sum(p.numel() for p in o.parameters()) == sum(p.numel() for p in r.parameters()) == n
        assert {k: tuple(t.shape) for k, t in o.state_dict().items()} == \
               {k: tuple(t.shape) for k, t in _prefixed(r.state_dict()).items()}
    assert refs[0].config.hidden_act == "quick_gelu" and refs[1].config.hidden_act == "gelu"


def test_bad_input(sdxl_dir, tmp_path):
    te = clip.load(sdxl_dir)
    good = str(tmp_path / "good.safetensors")
    clip.save(te, good)
    # without a tokenizer folder, clip_bpe/'s vocabulary serves full-size CLIPs only: the tiny one is refused
    with pytest.raises(CheckpointError, match="holds no tokenizer and its vocabulary .585 tokens. is not CLIP's: pass "
                                              "tokenizer=FOLDER .*tokenizer/ and tokenizer_2"):
        clip.load(good)
    with pytest.raises(CheckpointError, match="no tokenizer in .*pass tokenizer=FOLDER"):
        clip.load(good, tokenizer=os.path.join(sdxl_dir, "tokenizer"))  # SDXL needs both tokenizers

    with open(good, "rb") as f:
        data = f.read()
    truncated = str(tmp_path / "truncated.safetensors")
    with open(truncated, "wb") as f:
        f.write(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        clip.load(truncated, tokenizer=sdxl_dir)

    ckpt, meta = _read(good)
    gone = "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"
    save_file({k: t for k, t in ckpt.items() if k != gone}, str(tmp_path / "m1.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=f"text encoder keys missing: {gone}"):
        clip.load(str(tmp_path / "m1.safetensors"), tokenizer=sdxl_dir)
    gone = "conditioner.embedders.0.transformer.text_model.final_layer_norm.bias"
    save_file({k: t for k, t in ckpt.items() if k != gone}, str(tmp_path / "m2.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=r"missing keys: text_model\.final_layer_norm\.bias"):
        clip.load(str(tmp_path / "m2.safetensors"), tokenizer=sdxl_dir)
    # Without its stored configs, a tiny file is read as full size (12 layers), which it does not fit.
    save_file(ckpt, str(tmp_path / "no_meta.safetensors"))
    missing = r"does not match the model; missing keys: text_model\.encoder\.layers\.(3|10)\."
    with pytest.raises(CheckpointError, match=missing):
        clip.load(str(tmp_path / "no_meta.safetensors"), tokenizer=sdxl_dir)

    vae_file = os.path.join(sdxl_dir, "vae", "diffusion_pytorch_model.safetensors")  # wrong kind of file
    with pytest.raises(CheckpointError, match="holds no SD1.5, SDXL or SD3 text encoder"):
        clip.load(vae_file, tokenizer=sdxl_dir)
    with pytest.raises(CheckpointError, match="does not exist"):
        clip.load(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="neither a diffusers model folder"):
        clip.load(str(tmp_path))
    with pytest.raises(CheckpointError, match="not a CLIP tokenizer folder"):
        clip.Tokenizer(str(tmp_path))
    with pytest.raises(ValueError, match="layout"):
        clip.save(te, str(tmp_path / "x.safetensors"), layout="diffusers")


# ----------------------------------------------------------------------------------------------------
# SD3 and FLUX: CLIP + T5, as their pipelines' encode_prompt


def test_sd3_text_side_is_the_pipelines(sd3_dir):
    from diffusers import StableDiffusion3Pipeline
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir)
    want, _, want_pooled, _ = pipe.encode_prompt(PROMPTS, None, None, device="cpu", do_classifier_free_guidance=False)
    te = clip.load(sd3_dir)
    assert te.family.name == "sd3" and [t.max_length for t in te.tokenizers] == [77, 77, 256]
    with torch.no_grad():
        context, pooled = te.encode(PROMPTS)
    assert context.shape == (len(PROMPTS), 77 + 256, 80) and pooled.shape == (len(PROMPTS), 64)
    _close(context, want)
    _close(pooled, want_pooled)
    assert (context[:, :77, 64:] == 0).all() and context[:, 77:].abs().sum() > 0  # CLIP zero-padded to T5's width


@pytest.mark.parametrize("guidance", [True, False])
def test_flux_text_side_is_the_pipelines(guidance, flux_dir, tmp_path):
    from diffusers import FluxPipeline
    root = flux_dir
    if not guidance:  # schnell: no guidance embedding, and 256 T5 tokens
        root = str(tmp_path / "schnell")
        shutil.copytree(flux_dir, root)
        cfg = json.load(open(os.path.join(root, "transformer", "config.json")))
        json.dump(dict(cfg, guidance_embeds=False), open(os.path.join(root, "transformer", "config.json"), "w"))
    length = 512 if guidance else 256
    pipe = FluxPipeline.from_pretrained(flux_dir)
    want, want_pooled, _ = pipe.encode_prompt(PROMPTS, None, device="cpu", max_sequence_length=length)
    te = clip.load(root)
    assert te.family.name == "flux" and [t.max_length for t in te.tokenizers] == [77, length]
    with torch.no_grad():
        context, pooled = te.encode(PROMPTS)
    assert context.shape == (len(PROMPTS), length, 80) and pooled.shape == (len(PROMPTS), 32)
    _close(context, want)
    _close(pooled, want_pooled)


def _state(folder):
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _config(root, sub):
    with open(os.path.join(root, sub, "config.json")) as f:
        return f.read()


def test_sd35_single_file_and_flux_split_files(sd3_dir, flux_dir, tmp_path):
    """SD3.5's single file holds text_encoders.clip_l / clip_g / t5xxl.transformer.* (transformers' names);
    FLUX's are split: clip_l.safetensors and t5xxl_fp16.safetensors. Tokenizers from the model folders."""
    parts = {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5xxl": "text_encoder_3"}
    whole = {}
    for name, sub in parts.items():
        state = _state(os.path.join(sd3_dir, sub))
        whole.update({f"text_encoders.{name}.transformer.{k}": t for k, t in state.items()})
    whole["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"] = torch.zeros(3, 1)
    path = str(tmp_path / "sd3.5_medium.safetensors")
    meta = {"text_encoder_config": _config(sd3_dir, "text_encoder"),  # tiny sizes (real files: full size)
            "text_encoder_2_config": _config(sd3_dir, "text_encoder_2")}
    save_file(whole, path, metadata=meta)
    with torch.no_grad():
        want = clip.load(sd3_dir).encode(PROMPTS[:3])
        got = clip.load(path, tokenizer=sd3_dir).encode(PROMPTS[:3])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(CheckpointError, match="holds no tokenizer and its vocabulary .* is not CLIP's"):
        clip.load(path)  # the tiny CLIPs' vocabulary is not the shipped one
    # Without T5 (as diffusers allows): zeros in its place; without CLIP-L's projection: an identity.
    dropped = ("text_encoders.t5xxl", "text_encoders.clip_l.transformer.text_projection")
    no_t5 = {k: t for k, t in whole.items() if not k.startswith(dropped)}
    save_file(no_t5, path, metadata=meta)
    with torch.no_grad():
        context, pooled = clip.load(path, tokenizer=sd3_dir).encode(PROMPTS[:3])
        clip_l = clip.load(sd3_dir).encoders[0](clip.load(sd3_dir).tokenizers[0](PROMPTS[:3]))["pooled"]
    assert context.shape == (3, 77 + 256, t5.XXL["d_model"]) and (context[:, 77:] == 0).all()
    _close(context[:, :77, :64], want[0][:, :77, :64])
    _close(pooled[:, :32], clip_l)

    clip_file, t5_file = str(tmp_path / "clip_l.safetensors"), str(tmp_path / "t5xxl_fp16.safetensors")
    save_file(_state(os.path.join(flux_dir, "text_encoder")), clip_file,
              metadata={"text_encoder_config": _config(flux_dir, "text_encoder")})
    save_file(_state(os.path.join(flux_dir, "text_encoder_2")), t5_file)
    with torch.no_grad():
        want = clip.load(flux_dir).encode(PROMPTS[:3])
        got = clip.load(clip_file, t5_file=t5_file, tokenizer=flux_dir).encode(PROMPTS[:3])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(CheckpointError, match="a CLIP-L file alone .*pass t5_file=FILE"):
        clip.load(clip_file, tokenizer=flux_dir)
    with pytest.raises(CheckpointError, match="is not a T5 tokenizer .a BPE model") as e:  # CLIP's tokenizer folder
        clip.load(clip_file, t5_file=t5_file, tokenizer=os.path.join(flux_dir, "tokenizer"))
    assert "\n" not in str(e.value)


def test_shipped_vocabulary():
    """clip_bpe/ is CLIP's vocabulary: known ids of OpenAI's tokenizer, and transformers' CLIPTokenizer on it."""
    from transformers import CLIPTokenizer
    tok = clip.Tokenizer()
    ids = tok(["a photo of a cat", "a photo of a dog"])
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407] and ids[1, 5].item() == 1929
    assert (ids[0, 7:] == 49407).all() and (clip.Tokenizer(pad_token="!")(["a cat"])[0, 4:] == 0).all()
    bang = [clip.Tokenizer(pad_token="!")(["wow!!"])[0, :4], clip.Tokenizer(pad_id=0)(["wow!!"])[0, :4]]
    assert bang[0][2:].tolist() == [0, 0] and bang[1].tolist() != bang[0].tolist()  # "!" special (id 0) or BPE'd
    ref = CLIPTokenizer(os.path.join(clip.VOCAB, "vocab.json"), os.path.join(clip.VOCAB, "merges.txt"))
    assert len(ref) == clip.CLIP_VOCAB_SIZE
    want = ref(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
    assert tok(PROMPTS).tolist() == want


@pytest.mark.parametrize("which", ["sdxl", "sd3", "flux"])
def test_pipeline_saved_by_transformers_5_loads(which, sdxl_dir, sd3_dir, flux_dir, tmp_path):
    """A model folder that diffusers' current pipeline saved (its CLIP tokenizers as tokenizer.json alone) gives the
    same text embeddings and samples as the folder it came from."""
    from diffusers import DiffusionPipeline
    src = {"sdxl": sdxl_dir, "sd3": sd3_dir, "flux": flux_dir}[which]
    out = str(tmp_path / which)
    DiffusionPipeline.from_pretrained(src).save_pretrained(out)
    toks = [d for d in os.listdir(out) if d.startswith("tokenizer")]
    assert toks and not any(os.path.exists(os.path.join(out, d, "vocab.json")) for d in toks)
    prompts = ["a photo of a cat", "", "a red cube on a blue sphere"]
    with torch.no_grad():
        for a, b in zip(clip.load(src).encode(prompts), clip.load(out).encode(prompts)):
            assert torch.equal(a, b)
    import sample
    x = [sample.load(p)(prompts[:1], steps=2, height=32, width=32, seed=0) for p in (src, out)]
    assert torch.equal(x[0], x[1])
