"""objectives.py: IPO / hinge / MaPO / KTO / RPO (both forms, and its weights) against formulas written out
independently (value and gradient, fp64 by hand), RPO = DPO on one pair; each objective on every data path and
under DDP; single-image data for KTO."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import numpy as np
import torch.nn.functional as F

import data
import dpo
import objectives
import tiny
from tiny import ENV, ROOT, run, write_parquet


pytestmark = pytest.mark.usefixtures("one_thread")


def _grad(fn, model):
    x = model.clone().double().requires_grad_(True)
    fn(x).backward()
    return x.grad


def _check(ours, theirs, model):
    """The loss and its gradient with respect to the policy's predictions, ours against the written-out formula."""
    x = model.clone().requires_grad_(True)
    loss = ours(x)
    loss.backward()
    want = theirs(model.double().clone().requires_grad_(False))
    g_want = _grad(theirs, model)
    assert abs(loss.item() - want.item()) < 1e-6 * max(1.0, abs(want.item())), (loss.item(), want.item())
    assert (x.grad.double() - g_want).abs().max() < 1e-5 * g_want.abs().max()


@pytest.mark.parametrize("form", ["ipo", "hinge"])
def test_ipo_and_hinge_by_hand(form):
    model, ref, noise = tiny.preds(B=4)
    beta, B = 40.0, 4
    e = torch.cat([noise, noise]).double()

    def theirs(x):
        m = ((x - e) ** 2).flatten(1).mean(1)
        r = ((ref.double() - e) ** 2).flatten(1).mean(1)
        h = -0.5 * ((m[:B] - m[B:]) - (r[:B] - r[B:]))  # the log-likelihood-ratio margin, official convention
        if form == "ipo":  # Azar et al.: (h - 1/(2 tau))^2 with tau = beta
            return ((h - 1 / (2 * beta)) ** 2).mean()
        return torch.clamp(1 - beta * h, min=0).mean()  # max(0, 1 - beta h)
    _check(lambda x: getattr(objectives, form)(x, ref, noise, {}, beta)[0], theirs, model)


def test_mapo_by_hand():
    model, _, noise = tiny.preds(B=4, seed=1)
    beta, T, w, B = 0.1, 1000, 0.5, 4
    target = torch.cat([noise, noise])

    def theirs(x):
        m = ((x - target.double()) ** 2).flatten(1).mean(1)
        s = w * m / (torch.exp(w * m) - 1)
        return m[:B].mean() - beta * torch.log(torch.sigmoid(T * (s[:B] - s[B:]))).mean()
    _check(lambda x: objectives.mapo(x, None, noise, {"T": T}, beta)[0], theirs, model)


@pytest.mark.parametrize("shift", [0.0, 0.05])  # 0.05: the batch's mean reward > 0, so the reference point is used
def test_kto_by_hand(shift):
    model, ref, noise = tiny.preds(B=4, seed=2)
    target = torch.cat([noise, noise])
    ref = ref + shift * torch.randn_like(ref)  # a worse reference: positive rewards
    labels = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0])
    beta = 30.0

    def theirs(x):
        m = ((x - target.double()) ** 2).flatten(1).mean(1)
        r = ((ref.double() - target.double()) ** 2).flatten(1).mean(1)
        g = r - m
        z = max(0.0, g.detach().mean().item())
        h = torch.where(labels.bool(), torch.sigmoid(beta * (g - z)), torch.sigmoid(beta * (z - g)))
        return (1 - h).mean()
    _check(lambda x: objectives.kto(x, ref, noise, {"labels": labels}, beta)[0], theirs, model)


# ----------------------------------------------------------------------------------------------------
# Data: splits, the shuffle, single images


def test_kto_on_single_images_and_on_pairs(tmp_path, sdxl_dir, jsonl, capsys):
    src = [json.loads(line) for line in open(jsonl)]
    root = os.path.dirname(jsonl)
    singles = tmp_path / "singles.jsonl"
    with open(singles, "w") as f:  # each pair as two records, paths made absolute
        for r in src:
            for k, label in ((0, 1), (1, 0)):
                f.write(json.dumps({"caption": r["caption"], "image": os.path.join(root, r[f"image_{k}"]),
                                    "label": label}) + "\n")
    p = data.Preferences(str(singles))
    assert p.singles and len(p) == 18 and p.raw(0)[2] == 1 and len(p.raw(0)[1]) == 1
    m = run(tmp_path / "kto1", sdxl_dir, str(singles), "--loss", "kto", steps=2)
    assert abs(m[0]["loss"] - 0.5) < 1e-6 and all(math.isfinite(r["loss"]) for r in m)  # 1 - sigmoid(0) at step 0
    m = run(tmp_path / "kto2", sdxl_dir, jsonl, "--loss", "kto", "--cache", steps=2)  # pairs as two records
    assert abs(m[0]["loss"] - 0.5) < 1e-6
    for flags in ((), ("--cache",)):
        with pytest.raises(SystemExit):
            run(tmp_path / "dpo", sdxl_dir, str(singles), *flags, steps=1)
        err = capsys.readouterr().err.strip()
        assert err == f"error: {singles} holds single labelled images: train them with --loss kto"
        assert not (tmp_path / "dpo" / "cache").exists()  # refused before anything is written
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(singles.read_text().splitlines()[0] + "\n" + json.dumps(src[0]) + "\n")
    with pytest.raises(ValueError, match=rf"{mixed}:2: pairs and single images mixed in one file"):
        data.Preferences(str(mixed))


@pytest.mark.parametrize("loss", ["ipo", "hinge", "mapo", "kto", "rpo", "sft"])
def test_every_objective_on_every_data_path(tmp_path, sdxl_dir, sd15_dir, jsonl, loss):
    """JSONL images, the latent cache, parquet; SDXL and SD1.5. The step-0 loss is what the formula gives when
    the policy equals the reference."""
    at_zero = {"ipo": (1 / (2 * 5000.0)) ** 2, "hinge": 1.0, "kto": 0.5, "rpo": math.log(2)}
    pq = write_parquet(tmp_path / "a.parquet")
    for k, (model, data_path, flags) in enumerate([(sdxl_dir, jsonl, ()), (sdxl_dir, jsonl, ("--cache",)),
                                                   (sd15_dir, pq, ("--optimizer", "adamw"))]):
        m = run(tmp_path / f"run{k}", model, data_path, "--loss", loss, *flags, steps=2)
        assert all(math.isfinite(r["loss"]) for r in m) and len(m) == 2
        if loss in at_zero:
            assert m[0]["loss"] == pytest.approx(at_zero[loss], rel=1e-5)
    if loss == "mapo":  # reference-free: no second UNet
        assert "ref_mse" not in m[0] or m[0]["ref_mse"] is None


def test_every_objective_under_ddp_matches_one_process(tmp_path, sdxl_dir, jsonl):
    """One torchrun of 2 ranks x 1 pair trains each objective in turn (tests/ddp_runs.py); each equals the same
    objective on 1 rank x 2 pairs."""
    losses = ["ipo", "hinge", "mapo", "kto"]
    common = ["--model", sdxl_dir, "--data", jsonl, "--resolution", "32", "--grad_accum", "2", "--max_steps", "2",
              "--log_every", "1", "--lr", "1e-4", "--warmup", "0", "--device", "cpu", "--batch_size", "1"]
    runs = []
    for loss in losses:  # small beta: eq. 14 multiplies fp32 rounding of the MSEs by beta/2
        runs += ["::", "--loss", loss, "--beta", str(dpo.BETA[loss] * 0.02), "--out_dir", str(tmp_path / f"two_{loss}")]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(ROOT, "tests", "ddp_runs.py"), *common, *runs],
                       env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for loss in losses:
        beta = dpo.BETA[loss] * 0.02  # small beta: eq. 14 multiplies fp32 rounding of the MSEs by beta/2
        one = run(tmp_path / f"one_{loss}", sdxl_dir, jsonl, "--device", "cpu", "--loss", loss, "--beta", str(beta),
                  steps=2)
        two = [json.loads(line) for line in open(tmp_path / f"two_{loss}" / "metrics.jsonl")]
        for a, b in zip(one, two):
            for k in ("loss", "model_mse"):
                assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (loss, k, a, b)
            assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * a["grad_norm"], (loss, a, b)


# ----------------------------------------------------------------------------------------------------
# The official code's choices, behind switches; the model's own size


def _rpo_by_hand(model, ref, noise, beta, w, form):
    """RPO written out in fp64: logit_ij = -beta/2 ((m_wi - r_wi) - (m_lj - r_lj)); form logit: mean_ij
    -log sigmoid(w_ij logit_ij); form loss: mean_i sum_j w_ij * -log sigmoid(logit_ij)."""
    B = noise.shape[0]
    e = torch.cat([noise, noise]).double().flatten(1)
    d = ((model.double().flatten(1) - e) ** 2).mean(1) - ((ref.double().flatten(1) - e) ** 2).mean(1)  # (2B,)
    logit = -0.5 * beta * (d[:B, None] - d[None, B:])  # (B, B)
    if form == "logit":
        return torch.log1p(torch.exp(-w * logit)).mean()
    return (w * torch.log1p(torch.exp(-logit))).sum(1).mean()


def test_rpo_loss_both_forms_by_hand_value_and_gradient():
    model, ref, noise = tiny.preds(B=4, seed=2)
    w = torch.softmax(torch.randn(4, 4, generator=torch.Generator().manual_seed(3)), 1).double()
    for form in ("logit", "loss"):
        a, b = model.clone().requires_grad_(True), model.clone().double().requires_grad_(True)
        loss, _ = objectives.rpo_loss(a, ref, noise, 30.0, None, 0.5, form, weights=w.float())
        want = _rpo_by_hand(b, ref, noise, 30.0, w, form)
        (loss + want).backward()
        assert abs(loss.item() - want.item()) < 1e-6 * max(1, want.item()), form
        assert (a.grad.double() - b.grad).norm() < 1e-5 * b.grad.norm(), form
    # the weights scale the logit, not the loss: the two forms differ for any non-trivial weights
    forms = [_rpo_by_hand(model, ref, noise, 30.0, w, form) for form in ("logit", "loss")]
    assert abs(forms[0] - forms[1]) > 1e-3


def test_rpo_is_dpo_on_one_pair_and_with_identity_weights_in_the_loss_form():
    model, ref, noise = tiny.preds(B=4, seed=2)
    emb = torch.eye(4, 16)  # orthogonal prompts + tiny tau: softmax(-(1 - cos)/tau) is exactly the identity
    a, b = model.clone().requires_grad_(True), model.clone().requires_grad_(True)
    lr_, _ = objectives.rpo_loss(a, ref, noise, 30.0, emb, 1e-3, "loss")
    ld, _ = dpo.dpo_loss(b, ref, noise, 30.0)
    (lr_ + ld).backward()
    assert torch.equal(lr_, ld) and torch.equal(a.grad, b.grad)
    one = torch.tensor([0, 4])  # a single pair: a 1x1 matrix of weight 1, in both forms
    for form in ("logit", "loss"):
        a, b = model[one].clone().requires_grad_(True), model[one].clone().requires_grad_(True)
        lr_, _ = objectives.rpo_loss(a, ref[one], noise[:1], 30.0, torch.randn(1, 3, 8), 0.5, form)
        ld, _ = dpo.dpo_loss(b, ref[one], noise[:1], 30.0)
        (lr_ + ld).backward()
        assert torch.allclose(lr_, ld, rtol=1e-6) and torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-9), form


def test_rpo_weights_by_hand():
    g = torch.Generator().manual_seed(4)
    text = torch.randn(5, 12, generator=g)  # the fallback: one embedding per pair, RPO's cosine distance
    u = F.normalize(text.double(), dim=-1).numpy()
    w = np.exp(-(1 - u @ u.T) / 0.5)
    assert np.abs(objectives.rpo_weights(text, 0.5).double().numpy() - w / w.sum(1, keepdims=True)).max() < 1e-6
    clip3 = torch.randn(5, 3, 12, generator=g)  # CLIP: prompt, winner, loser of each pair
    c, xw, xl = (F.normalize(clip3[:, k].double(), dim=-1).numpy() for k in range(3))
    cat_w = np.concatenate([c, xw], 1) / np.sqrt(2)  # (c_i, x^w_i) as one unit vector; (c_j, x^l_j) likewise
    cat_l = np.concatenate([c, xl], 1) / np.sqrt(2)
    w = np.exp(-(1 - cat_w @ cat_l.T) / 0.1)
    got = objectives.rpo_weights(clip3, 0.1).double().numpy()
    assert np.abs(got - w / w.sum(1, keepdims=True)).max() < 1e-6 and np.allclose(got.sum(1), 1)
