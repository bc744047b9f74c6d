"""demo.py: the data set in dpo.py's --data format, the toy model folder (loadable by every tool, its VAE
reconstructing the world), and (slow) the whole `python dpo.py` demo."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import cache
import data
import demo
import families
import images
import toy
from tiny import ROOT


def test_pairs_are_dpo_data_labelled_by_the_rule(tmp_path):
    path = demo.write_pairs(str(tmp_path), "dpo", 24, seed=5, biased=True)
    pairs = data.read_pairs(path)  # dpo.py's reader: image_0 is the preferred image, ties dropped
    assert len(pairs) >= 20 and {p["caption"] for p in pairs} == set(toy.PROMPTS)
    for p in pairs:
        assert p["caption"] in toy.PROMPTS
        a = toy.area(torch.cat([images.load_image(p[f"image_{k}"]) for k in (0, 1)]))
        assert a[0] > a[1]
    ds = cache.PreferenceDataset(data.Preferences(path), toy.SIZE, seed=0, random_crop=False, flip=True)
    item = ds[0]
    assert item["pixels"].shape == (2, 3, toy.SIZE, toy.SIZE) and item["pixels"].min() >= -1
    unbiased = data.read_pairs(demo.write_pairs(str(tmp_path), "sft", 24, seed=6, biased=False))
    wins = [float(toy.area(torch.cat([images.load_image(p[f"image_{k}"]) for k in (0, 1)])).argmax()) for p in unbiased]
    assert 0 < sum(wins) < len(wins)  # winners are not picked by size


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory):
    return demo.build_model(str(tmp_path_factory.mktemp("toy") / "model"), demo.WORLD["vae_steps"], seed=0,
                            log=lambda m: None)


def test_toy_model_loads_everywhere_and_its_vae_reconstructs(toy_model):
    import clip
    import sample
    import unet
    import vae
    u = unet.load(toy_model)
    assert u.is_sdxl and u.config["block_out_channels"] == demo.UNET_CONFIG["block_out_channels"]
    te = clip.load(toy_model)
    ctx, pooled = te.encode(toy.PROMPTS)
    assert te.family is families.SDXL and ctx.shape == (6, 77, 64) and pooled.shape == (6, 32)
    assert min(torch.dist(ctx[i], ctx[j]) for i in range(6) for j in range(i)) > 1e-2  # distinct prompts
    v = vae.load(toy_model)
    assert v.downsample == 2 and 0.1 < v.scaling_factor < 10
    rng = np.random.default_rng(123)  # images the VAE never saw
    prompts = [p for p in toy.PROMPTS for _ in range(4)]
    x = torch.from_numpy(np.stack([toy.random_image(p, rng) for p in prompts])).permute(0, 3, 1, 2)  # (B, 3, H, W)
    with torch.no_grad():
        z = v.encode(x * 2 - 1)
        rec = (v.decode(z) / 2 + 0.5).clamp(0, 1)
    assert z.shape == (len(prompts), 4, demo.LATENT, demo.LATENT)
    assert (z * v.scaling_factor).std().item() == pytest.approx(1.0, abs=0.25)
    assert torch.mean((rec - x) ** 2).item() < 0.01  # stated bound: mean squared error < 0.01 on [0, 1] pixels
    assert toy.fidelity(rec, prompts).tolist() == [1.0] * len(prompts)
    assert (toy.area(rec) - toy.area(x)).abs().max().item() < 0.05
    pipe = sample.load(toy_model)
    pipe.progress = False
    out = pipe(toy.PROMPTS[:2], steps=2, guidance=3.0)
    assert out.shape == (2, 3, toy.SIZE, toy.SIZE)


def test_toy_model_is_a_diffusers_pipeline(toy_model):
    from diffusers import StableDiffusionXLPipeline
    import vae
    pipe = StableDiffusionXLPipeline.from_pretrained(toy_model)  # every component, with diffusers' own classes
    assert pipe.vae.config.scaling_factor == pytest.approx(vae.load(toy_model).scaling_factor)
    assert list(pipe.unet.config.block_out_channels) == demo.UNET_CONFIG["block_out_channels"]
    assert pipe.tokenizer(["a red circle"]).input_ids == pipe.tokenizer_2(["a red circle"]).input_ids


def run_demo(out_dir, *flags):
    """`python dpo.py [flags] --out_dir out_dir` in a subprocess: (its stdout, its last line, win rate, fidelity of
    the reference, fidelity of the DPO model), after checking it exited 0 with the demo's line last."""
    out = subprocess.run([sys.executable, "dpo.py", *flags, "--out_dir", str(out_dir)], cwd=ROOT,
                         capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-2000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("demo win_rate="), last
    vals = dict(kv.split("=") for kv in last.split()[1:])
    return (out.stdout, last, *(float(vals[k]) for k in ("win_rate", "fidelity_ref", "fidelity_dpo")))


@pytest.mark.slow
def test_demo_end_to_end_prints_the_readme_numbers(tmp_path):
    """The demo, then the README's evaluation command on its output: what they print is what the README says (a
    change that moves a number fails here until the README moves too)."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    stdout, last, w, f_ref, f_dpo = run_demo(tmp_path / "demo")
    assert w >= 0.7 and f_dpo >= 0.9 * f_ref, last
    assert os.path.isfile(tmp_path / "demo" / "grid.png")
    assert last in readme, last
    area = next(line for line in stdout.splitlines() if "mean shape area:" in line)
    ref, dpo_ = area.split("mean shape area: reference ")[1].split(";")[0].split(", DPO ")
    assert f"Mean shape area goes from {ref} to {dpo_}" in readme, area
    command = next(line for line in readme.splitlines() if line.startswith("python evaluate.py --model demo_out")
                   and "--eval_pairs" in line)
    printed = next(line for line in readme.splitlines() if line.startswith("#   eval pairs="))[len("#   "):]
    argv = command.replace("demo_out", str(tmp_path / "demo")).split()[1:]
    ev = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert ev.stdout.strip().splitlines()[-1] == printed


@pytest.mark.slow
def test_demo_under_torchrun_matches_one_process(tmp_path):
    """`torchrun dpo.py` runs the same demo: every rank takes part in both training stages (the SFT reference
    too), batches are split over the ranks, and the result line is the one process's (see the README)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "dpo.py", "--out_dir", str(tmp_path / "demo")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-2000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last == "demo win_rate=1.000 fidelity_ref=0.917 fidelity_dpo=0.948", last


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    """The demo rewrites data/, dpo/, ... inside --out_dir: a user's non-empty folder must be left untouched."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.txt").write_text("keep me")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "dpo.py"), "--out_dir", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"error: --out_dir {tmp_path} exists and is not a demo folder: the demo "
                                             "rewrites subfolders of its out_dir, so give it a new or empty folder"]
    assert (tmp_path / "data" / "precious.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------------------------------
# The flow demo (`python dpo.py --demo flow`): a toy FLUX.1-dev


@pytest.fixture(scope="module")
def toy_flux(tmp_path_factory):
    return demo.build_flux(str(tmp_path_factory.mktemp("toy") / "flux"), 50, seed=0, log=lambda m: None)


def test_toy_flux_loads_everywhere_with_short_prompts(toy_flux):
    """Every tool reads the toy FLUX folder; its T5 tokenizer caps prompts at 8 tokens (model_max_length), and a
    pipeline samples images of the world's size from it."""
    import clip
    import sample
    import vae
    u = families.load(toy_flux)
    assert u.prediction_type == "flow" and u.config["guidance_embeds"] and u.config["in_channels"] == 16
    te = clip.load(toy_flux)
    ctx, pooled = te.encode(toy.PROMPTS)
    assert te.family is families.FLUX and ctx.shape == (6, demo.T5_TOKENS, 32) and pooled.shape == (6, 32)
    assert min(torch.dist(ctx[i], ctx[j]) for i in range(6) for j in range(i)) > 1e-2  # distinct prompts
    assert clip.load(toy_flux, max_length=16).encode(toy.PROMPTS[:1])[0].shape == (1, 16, 32)  # asked for: no cap
    v = vae.load(toy_flux)
    assert v.shift_factor != 0 and 0.1 < v.scaling_factor < 10
    pipe = sample.load(toy_flux)
    pipe.progress = False
    out = pipe(toy.PROMPTS[:2], steps=2, guidance=3.5, height=toy.SIZE, width=toy.SIZE)
    assert out.shape == (2, 3, toy.SIZE, toy.SIZE)


def test_toy_flux_is_a_diffusers_flux_pipeline(toy_flux):
    """diffusers' FluxPipeline loads the folder with its own classes and, given max_sequence_length=8, makes the
    images our pipeline makes from the same initial latents."""
    from diffusers import FluxPipeline
    import sample
    pipe = FluxPipeline.from_pretrained(toy_flux)
    assert pipe.transformer.config.guidance_embeds and pipe.vae.config.shift_factor != 0
    ours = sample.load(toy_flux)
    ours.progress = False
    g = torch.Generator().manual_seed(0)
    latents = torch.randn((1, *ours.latent_shape(toy.SIZE, toy.SIZE)), generator=g)  # (1, 4, 8, 8)
    mine = ours(["a red circle"], steps=4, guidance=3.5, latents=latents, height=toy.SIZE, width=toy.SIZE)
    packed = latents.view(1, 4, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, 16, 16)  # FLUX's 2x2 packing
    theirs = pipe("a red circle", num_inference_steps=4, guidance_scale=3.5, latents=packed, height=toy.SIZE,
                  width=toy.SIZE, max_sequence_length=demo.T5_TOKENS, output_type="pt").images
    assert (mine - theirs).abs().max().item() < 2e-3


def test_demo_flag_refuses_a_model(tmp_path, capsys):
    """--demo builds its own toy model: with --model it is one clear line, nothing written."""
    import dpo
    with pytest.raises(SystemExit) as e:
        dpo.parse_args(["--demo", "flow", "--model", str(tmp_path / "m"), "--out_dir", str(tmp_path / "o")])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --demo flow builds its own toy model")
    assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_flow_demo_end_to_end_prints_the_readme_numbers(tmp_path):
    """`python dpo.py --demo flow`: FLUX's architecture trained by flow matching, then flow-DPO; its last line is
    the README's, with the issue's bounds (win rate >= 0.9, fidelity not below the reference's)."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    _, last, w, f_ref, f_dpo = run_demo(tmp_path / "flow", "--demo", "flow")
    assert w >= 0.9 and f_dpo >= f_ref, last
    assert os.path.isfile(tmp_path / "flow" / "dpo" / "transformer" / "config.json")
    assert f"`python dpo.py --demo flow` prints `{last}`" in readme, last
    lines = readme.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("python evaluate.py --model demo_out_flow"))
    argv = lines[i].replace("demo_out_flow", str(tmp_path / "flow")).split()[1:]
    ev = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert ev.stdout.strip().splitlines()[-1] == lines[i + 1][len("#   "):]


@pytest.mark.slow
def test_zimage_demo_end_to_end_prints_the_readme_numbers(tmp_path):
    """`python dpo.py --demo zimage`: a toy Z-Image (a Qwen3 text encoder) trained by flow matching, then flow-DPO;
    its last line is the README's, the issue's bounds (win rate >= 0.9, fidelity not below the reference's)."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    _, last, w, f_ref, f_dpo = run_demo(tmp_path / "zimage", "--demo", "zimage")
    assert w >= 0.9 and f_dpo >= f_ref, last
    assert os.path.isfile(tmp_path / "zimage" / "dpo" / "transformer" / "config.json")
    assert f"`{last}`" in readme, last


@pytest.mark.slow
def test_online_demo_end_to_end_prints_the_readme_numbers(tmp_path):
    """`python dpo.py --demo online`: from the reference, no labels, the area rule as the reward; its last line is
    the README's, with the issue's bounds (win rate >= 0.95, fidelity not below the reference's)."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    _, last, w, f_ref, f_dpo = run_demo(tmp_path / "on", "--demo", "online")
    assert w >= 0.95 and f_dpo >= f_ref, last
    assert os.path.isfile(tmp_path / "on" / "online" / "pairs.jsonl")
    assert os.path.isfile(tmp_path / "on" / "online" / "online_eval.png")
    assert f"`python dpo.py --demo online` prints `{last}`" in readme, last


@pytest.mark.slow
def test_rl_demos_end_to_end_print_the_readme_numbers(tmp_path):
    """`python dpo.py --demo grpo` and `--demo nft` (and online DPO at the same budget, `--demo online_flow`), from
    the flow demo's reference, the area rule as the reward: their last lines are the README's, with the issue's
    bounds (win rate >= 0.9, fidelity not below the reference's, the training reward up)."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    for name in ("grpo", "nft", "online_flow"):
        out, last, w, f_ref, f_dpo = run_demo(tmp_path / "rl", "--demo", name)
        assert w >= 0.9 and f_dpo >= f_ref, last
        first, final = map(float, re.search(r"training reward ([\d.]+) -> ([\d.]+)", out).groups())
        assert final > first, out[-2000:]
        assert f"`python dpo.py --demo {name}` prints `{last}`" in readme, last


# ----------------------------------------------------------------------------------------------------
# The Z-Image demo (`python dpo.py --demo zimage`): a toy Z-Image


def test_zimage_demo_builds_a_z_image_pipeline_and_runs_sft_then_dpo(tmp_path, monkeypatch, capsys):
    """The zimage demo in a small world (20 VAE steps, 48 pairs, 3 SFT and 2 DPO steps, one noise per prompt): its
    reference is a Z-Image folder whose tokenizer spells each prompt word as one token and which diffusers'
    ZImagePipeline samples as ours does (CFG on and off); the DPO transformer is saved and the demo's line is last."""
    import dpo
    import llm
    import sample
    from diffusers import ZImagePipeline
    world = dict(demo.Z_WORLD, vae_steps=20, sft_pairs=48, sft=dict(demo.Z_WORLD["sft"], max_steps=3, batch_size=4))
    _, build, defaults, ev, *rest = demo.DEMOS["zimage"]
    monkeypatch.setitem(demo.DEMOS, "zimage", (world, build, defaults, dict(ev, noises=1, steps=2), *rest))
    monkeypatch.setattr(demo, "DPO_PAIRS", 48)
    monkeypatch.setattr(demo, "HELDOUT_PAIRS", 8)
    dpo.main(["--demo", "zimage", "--out_dir", str(tmp_path), "--max_steps", "2", "--batch_size", "4"])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("demo win_rate=")
    base = str(tmp_path / "base")
    assert families.of(base) is families.of(str(tmp_path / "dpo" / "transformer")) is families.Z_IMAGE
    ids = llm.Tokenizer(os.path.join(base, "tokenizer"), llm.Z_IMAGE_MAX_LENGTH, llm.Z_IMAGE_TEMPLATE)(toy.PROMPTS)
    assert ids.shape == (6, 11)  # the chat template's 8 tokens and 3 words
    ours, theirs = sample.load(base), ZImagePipeline.from_pretrained(base)
    ours.progress = False
    theirs.set_progress_bar_config(disable=True)
    latents = torch.randn((2, *ours.latent_shape(toy.SIZE, toy.SIZE)), generator=torch.Generator().manual_seed(0))
    for g in (0.0, 1.5):
        mine = ours(toy.PROMPTS[:2], steps=3, guidance=g, latents=latents, height=toy.SIZE, width=toy.SIZE)
        want = theirs(toy.PROMPTS[:2], num_inference_steps=3, guidance_scale=g, latents=latents, height=toy.SIZE,
                      width=toy.SIZE, output_type="pt").images
        assert (mine - want).abs().max().item() < 1e-4, g
