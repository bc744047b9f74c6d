"""--quantize: a LoRA run's frozen base (and text encoders) loaded straight into fp8 / int8 / nf4 (weights.load_module
through kernels.quantized_linear), eq. 14 at log 2 (the reference is the same quantized base), resume bit-exact,
2 ranks = 1 rank, the LoRA file loadable by diffusers' bf16 pipeline, and bad input in one line."""
import json
import os
import subprocess
import sys

import pytest
import torch

import clip
import families
import flux
import kernels
import lora
import tiny
from tiny import cli_error, run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def flux64(tmp_path_factory):
    """A tiny FLUX.1-dev pipeline of width 64: every Linear of the transformer but two can be stored in nf4."""
    return tiny.make_flux(str(tmp_path_factory.mktemp("flux64")), head_dim=32)


def inputs(seed=0):
    """(x, t, context, pooled, guidance) for our Flux."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 8, 8, generator=g)
    ctx, pooled = torch.randn(1, 5, tiny.T5_WIDTH, generator=g), torch.randn(1, 32, generator=g)
    return x, torch.tensor([500.0]), ctx, pooled, torch.full((1,), 3.5)


@pytest.mark.parametrize("fmt,tol", [("fp8", 0.08), ("int8", 0.02), ("nf4", 0.2)])
def test_load_quantizes_each_linear_from_the_checkpoint(flux64, fmt, tol):
    """Each stored Linear holds exactly kernels.quantize of its checkpoint weight (in the load dtype); the layers the
    format cannot store stay Linears; the model computes what the full-precision one does, within the format's error."""
    full = families.load(flux64)
    q = families.load(flux64, quantize=fmt)
    layers = {n: m for n, m in q.named_modules() if isinstance(m, kernels.QuantLinear)}
    kept = [n for n, m in q.named_modules() if type(m) is torch.nn.Linear]
    linears = {n: m for n, m in full.named_modules() if type(m) is torch.nn.Linear}
    assert len(layers) + len(kept) == len(linears) and len(layers) >= len(linears) - 2
    assert all(linears[n].in_features % 64 for n in kept)  # only what nf4 cannot store
    for name, m in layers.items():
        want = kernels.quantize(linears[name].weight, fmt).dequantize()
        assert torch.equal(m.weight.dequantize(), want), name
        assert (m.bias is None) == (linears[name].bias is None)
        if m.bias is not None:
            assert torch.equal(m.bias, linears[name].bias)
    assert "transformer_blocks.0.attn.to_q.weight" not in q.state_dict()  # the codes are not the checkpoint's weight
    with torch.no_grad():
        a, b = full(*inputs()), q(*inputs())
    err = ((a - b).norm() / a.norm()).item()
    assert 0 < err < tol, err


def test_text_encoders_quantized(flux64):
    """clip.load(quantize=): CLIP-L's and T5's Linears in the format; the embeddings close to the full ones."""
    full, q = clip.load(flux64), clip.load(flux64, quantize="int8")
    n = sum(isinstance(m, kernels.QuantLinear) for m in q.modules())
    assert n == sum(type(m) is torch.nn.Linear for m in full.modules()) and n > 0
    with torch.no_grad():
        (ca, pa), (cb, pb) = full.encode(["a red circle", "a dog"]), q.encode(["a red circle", "a dog"])
    assert 0 < ((ca - cb).norm() / ca.norm()).item() < 0.03
    assert 0 < ((pa - pb).norm() / pa.norm()).item() < 0.03


@pytest.mark.parametrize("fmt,dtype", [("nf4", "fp32"), ("fp8", "bf16"), ("int8", "fp32")])
def test_quantized_lora_starts_at_log2_and_resumes_exactly(tmp_path, flux64, jsonl, fmt, dtype):
    """Eq. 14's log 2 at step 0 (policy = reference = the quantized base), then a run cut at step 2 and resumed
    computes what the uninterrupted one does, bit for bit, and writes the same adapters."""
    flags = ("--lora", "4", "--quantize", fmt, "--dtype", dtype, "--lr", "1e-3", "--ckpt_every", "2")
    full = run(tmp_path / "full", flux64, jsonl, *flags, steps=3)
    assert full[0]["loss"] == pytest.approx(0.693147, abs=1e-6) and full[0]["model_mse"] == full[0]["ref_mse"]
    assert full[-1]["loss"] != full[0]["loss"]
    run(tmp_path / "cut", flux64, jsonl, *flags, steps=2)
    resumed = run(tmp_path / "cut", flux64, jsonl, *flags, "--resume", steps=3)
    keys = ("step", "loss", "implicit_acc", "model_mse", "ref_mse", "grad_norm")
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in full]
    a, b = (lora.read(str(tmp_path / n), "transformer.") for n in ("full", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k][i], b[k][i]) for k in a for i in (0, 1))


def test_lora_of_a_quantized_base_loads_in_the_bf16_pipeline(tmp_path, flux64, jsonl):
    """The adapters trained on the nf4 base, saved as without --quantize: diffusers' FluxPipeline (the bf16 base)
    loads them and computes what out_dir/transformer (the full base + B A) computes."""
    run(tmp_path, flux64, jsonl, "--lora", "4", "--quantize", "nf4", "--lr", "1e-2")
    from diffusers import FluxPipeline, FluxTransformer2DModel
    pipe = FluxPipeline.from_pretrained(flux64)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    merged = FluxTransformer2DModel.from_pretrained(str(tmp_path / "transformer"))
    base = FluxTransformer2DModel.from_pretrained(flux64, subfolder="transformer")
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 16, 64, generator=g), torch.randn(1, 5, tiny.T5_WIDTH, generator=g)
    pooled, ids = torch.randn(1, 32, generator=g), flux.position_ids(0, 4, 4, "cpu").float()

    def out(m):
        with torch.no_grad():
            return m(x, ctx, pooled, torch.tensor([0.5]), ids, torch.zeros(5, 3), torch.full((1,), 3.5)).sample
    assert (out(pipe.transformer) - out(merged)).abs().max() < 1e-4
    assert (out(merged) - out(base)).abs().max() > 1e-3


def test_two_ranks_match_one_rank(tmp_path, flux64, jsonl):
    """DDP and FSDP over 2 ranks x 1 pair = 1 rank x 2 pairs with an nf4 base (its codes are buffers, each rank's
    own: DDP does not broadcast them, FSDP does not shard them), and the same adapters."""
    flags = ["--lora", "4", "--quantize", "nf4", "--device", "cpu"]
    one = run(tmp_path / "one", flux64, jsonl, *flags, steps=2)
    common = ["--model", flux64, "--data", jsonl, "--resolution", "32", "--grad_accum", "2", "--max_steps", "2",
              "--log_every", "1", "--lr", "1e-4", "--warmup", "0", "--batch_size", "1", *flags]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(tiny.ROOT, "tests", "ddp_runs.py"), *common, "::", "--out_dir",
                        str(tmp_path / "ddp"), "::", "--out_dir", str(tmp_path / "fsdp"), "--fsdp"],
                       env=tiny.ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("ddp", "fsdp"):
        two = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
        assert len(two) == 2
        for a, b in zip(one, two):
            for k in ("loss", "model_mse", "ref_mse", "implicit_acc"):
                assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (name, k, a, b)
            assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * a["grad_norm"], name
        mine, theirs = (lora.read(str(tmp_path / n), "transformer.") for n in ("one", name))
        assert mine.keys() == theirs.keys()
        d = torch.cat([(mine[k][1] - theirs[k][1]).flatten() for k in mine])
        ref = torch.cat([mine[k][1].flatten() for k in mine])
        assert d.norm() <= 1e-3 * ref.norm(), name  # (Adam turns rounding-sized gradients into lr-sized steps)


def test_bad_input_one_line(tmp_path, flux64, jsonl, capsys):
    import dpo
    common = ["--model", flux64, "--data", jsonl, "--resolution", "32", "--max_steps", "1", "--grad_accum", "1"]
    err = cli_error(dpo.main, common + ["--out_dir", str(tmp_path / "a"), "--quantize", "nf4"], capsys)
    assert "--quantize" in err and "--lora" in err and "log 2" in err
    err = cli_error(dpo.main, common + ["--out_dir", str(tmp_path / "b"), "--lora", "4", "--quantize", "nf8"], capsys)
    assert "--quantize" in err and "nf4" in err
    run(tmp_path / "c", flux64, jsonl, "--lora", "4", "--quantize", "nf4", steps=1)
    before = (tmp_path / "c" / "checkpoint.pt").stat().st_mtime
    err = cli_error(dpo.main, ["--model", flux64, "--data", jsonl, "--out_dir", str(tmp_path / "c"), "--resolution",
                               "32", "--batch_size", "2", "--grad_accum", "2", "--max_steps", "2", "--log_every", "1",
                               "--lr", "1e-4", "--warmup", "0", "--lora", "4", "--quantize", "int8", "--resume"],
                    capsys)
    assert err == "error: --resume with flags that change the run: --quantize nf4 -> int8; use a new --out_dir"
    assert (tmp_path / "c" / "checkpoint.pt").stat().st_mtime == before
    with pytest.raises(ValueError, match="nf4 needs in_features divisible by 64"):
        kernels.quantize(torch.zeros(8, 96), "nf4")


def test_offload_encoders(tmp_path, flux64, jsonl, capsys, monkeypatch):
    """--offload_encoders: the encoders are loaded on the CPU and brought to the run's device for each batch only
    (cache.on_device), the run computing what it computes without; refused online, in one line."""
    import cache
    import dpo
    moves = []

    class Moved(torch.nn.Module):
        def to(self, dev):
            moves.append(str(dev))
            return self
    with cache.on_device([Moved()], "cuda:1"):
        assert moves == ["cuda:1"]
    assert moves == ["cuda:1", "cpu"]
    calls = []
    on_device = cache.on_device

    def spy(models, dev):
        calls.append(len(list(models)))
        return on_device(models, dev)
    monkeypatch.setattr(cache, "on_device", spy)
    flags = ("--lora", "4", "--quantize", "int8", "--lr", "1e-3")
    off = run(tmp_path / "off", flux64, jsonl, *flags, "--offload_encoders", steps=2)
    assert calls == [2] * 4  # (text encoders, VAE) for each of the 2 x 2 micro-batches
    on = run(tmp_path / "on", flux64, jsonl, *flags, steps=2)
    assert [r["loss"] for r in off] == [r["loss"] for r in on]
    err = cli_error(dpo.main, ["--model", flux64, "--online", "--prompts", str(tmp_path / "p.txt"), "--score",
                               "area", "--out_dir", str(tmp_path / "o"), "--offload_encoders"], capsys)
    assert "--offload_encoders" in err and "offline" in err
    err = cli_error(dpo.main, ["--model", flux64, "--data", jsonl, "--cache", "--out_dir", str(tmp_path / "c"),
                               "--offload_encoders"], capsys)  # a cached run loads no encoder: nothing to move
    assert "with --cache (or no --data) the run loads none: drop --offload_encoders" in err
    assert not os.path.exists(tmp_path / "c")


@pytest.mark.parametrize("loss", ["dpo", "grpo"])
def test_online_runs_on_a_quantized_base(tmp_path, flux64, loss):
    """Online DPO and GRPO sample and train with the nf4 base (its text encoders quantized with it): at step 1 the
    policy is its reference (online DPO: the same velocity errors; GRPO: every ratio 1, nothing clipped), and both
    resume exactly."""
    from test_online import PROMPTS
    from test_rl import run as online_run
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    common = ("--loss", loss, "--lora", "4", "--quantize", "nf4", "--samples_per_prompt", "3", "--sample_steps", "3",
              "--batch_size", "2", "--ckpt_every", "1")
    full = online_run(tmp_path / "full", flux64, str(prompts), *common, steps=2)
    if loss == "dpo":
        assert full[0]["model_mse"] == full[0]["ref_mse"]
    else:
        assert full[0]["clip_frac"] == 0
    assert full[-1]["loss"] != full[0]["loss"]
    online_run(tmp_path / "cut", flux64, str(prompts), *common, steps=1)
    cut = online_run(tmp_path / "cut", flux64, str(prompts), *common, "--resume", steps=2)
    assert [r["loss"] for r in cut] == [r["loss"] for r in full]


def test_a_format_that_stores_no_layer_of_the_model_is_refused():
    import dpo
    with pytest.raises(ValueError, match="--quantize nf4: no Linear layer of this model can be stored in it"):
        dpo.build_models(lambda dtype, q=None: torch.nn.Sequential(torch.nn.Linear(48, 8)), torch.float32, 4,
                         quantize="nf4")
