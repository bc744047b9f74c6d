"""lora.py, the LoRA memory tier: one UNet, the reference is the base with the adapters off (bit for bit through
training), diffusers loads the file with the same outputs as the merged UNet; bad input."""
import math
import os
import shutil

import pytest
import torch

import dpo
import families
import lora
import sample
import unet as unetlib
import weights
from tiny import run

pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(u, B=2, seed=0):
    """Random UNet inputs (latents 8x8) for the tiny models, SDXL's extra conditioning when it has it."""
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(B, 4, 8, 8, generator=g), torch.tensor([10, 700, 300, 999][:B])
    ctx = torch.randn(B, 77, u.config["cross_attention_dim"], generator=g)
    if not u.is_sdxl:
        return x, t, ctx, None, None
    pooled = torch.randn(B, u.config["projection_class_embeddings_input_dim"] - 6 * 8, generator=g)
    return x, t, ctx, pooled, torch.tensor([[32.0, 32, 0, 0, 32, 32]] * B)


def _diffusers(pipe, x, t, ctx, pooled, time_ids):
    kw = {} if pooled is None else dict(added_cond_kwargs=dict(text_embeds=pooled, time_ids=time_ids))
    return pipe.unet(x, t, ctx, **kw).sample


# ----------------------------------------------------------------------------------------------------
# LoRA


@pytest.mark.parametrize("family", ["sdxl", "sd15"])
def test_lora_file_loads_in_diffusers_and_equals_the_merged_unet(tmp_path, sdxl_dir, sd15_dir, jsonl, family):
    """The run's lora/ loaded by diffusers' pipeline.load_lora_weights (PEFT) computes what its merged unet/ does,
    and what sample.py computes with --lora on the base; alpha != rank checks the scale folded into the file."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    model = sdxl_dir if family == "sdxl" else sd15_dir
    out = tmp_path / "run"
    m = run(out, model, jsonl, "--lora", "4", "--lora_alpha", "8", "--lr", "1e-2", steps=2)
    assert abs(m[0]["loss"] - math.log(2)) < 1e-6  # the policy starts as the reference
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "lora", "metrics.jsonl", "unet"]
    pipe = (StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline).from_pretrained(model)
    merged = unetlib.load(str(out))
    inputs = _inputs(merged)
    with torch.no_grad():
        base = _diffusers(pipe, *inputs)
        pipe.load_lora_weights(str(out / "lora"))
        theirs = _diffusers(pipe, *inputs)
        ours = merged(*inputs)
        sampled = sample.load_unet(model, lora=str(out))(*inputs)  # base + the LoRA of the run's out_dir
    assert (theirs - base).abs().max() > 1e-3  # the adapters trained: a file of zeros would not pass
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sampled, theirs, rtol=1e-5, atol=1e-5)
    saved = lora.read(str(out / "lora"))  # every attention and feed-forward projection, nothing else
    assert sorted(saved) == sorted(lora.layers(lora_model(model)))
    assert all(name.endswith(families.SDXL.lora_targets) for name in saved)


def lora_model(model, rank=4):
    """The tiny base, frozen as dpo.py freezes it, with rank-4 adapters (alpha 8)."""
    u = dpo.reference(families.load(model, "cpu", torch.float32, torch.float32), torch.float32)
    lora.add(u, rank, 8, seed=0)
    return u


def test_lora_reference_is_the_frozen_base(sdxl_dir, jsonl):
    """Training moves only the adapters: the base weights stay bit for bit, and so does the reference (the same
    UNet with its adapters off), while the policy moves away from it. Step 0 is log 2."""
    policy = lora_model(sdxl_dir)
    ref = lora.reference(policy)
    trained = [p for p in policy.parameters() if p.requires_grad]
    names = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    base = {k: v.clone() for k, v in policy.state_dict().items() if k not in names}
    x, t, ctx, pooled, time_ids = _inputs(policy, B=4)
    z, eps, cond = x, x[:2].flip(0).clone(), (ctx, pooled, time_ids)  # 2 pairs: winners then losers
    ref_before = ref(x, t, ctx, pooled, time_ids)
    args = dpo.parse_args(["--lora", "4"])
    args = dpo.resolve(args, families.SDXL, 1)
    acp = torch.linspace(0.99, 0.01, 1000)
    opt = torch.optim.AdamW(trained, lr=1e-2)
    losses = []
    for _ in range(3):
        loss, _ = dpo.pair_loss(policy, ref, dict(z=z, eps=eps, t=t[:2], T=1000, cond=cond),
                                dpo.objective("dpo", args.beta), "epsilon", acp)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert abs(losses[0] - math.log(2)) < 1e-7 and losses[-1] != losses[0]
    assert all(torch.equal(v, policy.state_dict()[k]) for k, v in base.items())
    ref_after = ref(x, t, ctx, pooled, time_ids)
    assert torch.equal(ref_before, ref_after)
    with torch.no_grad():
        assert (policy(x, t, ctx, pooled, time_ids) - ref_after).abs().max() > 1e-4


# ----------------------------------------------------------------------------------------------------
# Bad input: one line, non-zero exit, nothing overwritten


def test_lora_flags_refuse_bad_input(tmp_path, sdxl_dir, jsonl, capsys):
    for flags, want in ((["--lora", "0"], "--lora must be >= 1, got 0"),
                        (["--lora", "4", "--lora_alpha", "-1"], "--lora_alpha has an invalid value: -1.0")):
        with pytest.raises(SystemExit) as e:
            run(tmp_path / "bad", sdxl_dir, jsonl, *flags)
        assert e.value.code == 2 and want in capsys.readouterr().err
    # a full run's checkpoint is not continued as a LoRA run (nor the other way round)
    run(tmp_path / "full", sdxl_dir, jsonl, "--ckpt_every", "1", steps=1)
    ck = tmp_path / "full" / "checkpoint.pt"
    before = (ck.stat().st_mtime_ns, (tmp_path / "full" / "unet").exists())
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "full", sdxl_dir, jsonl, "--resume", "--lora", "4", steps=2)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and err == ["error: --resume with flags that change the run: --optimizer adafactor -> "
                                         "adamw, --lora None -> 4; use a new --out_dir"]  # LoRA's default: AdamW
    assert (ck.stat().st_mtime_ns, (tmp_path / "full" / "unet").exists()) == before
    shutil.rmtree(tmp_path / "full")
    with pytest.raises(weights.CheckpointError, match="no LoRA file"):
        lora.read(str(tmp_path))  # a folder without a LoRA file


def test_identical_runs_write_identical_files(tmp_path, sdxl_dir, jsonl):
    """The same LoRA run twice gives the same bytes, metadata included (safetensors writes its metadata from a
    hash map: weights.save_safetensors puts the header in a fixed order)."""
    for name in ("a", "b"):
        run(tmp_path / name, sdxl_dir, jsonl, "--lora", "4", steps=1)
    for f in (os.path.join("lora", lora.FILE), os.path.join("unet", "diffusion_pytorch_model.safetensors")):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
