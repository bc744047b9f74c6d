"""reward.py against transformers' CLIPModel on tiny random weights: PickScore and CLIP score on its own folders,
HPSv2 on the same weights converted to open_clip's layout (by the key correspondence of transformers' own
convert_clip_original_pytorch_to_hf.py, written out below), the aesthetic head against its formula; preprocessing
against torch and PIL; the scorer interface shared with toy.area; --score specs; bad input."""
import inspect
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import clip
import relabel
import reward
import tiny
import toy
from weights import CheckpointError

PROMPTS = ["a red circle", "a photo of a cat", "a blue square", "green dog !!", "", "a cat a cat a cat a cat"]


@pytest.fixture(scope="module", params=list(tiny.CLIP_FLAVOURS))
def clip_model(request, tmp_path_factory):
    return tiny.make_clip(str(tmp_path_factory.mktemp(f"clip_{request.param}")), request.param) + (request.param,)


@pytest.fixture(scope="module")
def images():
    """6 images of one odd size (resized and cropped on the way in)."""
    return torch.rand(len(PROMPTS), 3, 41, 50, generator=torch.Generator().manual_seed(2))


def _reference(model, folder, images, pad_zero=False):
    """transformers' unit-length image and text embeddings, (B, P) each, of our preprocessed pixels."""
    from transformers import CLIPTokenizer
    ids = torch.tensor(CLIPTokenizer.from_pretrained(folder)(PROMPTS, padding="max_length", max_length=77,
                                                             truncation=True).input_ids)
    if pad_zero:  # open_clip's tokenizer pads with 0 after the end token
        eot = (ids == ids.max()).int().argmax(-1, keepdim=True)
        ids = ids.masked_fill(torch.arange(77) > eot, 0)
    pixels = reward.preprocess(images, model.config.vision_config.image_size)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels)
    return out.image_embeds, out.text_embeds


def _close(a, b, tol=1e-5):
    assert a.shape == b.shape and a.dtype == torch.float32
    assert (a - b).abs().max().item() <= tol * max(b.abs().max().item(), 1.0), (a, b)


# ----------------------------------------------------------------------------------------------------
# The four scorers


def test_pickscore_and_clip_score_match_transformers(clip_model, images, one_thread):
    folder, model, _, act = clip_model
    img, txt = _reference(model, folder, images)
    cos = (img * txt).sum(-1)  # (B,)
    pick = reward.load("pickscore", folder)(images, PROMPTS)
    _close(pick, model.logit_scale.exp().detach() * cos)  # PickScore's README: logit_scale.exp() * text @ image.T
    scorer = reward.load("clip", folder)
    _close(scorer(images, PROMPTS), (100 * cos).clamp(min=0))  # torchmetrics' CLIPScore: max(100 * cos, 0)
    scorer.model.visual_projection.weight.neg_()  # cos -> -cos: the other side of the clamp
    _close(scorer(images, PROMPTS), (-100 * cos).clamp(min=0))
    assert (cos != 0).all()
    half = reward.load("pickscore", folder, dtype=torch.bfloat16)(images, PROMPTS)
    assert half.dtype == torch.float32 and (half - pick).abs().max() < 0.05 * pick.abs().max()


def _to_open_clip(hf, layers):
    """transformers' CLIPModel state dict -> open_clip's: convert_clip_original_pytorch_to_hf.py read backwards (q, k,
    v are the thirds of in_proj; projections are transposed; ln_pre is transformers' pre_layrnorm)."""
    sd = {"logit_scale": hf["logit_scale"],
          "token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
          "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
          "text_projection": hf["text_projection.weight"].t(), "visual.proj": hf["visual_projection.weight"].t(),
          "visual.conv1.weight": hf["vision_model.embeddings.patch_embedding.weight"],
          "visual.class_embedding": hf["vision_model.embeddings.class_embedding"],
          "visual.positional_embedding": hf["vision_model.embeddings.position_embedding.weight"]}
    for w in ("weight", "bias"):
        sd[f"ln_final.{w}"] = hf[f"text_model.final_layer_norm.{w}"]
        sd[f"visual.ln_pre.{w}"] = hf[f"vision_model.pre_layrnorm.{w}"]
        sd[f"visual.ln_post.{w}"] = hf[f"vision_model.post_layernorm.{w}"]
        for ours, theirs in (("text_model", "transformer"), ("vision_model", "visual.transformer")):
            for i in range(layers):
                a, b = f"{ours}.encoder.layers.{i}.", f"{theirs}.resblocks.{i}."
                sd[f"{b}attn.in_proj_{w}"] = torch.cat([hf[f"{a}self_attn.{p}_proj.{w}"] for p in "qkv"])
                for x, y in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                             ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                    sd[f"{b}{y}.{w}"] = hf[f"{a}{x}.{w}"]
    assert len(sd) == len(hf) - 2 * layers * 4  # every tensor used (q, k, v: 3 weights + 3 biases -> 2 per layer)
    return {k: v.clone().contiguous() for k, v in sd.items()}


def _open_clip_config(act, n):
    f = tiny.CLIP_FLAVOURS[act]
    return {"embed_dim": 16, "quick_gelu": act == "quick_gelu",
            "vision_cfg": {"image_size": f["image_size"], "layers": 2, "width": 24, "head_width": 8,
                           "patch_size": f["patch_size"]},
            "text_cfg": {"context_length": 77, "vocab_size": n, "width": 32, "heads": 4, "layers": 2}}


@pytest.fixture(scope="module")
def hps_file(clip_model, tmp_path_factory):
    folder, model, n, act = clip_model
    path = str(tmp_path_factory.mktemp("hps") / "HPS_v2_compressed.pt")
    torch.save({"state_dict": _to_open_clip(model.state_dict(), 2), "epoch": 1}, path)
    return path, _open_clip_config(act, n)


def test_hps_matches_hpsv2_formula(clip_model, hps_file, images, one_thread):
    folder, model, _, _ = clip_model
    path, config = hps_file
    img, txt = _reference(model, folder, images, pad_zero=True)
    # hpsv2's img_score.py: open_clip's features (unit length), logits_per_image = image @ text.T, its diagonal
    expected = torch.diagonal(F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T)
    _close(reward.load("hps", path, tokenizer=folder, config=config)(images, PROMPTS), expected)


def test_aesthetic_matches_laion_head(clip_model, images, tmp_path, one_thread):
    folder, model, _, _ = clip_model
    g, dims = torch.Generator().manual_seed(3), (16, 1024, 128, 64, 16, 1)
    head = {}
    for key, i in zip((0, 2, 4, 6, 7), range(5)):  # Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear
        head[f"layers.{key}.weight"] = torch.randn(dims[i + 1], dims[i], generator=g) / dims[i] ** 0.5
        head[f"layers.{key}.bias"] = torch.randn(dims[i + 1], generator=g) * 0.1
    torch.save(head, tmp_path / "head.pth")
    x, _ = _reference(model, folder, images)
    x = x / x.norm(dim=-1, keepdim=True)  # improved-aesthetic-predictor's normalized(): the L2-normalized embedding
    for key in (0, 2, 4, 6, 7):  # no activations in between; dropout is off at inference
        x = x @ head[f"layers.{key}.weight"].T + head[f"layers.{key}.bias"]
    scorer = reward.load("aesthetic", folder, head=str(tmp_path / "head.pth"))
    _close(scorer(images, PROMPTS), x[:, 0])
    _close(scorer(images, None), x[:, 0])  # the prompt plays no part


def test_old_folder_layout(clip_model, images, tmp_path, one_thread):
    """transformers 4.x folders: pytorch_model.bin with position_ids buffers, *_config_dict winning over *_config;
    PickScore_v1 holds no tokenizer (tokenizer= names one)."""
    folder, _, _, _ = clip_model
    want = reward.load("pickscore", folder)(images, PROMPTS)
    old = tmp_path / "old"
    old.mkdir()
    state = load_file(os.path.join(folder, "model.safetensors"))
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    torch.save(state, old / "pytorch_model.bin")
    cfg = json.load(open(os.path.join(folder, "config.json")))
    cfg["text_config_dict"] = {"hidden_act": cfg["text_config"]["hidden_act"]}
    cfg["text_config"]["hidden_act"] = "relu"  # overridden by text_config_dict, as transformers does
    json.dump(cfg, open(old / "config.json", "w"))
    with pytest.raises(CheckpointError, match="pass tokenizer=FOLDER"):
        reward.load("pickscore", str(old))
    assert torch.equal(reward.load("pickscore", str(old), tokenizer=folder)(images, PROMPTS), want)


def test_a_folder_saved_by_transformers_5(clip_model, images, tmp_path, one_thread):
    """A CLIPModel folder whose tokenizer transformers 5 saved (tokenizer.json alone) scores as the original."""
    from transformers import CLIPTokenizer
    folder, _, _, _ = clip_model
    new = tmp_path / "t5"
    shutil.copytree(folder, new)
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):
        if os.path.exists(new / name):
            os.remove(new / name)
    CLIPTokenizer.from_pretrained(folder).save_pretrained(new)
    assert not (new / "vocab.json").exists() and (new / "tokenizer.json").exists()
    assert torch.equal(reward.load("pickscore", str(new))(images, PROMPTS),
                       reward.load("pickscore", folder)(images, PROMPTS))


# ----------------------------------------------------------------------------------------------------
# Preprocessing and the scorer interface


def test_preprocess_matches_torch_and_pil():
    from PIL import Image
    from transformers import CLIPImageProcessorPil
    mean, std = torch.tensor(reward.MEAN).view(1, 3, 1, 1), torch.tensor(reward.STD).view(1, 3, 1, 1)
    x = torch.rand(2, 3, 33, 47, generator=torch.Generator().manual_seed(0))
    r = F.interpolate(x, size=(32, 45), mode="bicubic", antialias=True)  # short side 33 -> 32, long int(32*47/33)
    assert torch.equal(reward.preprocess(x, 32), (r[:, :, :, 6:38].clamp(0, 1) - mean) / std)  # crop (45-32)//2
    r = F.interpolate(x.transpose(2, 3), size=(45, 32), mode="bicubic", antialias=True)  # portrait
    assert torch.equal(reward.preprocess(x.transpose(2, 3), 32), (r[:, :, 6:38].clamp(0, 1) - mean) / std)
    assert torch.equal(reward.preprocess(x[:, :, :32, :32], 32), (x[:, :, :32, :32] - mean) / std)  # identity size
    # transformers' PIL processor on a smooth 8-bit image: within about one 8-bit step (1/255/std = 0.015)
    yy, xx = np.mgrid[0:45, 0:61] / 10.0
    u8 = np.stack([np.sin(yy + c) * np.cos(0.7 * xx - c) * 127 + 128 for c in range(3)], -1).round().astype(np.uint8)
    proc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    ref = torch.from_numpy(np.asarray(proc(Image.fromarray(u8), return_tensors="np").pixel_values))
    ours = reward.preprocess(torch.from_numpy(u8).permute(2, 0, 1)[None] / 255.0, 32)
    assert (ours - ref).abs().max() < 0.02


def test_area_scorer_shares_the_scorer_interface(clip_model, one_thread):
    folder = clip_model[0]
    scorer = reward.load("clip", folder)
    assert list(inspect.signature(toy.area).parameters) == list(inspect.signature(scorer).parameters) == \
        ["images", "prompts"]
    g = torch.Generator().manual_seed(4)
    pairs = [{"caption": p, "image_0": torch.rand(3, 16, 16, generator=g),
              "image_1": torch.rand(3, 16, 16, generator=g), "label_0": 0.5} for p in PROMPTS[:3]]
    for s in (toy.area, scorer):  # relabel.relabel takes either
        labels = [p["label_0"] for p in relabel.relabel(pairs, s)]
        want = []
        for p in pairs:
            a, b = s(torch.stack([p["image_0"], p["image_1"]]), [p["caption"]] * 2)
            want.append(1.0 if a > b else 0.0 if a < b else 0.5)
        assert labels == want


# ----------------------------------------------------------------------------------------------------
# Bad input: one line naming the problem


def test_bad_input(clip_model, hps_file, tmp_path, images, one_thread):
    folder, _, n, act = clip_model
    path, config = hps_file
    # Wrong kind, options, folders.
    with pytest.raises(ValueError, match="unknown reward kind 'hpsv3'"):
        reward.load("hpsv3", folder)
    with pytest.raises(ValueError, match="unknown option.*head.*takes tokenizer"):
        reward.load("clip", folder, head="x.pth")
    (tmp_path / "te").mkdir()  # a diffusers text_encoder/ folder: a CLIPTextModel, no vision tower
    json.dump({"model_type": "clip_text_model", "hidden_size": 32}, open(tmp_path / "te" / "config.json", "w"))
    for bad in (str(tmp_path / "te"), path, str(tmp_path / "nowhere")):
        with pytest.raises(CheckpointError, match="is not a transformers CLIPModel folder"):
            reward.load("pickscore", bad)
    # A CLIPModel folder with a key missing and one too many: both named.
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    state = load_file(broken / "model.safetensors")
    state["vision_model.extra.weight"] = state.pop("visual_projection.weight")
    save_file(state, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing keys: visual_projection.weight; unexpected keys: vision_mo"):
        reward.load("clip", str(broken))
    # HPS: no tokenizer, not a checkpoint, keys missing or unexpected, a config the file does not match or we lack.
    with pytest.raises(CheckpointError, match="hps: pass tokenizer=FOLDER"):
        reward.load("hps", path, config=config)
    with pytest.raises(CheckpointError, match="hps: .* is not a file"):
        reward.load("hps", folder, tokenizer=folder, config=config)
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="holds no 'state_dict'"):
        reward.load("hps", str(tmp_path / "other.pt"), tokenizer=folder, config=config)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="cannot read hps checkpoint .*: not a PyTorch file of tensors") as e:
        reward.load("hps", str(tmp_path / "junk.pt"), tokenizer=folder, config=config)
    torch.save({"state_dict": {"x": reward.Aesthetic}}, tmp_path / "pickled.pt")  # a class: unsafe to unpickle
    with pytest.raises(CheckpointError, match="holds pickled objects besides tensors, which are not loaded$") as f:
        reward.load("hps", str(tmp_path / "pickled.pt"), tokenizer=folder, config=config)
    assert "weights_only" not in str(e.value) + str(f.value)  # never torch's advice to load it unsafely
    sd = torch.load(path, weights_only=True)["state_dict"]
    sd["visual.attnpool.weight"] = sd.pop("visual.ln_post.weight")
    torch.save({"state_dict": sd}, tmp_path / "hps_bad.pt")
    with pytest.raises(CheckpointError, match="keys missing: visual.ln_post.weight"):
        reward.load("hps", str(tmp_path / "hps_bad.pt"), tokenizer=folder, config=config)
    sd["visual.ln_post.weight"] = sd["visual.ln_post.bias"]
    torch.save({"state_dict": sd}, tmp_path / "hps_bad.pt")
    with pytest.raises(CheckpointError, match="unexpected keys: visual.attnpool.weight"):
        reward.load("hps", str(tmp_path / "hps_bad.pt"), tokenizer=folder, config=config)
    deeper = dict(config, vision_cfg=dict(config["vision_cfg"], layers=3))
    with pytest.raises(CheckpointError, match="keys missing: visual.transformer.resblocks.2"):
        reward.load("hps", path, tokenizer=folder, config=deeper)
    with pytest.raises(CheckpointError, match="shape mismatch for text_projection.weight"):
        reward.load("hps", path, tokenizer=folder, config=dict(config, embed_dim=8))
    with pytest.raises(ValueError, match="not supported here: custom_text, text_cfg.hf_model_name"):
        reward.load("hps", path, tokenizer=folder, config=dict(config, custom_text=True,
                                                               text_cfg={"hf_model_name": "roberta-base"}))
    # Aesthetic: no head, a head for another CLIP (ViT-B/32's 512-d embedding), a file that is not the head.
    with pytest.raises(CheckpointError, match="aesthetic: pass head=FILE"):
        reward.load("aesthetic", folder)
    dims = (512, 1024, 128, 64, 16, 1)
    head = {f"layers.{k}.{w}": torch.zeros((dims[i + 1], dims[i]) if w == "weight" else (dims[i + 1],))
            for i, k in enumerate((0, 2, 4, 6, 7)) for w in ("weight", "bias")}
    torch.save(head, tmp_path / "head512.pth")
    with pytest.raises(CheckpointError, match=r"shape mismatch for layers.0.weight: checkpoint \(1024, 512\), model "
                                              r"\(1024, 16\)"):
        reward.load("aesthetic", folder, head=str(tmp_path / "head512.pth"))
    with pytest.raises(CheckpointError, match="missing keys: layers.0.bias.*unexpected keys: epoch, state_dict"):
        reward.load("aesthetic", folder, head=path)
    # Calls: one prompt per image, RGB batches.
    scorer = reward.load("pickscore", folder)
    with pytest.raises(ValueError, match="one prompt per image, got 6 images and 2 prompts"):
        scorer(images, PROMPTS[:2])
    with pytest.raises(ValueError, match=r"images must be \(B, 3, H, W\), got \(3, 41, 50\)"):
        scorer(images[0], PROMPTS[:1])


# ----------------------------------------------------------------------------------------------------
# Win rates


def test_win_rate_counts_ties_half():
    r = reward.win_rate(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([2.0, 2.0, 1.0, 5.0]))
    assert r["win_rate"] == (1 + 0.5 + 0 + 1) / 4 and r["base"] == 2.5 and r["tuned"] == 2.5 and r["n"] == 4
    assert r["ci95"] == pytest.approx([0.2194, 0.9081], abs=1e-4)  # Wilson, z = 1.96, 2.5 of 4 (by hand)


def test_wilson_interval():
    lo, hi = reward.wilson(8, 10)  # textbook value: 0.490 .. 0.943
    assert abs(lo - 0.4902) < 1e-4 and abs(hi - 0.9433) < 1e-4
    assert reward.wilson(0, 5)[0] == 0.0 and reward.wilson(5, 5)[1] == 1.0


def test_score_specs():
    """--score KIND[=PATH][,OPTION=VALUE...], as every tool parses it."""
    assert reward.parse_spec("hps=HPS.pt,tokenizer=TOK") == ("hps", "HPS.pt", {"tokenizer": "TOK"})
    assert reward.parse_spec("area") == ("area", None, {})
    with pytest.raises(ValueError, match="unknown kind 'pick'"):
        reward.parse_spec("pick=x")
    with pytest.raises(ValueError, match="after KIND=PATH come OPTION=VALUE items"):
        reward.parse_spec("clip=d,tok")
    with pytest.raises(CheckpointError, match="pickscore: no such file or folder: /no/such"):
        reward.load_all([("pickscore", "/no/such", {})])
    assert reward.load_all([("area", None, {})])["area"] is toy.area


def test_hps_without_a_tokenizer_folder(hps_file, images, tmp_path, one_thread):
    """An HPSv2 .pt alone scores: CLIP's vocabulary comes from clip_bpe/ (padded with "!" as open_clip pads, which
    the causal text tower and its end-token pooling never see: the same scores as <|endoftext|> padding)."""
    path, config = hps_file
    sd = torch.load(path, weights_only=True)["state_dict"]
    emb = sd["token_embedding.weight"]  # (n, 32): grown to CLIP's 49408 rows
    sd["token_embedding.weight"] = torch.cat([emb, torch.randn(clip.CLIP_VOCAB_SIZE - emb.shape[0], emb.shape[1])])
    full = str(tmp_path / "HPS_v2.1_compressed.pt")
    torch.save({"state_dict": sd}, full)
    cfg = dict(config, text_cfg=dict(config["text_cfg"], vocab_size=clip.CLIP_VOCAB_SIZE))
    scorer = reward.load("hps", full, config=cfg)
    assert scorer.tokenizer.folder == clip.VOCAB and scorer.tokenizer.pad_id == 0
    explicit = reward.load("hps", full, tokenizer=clip.VOCAB, config=cfg)
    assert explicit.tokenizer.pad_id == 49407
    scores = scorer(images, PROMPTS)
    _close(scores, explicit(images, PROMPTS))
    assert scores.std() > 0
