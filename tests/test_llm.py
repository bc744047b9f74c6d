"""llm.py against transformers on the same tiny random weights and vocabulary: the Qwen tokenizer (AutoTokenizer), the
Z-Image chat template (apply_chat_template with Qwen3's), Qwen2.5-VL's hidden_states[-1] (Qwen-Image) and Qwen3's
hidden_states[-2] (Z-Image) at the real tokens of a right-padded batch, in every layout the checkpoints come in."""
import inspect
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

import llm
import weights
from tiny import read_tensors, rel_error
from tiny_qwen import (QWEN25_VL_TINY, QWEN3_TINY, make_qwen25_vl_text_encoder, make_qwen3_text_encoder,
                  make_qwen_tokenizer)
from weights import CheckpointError

# Unequal lengths (so the batch pads), unicode (multi-byte, and a decomposed é that NFC composes), an empty prompt,
# whitespace runs, contractions and digits (the regex split), special tokens typed as text, braces.
PROMPTS = ["a photo of the cat on the mat", "", "red", "café 東京 🐱 e\u0301 — ünïcödé",
           "  two  spaces\t\tand\n\nlines ", "I'm sure you'LL see 12345 cats", "<|im_end|> and <think></think> as text",
           "{} and {0} braces", " ".join(["the red dog"] * 30)]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A Qwen-Image-like root (tokenizer/, text_encoder/) and a Qwen3 text encoder folder beside it."""
    base = tmp_path_factory.mktemp("qwen")
    make_qwen_tokenizer(str(base / "root" / "tokenizer"))
    vl = make_qwen25_vl_text_encoder(str(base / "root" / "text_encoder"))
    q3 = make_qwen3_text_encoder(str(base / "qwen3"))
    return dict(root=str(base / "root"), tokenizer=str(base / "root" / "tokenizer"),
                vl_dir=str(base / "root" / "text_encoder"), vl=vl, q3_dir=str(base / "qwen3"), q3=q3)


def _reference_batch(folder, template, max_length, prompts=PROMPTS):
    from transformers import AutoTokenizer
    ref = AutoTokenizer.from_pretrained(folder)
    return ref([template.format(p) for p in prompts], padding=True, truncation=True, max_length=max_length,
               return_tensors="pt")


# ----------------------------------------------------------------------------------------------------
# Tokenizer and templates


@pytest.mark.parametrize("template,max_length", [("{}", 1000), (llm.QWEN_IMAGE_TEMPLATE, llm.QWEN_IMAGE_MAX_LENGTH),
                                                 (llm.Z_IMAGE_TEMPLATE, llm.Z_IMAGE_MAX_LENGTH),
                                                 (llm.Z_IMAGE_TEMPLATE, 24)])
def test_tokenizer_matches_transformers(template, max_length, root):
    from transformers import AutoTokenizer
    ref = AutoTokenizer.from_pretrained(root["tokenizer"])
    want = _reference_batch(root["tokenizer"], template, max_length)
    tok = llm.Tokenizer(root["tokenizer"], max_length, template)
    ids = tok(PROMPTS)
    assert ids.dtype == torch.long and ids.tolist() == want.input_ids.tolist()
    assert (tok.pad_id, tok.max_length, tok.template) == (ref.pad_token_id, max_length, template)
    assert ids.shape[1] == min(max_length, want.attention_mask.sum(1).max())  # padded to the longest, not further
    lengths = want.attention_mask.sum(1)
    assert lengths.min() < lengths.max() and (ids[lengths < ids.shape[1], -1] == tok.pad_id).all()  # right padding
    assert torch.equal(tok(PROMPTS[0]), tok(PROMPTS[:1]))
    assert torch.equal(llm.Tokenizer(os.path.join(root["tokenizer"], "tokenizer.json"), max_length, template)(PROMPTS),
                       ids)


def test_tokenizer_rebuilds_qwen2s_pipeline(root, tmp_path):
    """Like transformers, the file's vocabulary and merges are used with Qwen2's own normalizer and split, whatever
    the file says (here a file with neither)."""
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
    assert llm.PRETOKENIZE_REGEX == PRETOKENIZE_REGEX
    with open(os.path.join(root["tokenizer"], "tokenizer.json")) as f:
        data = json.load(f)
    data["normalizer"], data["pre_tokenizer"]["pretokenizers"] = None, data["pre_tokenizer"]["pretokenizers"][1:]
    shutil.copy(os.path.join(root["tokenizer"], "tokenizer_config.json"), tmp_path)
    with open(tmp_path / "tokenizer.json", "w") as f:
        json.dump(data, f)
    ours, want = llm.Tokenizer(str(tmp_path), 100)(PROMPTS), _reference_batch(str(tmp_path), "{}", 100)
    assert ours.tolist() == want.input_ids.tolist()
    assert ours.tolist() == llm.Tokenizer(root["tokenizer"], 100)(PROMPTS).tolist()


def test_templates_are_the_pipelines(root):
    """Z_IMAGE_TEMPLATE is what Qwen3's chat template renders (thinking on: no <think> block); QWEN_IMAGE_TEMPLATE,
    the dropped 34 tokens and the length caps are diffusers' pipelines'."""
    from diffusers import QwenImagePipeline, ZImagePipeline
    from transformers import AutoTokenizer
    ref = AutoTokenizer.from_pretrained(root["tokenizer"])
    for p in PROMPTS:
        chat = dict(tokenize=False, add_generation_prompt=True)
        assert ref.apply_chat_template([{"role": "user", "content": p}], enable_thinking=True, **chat) == \
            llm.Z_IMAGE_TEMPLATE.format(p)
        assert ref.apply_chat_template([{"role": "user", "content": p}], enable_thinking=False, **chat) != \
            llm.Z_IMAGE_TEMPLATE.format(p)
    qwen = inspect.getsource(QwenImagePipeline)
    assert json.dumps(llm.QWEN_IMAGE_TEMPLATE, ensure_ascii=False) in qwen
    assert f"prompt_template_encode_start_idx = {llm.QWEN_IMAGE_DROP}" in qwen
    assert f"tokenizer_max_length = {llm.QWEN_IMAGE_MAX_LENGTH - llm.QWEN_IMAGE_DROP}" in qwen
    z = inspect.getsource(ZImagePipeline._encode_prompt)
    assert f"max_sequence_length: int = {llm.Z_IMAGE_MAX_LENGTH}" in z and "hidden_states[-2]" in z


# ----------------------------------------------------------------------------------------------------
# Hidden states


def _check(model, folder, ref_states, template, max_length, tol=1e-5):
    """model's states equal ref_states (transformers' hidden states on the reference tokenizer's batch) at the real
    tokens; its mask is the tokenizer's attention mask."""
    batch = _reference_batch(folder, template, max_length)
    ids = llm.Tokenizer(folder, max_length, template)(PROMPTS)
    with torch.no_grad():
        states, mask = model(ids)
        want = ref_states(batch)
    assert states.shape == want.shape and states.dtype == torch.float32
    assert torch.equal(mask, batch.attention_mask.bool())
    assert rel_error(states[mask], want[mask]) <= tol
    return states, mask


def test_qwen25_vl_matches_transformers(root):
    """Qwen-Image: hidden_states[-1] of Qwen2_5_VLForConditionalGeneration (the final-normed last layer), the pad id
    read from the pipeline's tokenizer/."""
    m = llm.load(root["root"])
    assert m.pad_id == llm.Tokenizer(root["tokenizer"], 1).pad_id != llm.PAD_ID
    assert len(m.layers) == 3 and m.norm is not None and m.config["head_dim"] == 128
    assert set(m.state_dict()) == {k[len("model.language_model."):] for k in root["vl"].state_dict()
                                   if k.startswith("model.language_model.")}

    def ref(b):
        return root["vl"](input_ids=b.input_ids, attention_mask=b.attention_mask, output_hidden_states=True) \
            .hidden_states[-1]
    states, mask = _check(m, root["tokenizer"], ref, llm.QWEN_IMAGE_TEMPLATE, llm.QWEN_IMAGE_MAX_LENGTH)
    ids = llm.Tokenizer(root["tokenizer"], llm.QWEN_IMAGE_MAX_LENGTH, llm.QWEN_IMAGE_TEMPLATE)(PROMPTS)
    with torch.no_grad():  # the k biases matter (softmax ignores only a bias shared by all keys): without them, not
        for layer in m.layers:
            layer.self_attn.k_proj.bias.zero_()
        assert rel_error(m(ids)[0][mask], states[mask]) > 1e-3


@pytest.mark.parametrize("layer", [-2, -1])
def test_qwen3_matches_transformers(layer, root):
    """Z-Image: hidden_states[-2] of Qwen3Model (the second-to-last layer's output, no final norm): the last layer and
    the norm are not built; -1 builds them."""
    m = llm.load(root["q3_dir"], layer=layer, pad_id=llm.Tokenizer(root["tokenizer"], 1).pad_id)
    assert m.config["head_dim"] == 16 and m.config["family"] == "qwen3"
    assert len(m.layers) == (2 if layer == -2 else 3) and (m.norm is None) == (layer == -2)

    def ref(b):
        return root["q3"].model(input_ids=b.input_ids, attention_mask=b.attention_mask, output_hidden_states=True) \
            .hidden_states[layer]
    _check(m, root["tokenizer"], ref, llm.Z_IMAGE_TEMPLATE, llm.Z_IMAGE_MAX_LENGTH)


def test_skipped_weights_are_not_read(root, monkeypatch):
    """layer=-2 reads neither the last layer nor the final norm; the vision tower and lm_head are never read."""
    read = []
    get = weights.Checkpoint.__getitem__
    monkeypatch.setattr(weights.Checkpoint, "__getitem__", lambda self, k: read.append(k) or get(self, k))
    m = llm.load(root["vl_dir"], layer=-2)
    assert len(read) == len(m.state_dict()) and not any(k.startswith(("visual.", "lm_head.")) for k in read)
    assert not any(k.startswith(("model.layers.2.", "model.norm.")) for k in read)


@pytest.mark.parametrize("bad", [{"model_type": "llama"}, {"model_type": "qwen2_5_vl", "layer": 4},
                                 {"model_type": "qwen3", "hidden_act": "gelu"}])
def test_bad_configs(bad):
    layer = bad.pop("layer", -1)
    with pytest.raises(ValueError) as e:
        llm.LanguageModel(dict(QWEN3_TINY, **bad), layer=layer)
    assert "\n" not in str(e.value)


def test_full_size_parameter_counts():
    """QWEN25_VL_7B and QWEN3_4B on the meta device: transformers' language models' parameters, name for name."""
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, Qwen3Config, Qwen3Model
    with torch.device("meta"):
        pairs = [(llm.LanguageModel(llm.QWEN25_VL_7B), Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(**{
                     k: v for k, v in llm.QWEN25_VL_7B.items() if k not in ("model_type", "rope_scaling")}))),
                 (llm.LanguageModel(llm.QWEN3_4B), Qwen3Model(Qwen3Config(**{
                     k: v for k, v in llm.QWEN3_4B.items() if k != "model_type"})))]
    for ours, ref in pairs:
        assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
            {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    counts = [sum(p.numel() for p in m.parameters()) for m, _ in pairs]
    assert 7_000_000_000 < counts[0] < 7_200_000_000 and 4_000_000_000 < counts[1] < 4_100_000_000


# ----------------------------------------------------------------------------------------------------
# Layouts


def _states(m, ids):
    with torch.no_grad():
        return m(ids)[0]


@pytest.fixture(scope="module")
def ids(root):
    return llm.Tokenizer(root["tokenizer"], 200, llm.QWEN_IMAGE_TEMPLATE)(PROMPTS[:4])


def test_folder_layouts(root, ids, tmp_path):
    """Qwen2.5-VL in transformers 5's in-memory key layout (model.language_model.*, model.visual.*) and sharded;
    Qwen3 as Qwen3Model (no model. prefix)."""
    vl = _states(llm.load(root["vl_dir"]), ids)
    new = tmp_path / "new_layout"
    new.mkdir()
    shutil.copy(os.path.join(root["vl_dir"], "config.json"), new)
    save_file({k: v.contiguous() for k, v in root["vl"].state_dict().items()}, str(new / "model.safetensors"))
    assert any(k.startswith("model.visual.") for k in read_tensors(str(new / "model.safetensors")))
    assert torch.equal(_states(llm.load(str(new)), ids), vl)
    root["vl"].save_pretrained(str(tmp_path / "sharded"), max_shard_size="1MB")
    assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
    assert torch.equal(_states(llm.load(str(tmp_path / "sharded")), ids), vl)

    q3 = _states(llm.load(root["q3_dir"], layer=-2), ids)
    root["q3"].model.save_pretrained(str(tmp_path / "qwen3_model"))
    assert "embed_tokens.weight" in read_tensors(str(tmp_path / "qwen3_model" / "model.safetensors"))
    assert torch.equal(_states(llm.load(str(tmp_path / "qwen3_model"), layer=-2), ids), q3)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3"])
@pytest.mark.parametrize("variant", ["comfy", "prefixed", "bf16"])
def test_single_files(family, variant, root, ids, tmp_path):
    """ComfyUI-style single files (model.*, the vision tower, lm_head; no config: sizes read off the shapes, the
    released rope_theta and eps), under a whole checkpoint's prefix beside other models' keys, stored in bf16."""
    folder = root["vl_dir"] if family == "qwen2_5_vl" else root["q3_dir"]
    state = read_tensors(os.path.join(folder, "model.safetensors"))
    if family == "qwen3":
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    if variant == "prefixed":
        state = {"text_encoders.qwen.transformer." + k: v for k, v in state.items()}
        state["model.diffusion_model.x_embedder.weight"] = torch.zeros(3)
    if variant == "bf16":
        state = {k: v.bfloat16() for k, v in state.items()}
    path = str(tmp_path / "te.safetensors")
    save_file(state, path)
    assert llm.in_file(weights.Checkpoint(path))
    m = llm.load(path, pad_id=0)
    tiny = QWEN25_VL_TINY if family == "qwen2_5_vl" else QWEN3_TINY
    assert all(m.config[k] == tiny.get(k, 128) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                         "num_hidden_layers", "num_attention_heads",
                                                         "num_key_value_heads", "head_dim"))
    want = _states(llm.load(folder, pad_id=0), ids)
    if variant == "bf16":
        assert 0 < rel_error(_states(m, ids), want) < 2e-2
    else:
        assert torch.equal(_states(m, ids), want)


def test_bf16_and_quantized(root, ids):
    """Loaded straight into bf16: every tensor and the states bf16, close to fp32; int8: its Linears quantized."""
    import kernels
    want = _states(llm.load(root["q3_dir"]), ids)
    m = llm.load(root["q3_dir"], dtype=torch.bfloat16)
    assert {v.dtype for v in m.state_dict().values()} == {torch.bfloat16}
    states = _states(m, ids)
    assert states.dtype == torch.bfloat16 and 0 < rel_error(states, want) < 5e-2
    q = llm.load(root["q3_dir"], quantize="int8")
    assert isinstance(q.layers[0].mlp.up_proj, kernels.QuantLinear)
    assert 0 < rel_error(_states(q, ids), want) < 5e-2


# ----------------------------------------------------------------------------------------------------
# Bad input


def _one_line_error(call, *names):
    with pytest.raises(CheckpointError) as e:
        call()
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in names), msg
    return msg


def test_bad_input(root, tmp_path):
    _one_line_error(lambda: llm.load(str(tmp_path / "nowhere")), "nowhere")
    empty = tmp_path / "no_tokenizer"
    empty.mkdir()
    _one_line_error(lambda: llm.Tokenizer(str(empty), 10), "tokenizer.json")

    llama = tmp_path / "llama"  # another model_type
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    _one_line_error(lambda: llm.load(str(llama)), "'llama'")

    state = read_tensors(os.path.join(root["vl_dir"], "model.safetensors"))
    gone = tmp_path / "missing"  # a folder missing one key, with one key too many
    gone.mkdir()
    shutil.copy(os.path.join(root["vl_dir"], "config.json"), gone)
    save_file({**{k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"},
               "model.layers.0.extra.weight": torch.zeros(2), "stray.weight": torch.zeros(2)},
              str(gone / "model.safetensors"))
    _one_line_error(lambda: llm.load(str(gone)), "missing keys: layers.1.mlp.up_proj.weight",
                    "layers.0.extra.weight", "stray.weight")
    _one_line_error(lambda: llm.load(root["vl_dir"], layer=7), "layer 7")

    plain = str(tmp_path / "llama.safetensors")  # a Llama-style LM: no q/k/v biases, no q/k norms
    save_file({k: v for k, v in state.items() if not k.endswith("_proj.bias")}, plain)
    assert not llm.in_file(weights.Checkpoint(plain))
    _one_line_error(lambda: llm.load(plain), plain, "no Qwen2.5-VL / Qwen3")
