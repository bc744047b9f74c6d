"""online.py / dpo.py --online: pairs as documented, the online loss = the offline loss on the pairs it wrote,
resume bit-exact, 2 ranks = 1 rank, the reference refresh, and bad input in one line."""
import json
import os
import subprocess
import sys

import pytest
import torch

import cache
import data
import dpo
import families
import online
import tiny
from tiny import ROOT

ENV = dict(os.environ, OMP_NUM_THREADS="1")
PROMPTS = ["a red circle", "a blue square", "a green circle"]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return str(path)


def flags(out, model, prompts, *extra, steps=2):
    return ["--online", "--model", model, "--prompts", prompts, "--score", "area", "--samples_per_prompt", "3",
            "--out_dir", str(out), "--resolution", "32", "--batch_size", "2", "--max_steps", str(steps),
            "--log_every", "1", "--lr", "1e-4", "--warmup", "0", "--device", "cpu", "--sample_steps", "2",
            "--eval_n", "3", "--beta", "100", *extra]


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def models(args, fam=families.SDXL):
    """The policy and the reference as dpo.train builds them from args (on the CPU)."""
    source = lambda dtype: fam.load(args.model, "cpu", dtype, torch.float32)  # noqa: E731
    return dpo.build_models(source, args.amp_dtype, args.lora, args.lora_alpha, fam.lora_targets, args.seed,
                            args.loss in dpo.REFERENCE_FREE, args.gradient_checkpointing)[:2]


def test_pairs_from_a_score_table():
    """best_worst: one (best, worst) per prompt, ties to the first index; margin: every pair beyond the threshold,
    the higher score first, and the best-worst pair when none is."""
    s = torch.tensor([0.2, 0.9, 0.1, 0.9])
    assert online.make_pairs(s) == [(1, 2)]
    assert online.make_pairs(s, "margin", 0.5) == [(1, 0), (3, 0), (1, 2), (3, 2)]
    assert online.make_pairs(s, "margin", 0.0) == [(1, 0), (0, 2), (3, 0), (1, 2), (3, 2)]  # 0.9 = 0.9: no pair
    assert online.make_pairs(torch.tensor([0.5, 0.5, 0.5]), "margin", 0.1) == [(0, 1)]  # none: best-worst
    assert online.make_pairs(torch.tensor([0.5, 0.5])) == [(0, 1)]


def test_online_loss_is_the_offline_loss_on_the_pairs_written(tmp_path, sdxl_dir, prompts, one_thread):
    """One online micro-batch and the same pairs read back from pairs.jsonl as offline data (the same positions,
    so the same crop, flip, t and eps): the same pixels and the same loss, for DPO and for a second objective."""
    args = dpo.parse_args(flags(tmp_path, sdxl_dir, prompts, "--no_flip"))
    args = dpo.resolve(args, families.SDXL, 1, "cpu", 32)
    dpo.parallel.setup("cpu")
    policy, ref = models(args)
    feed = online.Feed(args, families.SDXL, policy, ref, 4, torch.device("cpu"), 0, 1, print)
    feed.eval_every = 10 ** 6  # no held-out check here
    b_on = feed.batch([0, 1], 0)
    feed.after_step(1)  # writes pairs.jsonl
    rows = [json.loads(line) for line in open(tmp_path / "pairs.jsonl")]
    assert [r["caption"] for r in rows] == b_on["caption"] and all(r["score_0"] >= r["score_1"] for r in rows)
    pairs = data.Preferences(str(tmp_path / "pairs.jsonl"))
    ds = cache.PreferenceDataset(pairs, 32, args.seed, False, False)
    assert len(pairs) == 2  # no ties among them (the tiny model's images differ in area)
    items = [dict(pos=pos, **ds.read(lambda k, i=i: i, pos)) for i, pos in enumerate(b_on["pos"].tolist())]
    b_off = data.collate(items)
    assert torch.equal(b_on["pixels"], b_off["pixels"])
    ac = dpo.diffusion.alphas_cumprod(dpo.diffusion.scheduler_config(sdxl_dir, families.SDXL, "epsilon"))
    for loss in ("dpo", "ipo"):
        args.loss = loss
        losses = []
        for b in (b_on, b_off):
            inputs = dpo.micro_batch(b, feed, args.seed, args.prompt_dropout, len(ac), torch.device("cpu"))
            losses.append(dpo.pair_loss(policy, ref, inputs, dpo.objective(loss, args.beta), "epsilon", ac)[0])
        assert torch.equal(losses[0], losses[1]), (loss, losses)


def test_resume_is_bit_exact_and_pairs_are_rewritten(tmp_path, sdxl_dir, prompts, one_thread):
    full = tmp_path / "full"
    dpo.main(flags(full, sdxl_dir, prompts, "--ckpt_every", "2", steps=4))
    cut = tmp_path / "cut"
    dpo.main(flags(cut, sdxl_dir, prompts, "--ckpt_every", "2", steps=2))
    with open(cut / "pairs.jsonl", "a") as f:  # as if killed after writing a step the checkpoint does not hold
        f.write(json.dumps(dict(caption="x", image_0="a", image_1="b", label_0=1.0, step=2)) + "\n")
    dpo.main(flags(cut, sdxl_dir, prompts, "--ckpt_every", "2", "--resume", steps=4))
    keys = ("step", "loss", "model_mse", "ref_mse", "grad_norm", "score_mean", "score_margin")
    assert [[r[k] for k in keys] for r in metrics(cut)] == [[r[k] for k in keys] for r in metrics(full)]
    assert open(cut / "pairs.jsonl").read() == open(full / "pairs.jsonl").read()
    a = families.load(str(full / "unet")).state_dict()
    b = families.load(str(cut / "unet")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    hist = json.load(open(cut / "online_eval.json"))
    assert [h["step"] for h in hist] == [0, 1, 2, 3, 4] and hist[0]["win"]["area"] == 0.5
    assert os.path.isfile(cut / "online_eval.png")


def test_reference_free_objectives_resume(tmp_path, sdxl_dir, prompts, one_thread):
    """SFT and MaPO build no reference: a resumed run's held-out base is the base loaded again (LoRA: the adapters
    off), and its checks go on from the checkpoint's."""
    for loss, extra in (("sft", ()), ("mapo", ("--lora", "2"))):
        out = tmp_path / loss
        dpo.main(flags(out, sdxl_dir, prompts, "--loss", loss, "--ckpt_every", "1", *extra, steps=2))
        dpo.main(flags(out, sdxl_dir, prompts, "--loss", loss, "--ckpt_every", "1", "--resume", *extra, steps=3))
        assert [r["step"] for r in metrics(out)] == [1, 2, 3]
        assert [h["step"] for h in json.load(open(out / "online_eval.json"))] == [0, 1, 2, 3]


def test_two_ranks_match_one_rank(tmp_path, sdxl_dir, prompts):
    """The same global batch (2 prompts per step) on 1 rank x 2 and 2 ranks x 1: the same samples and pairs (each
    prompt sampled alone, its noise keyed by position), the same losses and gradients."""
    dpo.main(flags(tmp_path / "one", sdxl_dir, prompts, steps=2))
    common = flags(tmp_path / "two", sdxl_dir, prompts, steps=2)
    common[common.index("--batch_size") + 1] = "1"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(ROOT, "dpo.py"), *common], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert open(tmp_path / "one" / "pairs.jsonl").read() == open(tmp_path / "two" / "pairs.jsonl").read()
    for a, b in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two")):
        for k in ("loss", "model_mse", "ref_mse", "score_mean", "score_margin"):
            assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (k, a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * a["grad_norm"]


def test_reference_refresh_copies_the_policy_at_step_n_only(tmp_path, sdxl_dir, prompts, one_thread):
    args = dpo.resolve(dpo.parse_args(flags(tmp_path, sdxl_dir, prompts, "--ref_update", "2", "--ckpt_every", "2",
                                            "--no-save_pairs", steps=4)), families.SDXL, 1, "cpu", 32)
    dpo.parallel.setup("cpu")
    policy, ref = models(args)
    feed = online.Feed(args, families.SDXL, policy, ref, 4, torch.device("cpu"), 0, 1, print)
    feed.eval_every = 10 ** 6  # the refresh alone
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01)
    feed.after_step(1)
    assert all(torch.equal(before[k], v) for k, v in ref.state_dict().items())  # not before step N
    feed.after_step(2)
    pol = policy.state_dict()
    assert all(torch.equal(pol[k].to(v.dtype), v) for k, v in ref.state_dict().items())  # exactly at step N
    assert not all(torch.equal(before[k], v) for k, v in ref.state_dict().items())


@pytest.mark.parametrize("extra,message", [
    (["--prompts", None], "error: --online needs --prompts FILE (one prompt per line) or --prompts parti"),
    (["--samples_per_prompt", "1"], "error: --samples_per_prompt must be >= 2 (a pair needs two images), got 1"),
    (["--data", "x.jsonl"], "error: --online makes its own pairs: drop --data (or --online to train on it)"),
    (["--prompts", "EMPTY"], "no prompts"),
    (["--score", "pickscore=/no/such/folder"], "error: pickscore: no such file or folder: /no/such/folder"),
])
def test_bad_online_input_is_one_line(tmp_path, sdxl_dir, prompts, capsys, extra, message):
    argv = flags(tmp_path / "out", sdxl_dir, prompts)
    if extra[0] == "--prompts":
        i = argv.index("--prompts")
        if extra[1] is None:
            del argv[i:i + 2]
        else:
            (tmp_path / "empty.txt").write_text("\n \n")
            argv[i + 1] = str(tmp_path / "empty.txt")
    elif extra[0] == "--score":
        argv[argv.index("--score") + 1] = extra[1]
    else:
        argv += extra
    err = tiny.cli_error(dpo.main, argv, capsys)
    assert message in err
    assert not os.path.exists(tmp_path / "out" / "pairs")  # nothing sampled, nothing written


@pytest.mark.parametrize("family", ["sd15", "sd3", "flux", "qwen_image", "z_image"])
def test_online_trains_every_family(tmp_path, prompts, request, one_thread, family):
    """SD1.5, SD3 (CFG with its negative), FLUX-dev (its guidance input), Qwen-Image and Z-Image (a language model's
    states and their mask, Z-Image's own CFG) sample through the same loop: a run
    leaves its denoiser (unet/ or transformer/) and the pairs it trained on; step 0's loss is log 2 (0: a tie)."""
    model = request.getfixturevalue(f"{family}_dir")
    dpo.main(flags(tmp_path, model, prompts, "--samples_per_prompt", "2", "--batch_size", "1", steps=2))
    m = metrics(tmp_path)
    rows = [json.loads(line) for line in open(tmp_path / "pairs.jsonl")]
    trained = sum(r["label_0"] == 1.0 for r in rows if r["step"] == 0)  # a tie (label 0.5) trains nothing
    assert abs(m[0]["loss"] - 0.6931 * trained) < 1e-3 and len(m) == 2
    assert os.path.isfile(tmp_path / ("unet" if family == "sd15" else "transformer") / "config.json")
    assert len(rows) == 2 and all(os.path.isfile(tmp_path / r["image_0"]) for r in rows)


def test_fsdp_with_a_reference_refresh_matches_ddp(tmp_path, sdxl_dir, prompts):
    """2 ranks, --ref_update 1: FSDP (the sharded policy samples, the sharded reference copied shard by shard)
    trains as DDP does (tests/ddp_runs.py runs both in one torchrun)."""
    common = flags(tmp_path / "x", sdxl_dir, prompts, "--ref_update", "1", "--ckpt_every", "2", steps=3)
    common[common.index("--batch_size") + 1] = "1"
    i = common.index("--out_dir")
    del common[i:i + 2]
    argv = ["::", "--out_dir", str(tmp_path / "ddp"), "::", "--fsdp", "--out_dir", str(tmp_path / "fsdp")]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(ROOT, "tests", "ddp_runs.py"), *common, *argv], env=ENV, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "reference = the policy at step 2" in r.stdout
    a, b = metrics(tmp_path / "ddp"), metrics(tmp_path / "fsdp")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        for k in ("loss", "model_mse", "ref_mse", "score_mean"):
            assert abs(x[k] - y[k]) <= 1e-4 * max(1.0, abs(x[k])), (k, x, y)
    rows = [[json.loads(line)["caption"] for line in open(tmp_path / d / "pairs.jsonl")] for d in ("ddp", "fsdp")]
    assert rows[0] == rows[1] and len(rows[0]) == 6


# ----------------------------------------------------------------------------------------------------
# Runs to trust (issue 32): bad rewards stop a run, flags that would be ignored or would break a resume are refused


@pytest.mark.parametrize("extra,message", [
    (["--score", "area,weight=nan"], "error: --score area: weight=nan is not a finite number"),
    (["--score", "area,weight=0"], "error: --score: every weight is 0, so every image would score 0"),
    (["--score", "area", "--score", "area,weight=2"], "error: --score / --eval_score: each kind once"),
    (["--eval_score", "area"], "error: --score / --eval_score: each kind once (scores are keyed by kind), got area, "
                               "area"),
    (["--ref_update", "2", "--ckpt_every", "2"], "error: --max_steps 3 must be a multiple of --ref_update 2"),
])
def test_rewards_that_cannot_rank_are_refused(tmp_path, sdxl_dir, prompts, capsys, extra, message):
    """A non-finite or all-zero weight, a scorer kind given twice (one would be dropped, or two columns merged), a
    last checkpoint a longer run could not resume from: one line, nothing written."""
    argv = flags(tmp_path / "out", sdxl_dir, prompts, steps=3)
    if extra[0] == "--score":
        i = argv.index("--score")
        del argv[i:i + 2]
    assert tiny.cli_error(dpo.main, argv + extra, capsys).startswith(message)
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("flag", [["--samples_per_prompt", "3"], ["--eval_n", "8"], ["--pairs", "margin"],
                                  ["--sample_steps", "4"], ["--no-save_pairs"]])
def test_online_flags_offline_are_refused(tmp_path, sdxl_dir, jsonl, capsys, flag):
    """Set without --online they would be ignored without a word."""
    argv = ["--model", sdxl_dir, "--data", jsonl, "--out_dir", str(tmp_path / "o"), *flag]
    assert tiny.cli_error(dpo.main, argv, capsys) == f"error: {flag[0]} is an online flag: add --online (or drop it)" \
        .replace("--no-save_pairs", "--save_pairs")


def test_a_scorer_giving_nan_stops_the_run_and_flat_rewards_are_said(tmp_path, sdxl_dir, prompts, capsys,
                                                                     monkeypatch, one_thread):
    """Scores all alike for NO_SIGNAL_STEPS steps: the log says the reward no longer tells the samples apart. A
    NaN score: one line naming the scorer, the last checkpoint kept, no NaN in any JSON file."""
    import toy
    monkeypatch.setattr(online, "NO_SIGNAL_STEPS", 2)
    monkeypatch.setattr(toy, "area", lambda images, prompts: torch.ones(len(images)))
    dpo.main(flags(tmp_path / "flat", sdxl_dir, prompts, steps=2))
    assert "online: WARNING: for 2 steps every prompt's 3 samples scored alike" in capsys.readouterr().out
    step = iter(range(10 ** 6))
    monkeypatch.setattr(toy, "area", lambda images, prompts: torch.full((len(images),), 0.5 if next(step) < 4 else
                                                                        float("nan")))
    err = tiny.cli_error(dpo.main, flags(tmp_path / "nan", sdxl_dir, prompts, "--ckpt_every", "1", steps=4), capsys)
    assert err.startswith("error: --score area gave ") and "non-finite score(s) in step 2: stopped (the last " \
        "checkpoint is kept)" in err
    assert torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=True)["step"] == 1
    for name in ("online_eval.json", "pairs.jsonl"):
        text = open(tmp_path / "nan" / name).read()
        assert "NaN" not in text and "Infinity" not in text


def test_resume_refuses_other_held_out_checks_and_says_prompts(tmp_path, sdxl_dir, prompts, capsys, one_thread):
    """A resumed run's held-out history is one series: another --eval_score or --eval_n is refused up front; an
    edited prompts file is named as --prompts. A finished run resumed writes its chart and verdict again (a run cut
    short at its very end may not have)."""
    out, prompts = tmp_path / "run", str(tmp_path / "prompts.txt")
    open(prompts, "w").write("\n".join(PROMPTS) + "\n")
    dpo.main(flags(out, sdxl_dir, prompts, "--ckpt_every", "1", steps=2))
    os.remove(out / "online_eval.png")
    capsys.readouterr()
    dpo.main(flags(out, sdxl_dir, prompts, "--resume", steps=2))
    said = capsys.readouterr().out
    assert "nothing to do" in said and "held-out win rate vs base (step 0 -> 2): area" in said
    assert os.path.isfile(out / "online_eval.png")
    clip_dir = tiny.make_clip(str(tmp_path / "clip"), "gelu")[0]
    capsys.readouterr()  # (transformers' progress bars)
    for extra, message in ((["--eval_score", f"clip={clip_dir}"], "--eval_score [] -> ["), (["--eval_n", "2"],
                                                                                          "--eval_n 3 -> 2")):
        err = tiny.cli_error(dpo.main, flags(out, sdxl_dir, prompts, "--resume", *extra, steps=3), capsys)
        assert err.startswith("error: --resume with flags that change the run: ") and message in err
    open(prompts, "w").write("\n".join(PROMPTS[:2]) + "\n")  # the same file, edited
    err = tiny.cli_error(dpo.main, flags(out, sdxl_dir, prompts, "--resume", steps=3), capsys)
    assert err.startswith(f"error: --resume with other --prompts: {out / 'checkpoint.pt'} was trained on {prompts} "
                          "(1 file(s), 3 prompts")


def test_a_large_group_is_sampled_and_scored_in_calls_of_sample_batch(tmp_path, sdxl_dir, prompts, monkeypatch,
                                                                      one_thread):
    """K sets the group, --sample_batch the calls: K = 5 in calls of at most 2, the pairs as one call makes them."""
    sizes = []
    generate = online.Feed.generate
    monkeypatch.setattr(online.Feed, "generate", lambda self, unet, p, noise, *steps: sizes.append(len(p)) or
                        generate(self, unet, p, noise, *steps))
    dpo.main(flags(tmp_path / "chunks", sdxl_dir, prompts, "--samples_per_prompt", "5", "--sample_batch", "2",
                   steps=1))
    assert max(sizes) == 2 and sum(sizes) >= 2 * 5
    dpo.main(flags(tmp_path / "one", sdxl_dir, prompts, "--samples_per_prompt", "5", steps=1))
    a, b = ([json.loads(line) for line in open(tmp_path / d / "pairs.jsonl")] for d in ("chunks", "one"))
    assert [(r["caption"], r["image_0"]) for r in a] == [(r["caption"], r["image_0"]) for r in b]
    assert all(abs(x["score_0"] - y["score_0"]) < 1e-3 for x, y in zip(a, b))
