"""The tiny Qwen-Image and Z-Image parts (transformers, VAE, language-model text encoders, the byte-level BPE
tokenizer) and whole pipelines, built with the reference implementations (diffusers, transformers) and saved as real
folders, as tiny.py does for the other families."""
import os

import torch

from tiny import _randomize, _vae16
from toy import QWEN_ADDED, QWEN_SPECIAL, qwen_bpe, write_qwen_tokenizer

# ----------------------------------------------------------------------------------------------------
# Qwen-Image: a tiny transformer (in_channels = 16 latent channels x 2x2; head dim 16 split (4, 6, 6) by the RoPE axes)

QWEN_IMAGE_TINY = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
                       num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 6, 6))


def make_qwen_image_transformer(folder, seed=0, **config):
    """Write a tiny random diffusers QwenImageTransformer2DModel folder (QWEN_IMAGE_TINY, updated by config) at
    folder, every weight _randomize'd; returns folder."""
    from diffusers import QwenImageTransformer2DModel
    torch.manual_seed(seed)
    model = QwenImageTransformer2DModel(**{**QWEN_IMAGE_TINY, **config})
    _randomize(model, seed=seed)
    model.save_pretrained(str(folder))
    return str(folder)


# ----------------------------------------------------------------------------------------------------
# Qwen-Image's VAE (AutoencoderKLQwenImage)

# Its structure at toy width: four levels (downsamples by 8), 16 latent channels, two residual blocks per level
QWEN_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])


def make_qwen_vae(folder, seed=0, overshoot=True, **config):
    """Write a tiny random AutoencoderKLQwenImage folder (QWEN_VAE over config) at folder, with per-channel
    latents_mean / latents_std away from 0 and 1 (so a wrong channel order or formula shows), decoding a little past
    [-1, 1]; returns folder."""
    from diffusers import AutoencoderKLQwenImage
    cfg = dict(QWEN_VAE, **config)
    g = torch.Generator().manual_seed(seed + 1)
    cfg.setdefault("latents_mean", (torch.randn(cfg["z_dim"], generator=g) * 0.5).tolist())
    cfg.setdefault("latents_std", (0.5 + 2 * torch.rand(cfg["z_dim"], generator=g)).tolist())
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(**cfg).eval()
    _randomize(vae, seed=seed)
    with torch.no_grad():  # images a little past [-1, 1], as a real VAE decodes some pixels: diffusers clamps them
        if overshoot:
            vae.decoder.conv_out.weight.mul_(3)
        else:  # a pipeline's: near-white images around the toy area rule's threshold, so its reward varies
            vae.decoder.conv_out.weight.mul_(2)
            vae.decoder.conv_out.bias.add_(0.7)
    vae.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------------------------------
# Z-Image (z_image.py)

# 4 latent channels, width 64 in 4 heads of 16 (RoPE split (4, 6, 6)), 24-wide caption features; Z-Image's RoPE
# lengths and base, so a single file (whose config is read off its shapes) gives the same config.
Z_IMAGE_TINY = dict(all_patch_size=[2], all_f_patch_size=[1], in_channels=4, dim=64, n_layers=2, n_refiner_layers=1,
                    n_heads=4, n_kv_heads=4, norm_eps=1e-5, qk_norm=True, cap_feat_dim=24, rope_theta=256.0,
                    t_scale=1000.0, axes_dims=[4, 6, 6], axes_lens=[1536, 512, 512])


def make_z_image_transformer(folder, seed=0, **config):
    """Write a tiny random diffusers ZImageTransformer2DModel folder (Z_IMAGE_TINY, overridden by config) at folder;
    returns the model (eval mode)."""
    from diffusers import ZImageTransformer2DModel
    torch.manual_seed(seed)
    model = ZImageTransformer2DModel(**{**Z_IMAGE_TINY, **config}).eval()
    _randomize(model, seed=seed)
    model.save_pretrained(folder)
    return model


# ----------------------------------------------------------------------------------------------------
# Qwen language models (llm.py): the byte-level BPE tokenizer, Qwen2.5-VL (Qwen-Image) and Qwen3 (Z-Image)

# Words the tiny BPE spells as single tokens ("Ġ": a leading space, "Ċ": a newline, in the byte-to-unicode map).
QWEN_WORDS = ["user", "assistant", "system", "Describe", "Ġthe", "Ġa", "Ġphoto", "Ġof", "Ġcat", "Ġdog", "Ġred",
              "Ġimage", "Ġcolor", "Ġshape", "Ġon", "Ġmat", ":", "Ċ", "ĊĊ"]

# Qwen3's chat template (Qwen3-4B's tokenizer_config.json at release), for apply_chat_template; its long lines
# are broken with a trailing backslash here, joined back on load.
QWEN3_CHAT_TEMPLATE = r'''{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with\
 function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within\
 <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\":\
 <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and\
 message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\n') %}
                {%- set reasoning_content =\
 message.content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n'\
 + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}'''.replace("\\\n", "")


QWEN_VOCAB = len(qwen_bpe(QWEN_WORDS)[0]) + len(QWEN_SPECIAL) + len(QWEN_ADDED)  # the tiny tokenizer's size


def make_qwen_tokenizer(folder, chat_template=QWEN3_CHAT_TEMPLATE):
    """A Qwen-style tokenizer folder spelling QWEN_WORDS (toy.write_qwen_tokenizer, the demo's writer: byte-level BPE,
    NFC, Qwen2's regex split, <|im_end|> as eos, <|endoftext|> as pad, a chat template) that AutoTokenizer loads as
    Qwen2Tokenizer; returns the vocab size (QWEN_VOCAB)."""
    import llm
    n = write_qwen_tokenizer(folder, llm.PRETOKENIZE_REGEX, QWEN_WORDS, chat_template)
    assert n == QWEN_VOCAB
    return n


# Qwen2.5-VL's text model at toy size. Heads of 128 as the released model's (a single file's head count is read off
# its widths over 128), 4 query heads sharing 2 k/v heads, the real M-RoPE sections; a one-block vision tower.
QWEN25_VL_TINY = dict(vocab_size=QWEN_VOCAB, hidden_size=512, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, hidden_act="silu",
                      rope_parameters=dict(rope_type="default", rope_theta=1000000.0, mrope_section=[16, 24, 24]),
                      bos_token_id=QWEN_VOCAB - 5, eos_token_id=QWEN_VOCAB - 3)
QWEN25_VL_VISION_TINY = dict(depth=1, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=512,
                             fullatt_block_indexes=[0])
# Qwen3 at toy size: an explicit head_dim (16) unlike hidden_size / heads (12), 4 query heads on 2 k/v heads.
QWEN3_TINY = dict(vocab_size=QWEN_VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, hidden_act="silu",
                  rope_theta=1000000.0, tie_word_embeddings=True)


def make_qwen25_vl_text_encoder(folder, seed=0):
    """Write a tiny random transformers Qwen2_5_VLForConditionalGeneration folder (vision tower and lm_head
    included, as Qwen-Image's text_encoder/) at folder, every weight _randomize'd; returns the model (eval mode)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=QWEN25_VL_TINY, vision_config=QWEN25_VL_VISION_TINY)).eval()
    _randomize(model, seed=seed)
    model.save_pretrained(folder)
    return model


def make_qwen3_text_encoder(folder, seed=0):
    """Write a tiny random transformers Qwen3ForCausalLM folder at folder (tied lm_head, so its keys are model.*
    only, as Z-Image's text_encoder/, which diffusers loads as Qwen3Model); returns the model (eval mode)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(**QWEN3_TINY)).eval()
    _randomize(model, seed=seed)
    model.save_pretrained(folder)
    return model


# ----------------------------------------------------------------------------------------------------
# Whole pipelines, as the hub's folders: QwenImagePipeline and ZImagePipeline of the tiny parts above


def make_qwen_image(root, seed=0):
    """Write a tiny random Qwen-Image pipeline folder (QwenImagePipeline.save_pretrained: transformer/, vae/,
    text_encoder/ (Qwen2.5-VL), tokenizer/, scheduler/ with Qwen-Image's released settings) at root; returns root."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel
    from diffusers import AutoencoderKLQwenImage
    from transformers import AutoTokenizer
    make_qwen_tokenizer(os.path.join(root, "tokenizer"))
    te = make_qwen25_vl_text_encoder(os.path.join(root, "text_encoder"), seed)
    make_qwen_image_transformer(os.path.join(root, "transformer"), seed,
                                joint_attention_dim=QWEN25_VL_TINY["hidden_size"])
    make_qwen_vae(os.path.join(root, "vae"), seed, overshoot=False)
    sched = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192,
                                            max_shift=0.9, shift=1.0, shift_terminal=0.02, use_dynamic_shifting=True,
                                            time_shift_type="exponential")
    pipe = QwenImagePipeline(
        scheduler=sched, vae=AutoencoderKLQwenImage.from_pretrained(os.path.join(root, "vae")), text_encoder=te,
        tokenizer=AutoTokenizer.from_pretrained(os.path.join(root, "tokenizer")),
        transformer=QwenImageTransformer2DModel.from_pretrained(os.path.join(root, "transformer")))
    pipe.save_pretrained(root)
    return root


def make_z_image(root, seed=0):
    """Write a tiny random Z-Image pipeline folder (ZImagePipeline.save_pretrained: transformer/, vae/ (FLUX's
    16-channel AutoencoderKL), text_encoder/ (Qwen3), tokenizer/ with Qwen3's chat template, scheduler/) at root."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline
    from transformers import AutoTokenizer
    make_qwen_tokenizer(os.path.join(root, "tokenizer"))
    te = make_qwen3_text_encoder(os.path.join(root, "text_encoder"), seed)
    transformer = make_z_image_transformer(os.path.join(root, "transformer"), seed, in_channels=16,
                                           cap_feat_dim=QWEN3_TINY["hidden_size"])
    vae = _vae16(0.3611, 0.1159)
    _randomize(vae, seed=seed)
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=te,
                          tokenizer=AutoTokenizer.from_pretrained(os.path.join(root, "tokenizer")),
                          transformer=transformer)
    pipe.save_pretrained(root)
    return root
