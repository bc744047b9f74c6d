"""The objectives beside Diffusion-DPO's eq. 14 (dpo.py), each beside its paper, and the two quantities all of them,
eq. 14 included, are built from: the per-image denoising error and eq. 14's logits.

Every objective takes the same arguments, then the numbers it uses, so dpo.py chooses one from a table by name:
    loss, stats = objective(pred, ref_pred, eps, inputs, beta=...)     (RPO also tau and form; SFT none)
pred, ref_pred (kB, C, h, w): the policy's and the frozen reference's predictions for the B items of a micro-batch,
k images each (a pair's winners first, then its losers), in the shared-noise layout: the target of every image is
the eps (B, C, h, w) its item was noised with (dpo.pair_loss shifts v-predictions so). ref_pred is None for the
reference-free objectives (SFT, MaPO). inputs: the micro-batch (T: the number of training timesteps, labels of
single images, RPO's embeddings and the text conditioning). The paper's T * omega(lambda_t) is folded into beta
throughout.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------
# What every objective is built from


def mse(pred, target):
    """Per-sample mean squared error in fp32: (N, C, H, W) -> (N,)."""
    return (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))


def preference_logits(model_mse_w, model_mse_l, ref_mse_w, ref_mse_l, beta):
    """Eq. 14's argument: -beta/2 [(|eps - eps_theta(x_w)|^2 - |eps - eps_theta(x_l)|^2) - (the same for eps_ref)].
    Positive when the policy, more than the reference, denoises the winner better than the loser. Broadcasts. With
    beta = 2 it is the implicit-reward margin (r_w - m_w) - (r_l - m_l) that evaluate.py's accuracy ranks pairs by."""
    return -0.5 * beta * ((model_mse_w - model_mse_l) - (ref_mse_w - ref_mse_l))


def stats(logits, model_mse, ref_mse, beta):
    """What the log shows: how often the policy prefers the winner more than the reference does, and by how much
    (reward_margin = logits / (beta/2), beta-free; > 0 is good)."""
    logits = logits.detach()
    return {"implicit_acc": (logits > 0).float().mean(), "reward_margin": (logits / (0.5 * beta)).mean(),
            "model_mse": model_mse.mean(), "ref_mse": ref_mse.mean()}


def pair_logits(pred, ref_pred, eps, beta):
    """Eq. 14's logits (B,) of B pairs, and the stats beside them; the MSEs of all 2B images, the reference's
    without gradient."""
    B = eps.shape[0]
    target = torch.cat([eps, eps])  # (2B, C, H, W): the same eps for winner i and loser i
    model_mse = mse(pred, target)  # (2B,) |eps - eps_theta(x_t, t)|^2
    ref_mse = mse(ref_pred, target).detach()  # (2B,) |eps - eps_ref(x_t, t)|^2
    logits = preference_logits(model_mse[:B], model_mse[B:], ref_mse[:B], ref_mse[B:], beta)  # (B,)
    return logits, stats(logits, model_mse.detach(), ref_mse, beta)


def gather(x):
    """All ranks' x, concatenated in rank order; only this rank's slice carries gradient."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


# ----------------------------------------------------------------------------------------------------
# The objectives


def sft(pred, ref_pred, eps, inputs):
    """The paper's baseline: the plain denoising loss on the preferred images only (dpo.micro_batch passes them)."""
    loss = mse(pred, eps).mean()
    return loss, {"model_mse": loss.detach()}


def ipo(pred, ref_pred, eps, inputs, beta):
    """IPO (Azar et al. 2023, arXiv:2310.12036, eq. 17) on eq. 14's logits z: h = z / beta is the log-likelihood-ratio
    margin, winner over loser, regressed onto 1/(2 beta) instead of being pushed up forever."""
    logits, s = pair_logits(pred, ref_pred, eps, beta)
    return ((logits / beta - 1 / (2 * beta)) ** 2).mean(), s


def hinge(pred, ref_pred, eps, inputs, beta):
    """SLiC / RSO's hinge (Liu et al. 2023, arXiv:2309.06657) on eq. 14's logits: no gradient once z reaches 1."""
    logits, s = pair_logits(pred, ref_pred, eps, beta)
    return F.relu(1 - logits).mean(), s


def kto(pred, ref_pred, eps, inputs, beta):
    """Diffusion-KTO (Li et al. 2024, arXiv:2404.04465): single images, labels (N,) 1 desirable, 0 undesirable (a
    pair is two such records: the winner desirable, the loser not). With r = beta (|eps - eps_ref|^2 -
    |eps - eps_theta|^2), each image's implicit reward, the loss is 1 - sigmoid(r - z) for a desirable image and
    1 - sigmoid(z - r) for an undesirable one; the reference point z is the batch's mean reward over all ranks, not
    below 0 (no gradient; the paper's eq. 8, as its code notes)."""
    B = eps.shape[0]
    target = eps.repeat(pred.shape[0] // B, 1, 1, 1)  # (N, C, H, W)
    labels = inputs.get("labels")
    if labels is None:
        labels = torch.arange(len(pred), device=pred.device) < B
    model_mse, ref_mse = mse(pred, target), mse(ref_pred, target).detach()  # (N,)
    reward = ref_mse - model_mse  # (N,) / beta
    z = reward.detach().mean()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(z)
        z = z / dist.get_world_size()
    sign = 2.0 * labels.float() - 1  # +1 desirable, -1 undesirable
    value = sign * beta * (reward - z.clamp(min=0))  # (N,)
    loss = (1 - torch.sigmoid(value)).mean()
    return loss, {"implicit_acc": (value.detach() > 0).float().mean(), "reward_margin": (sign * reward).mean(),
                  "model_mse": model_mse.detach().mean(), "ref_mse": ref_mse.mean()}


MAPO_W = 0.5  # MaPO's constant in its score's link function (the authors' --snr_value)


def mapo(pred, ref_pred, eps, inputs, beta):
    """MaPO (Hong et al. 2024, arXiv:2406.06424), reference-free: the winner's denoising loss, plus beta times the
    Bradley-Terry loss of the margin between the two images' scores s(m) = w m / (e^(w m) - 1) (w = 0.5; a bounded,
    decreasing link of the MSE m), scaled by T timesteps: L = m_w - beta log sigmoid(T (s(m_w) - s(m_l))), as the
    authors' code (mapo-t2i/mapo) computes it."""
    B = eps.shape[0]
    model_mse = mse(pred, torch.cat([eps, eps]))  # (2B,)
    score = MAPO_W * model_mse / torch.expm1(MAPO_W * model_mse)  # (2B,)
    margin = inputs["T"] * (score[:B] - score[B:])  # (B,)
    loss = model_mse[:B].mean() - beta * F.logsigmoid(margin).mean()
    return loss, {"implicit_acc": (margin.detach() > 0).float().mean(), "model_mse": model_mse.detach().mean()}


def rpo_weights(emb, tau):
    """Diffusion-RPO's weights (Gu et al. 2024, arXiv:2406.06382, after RPO, Yin et al. 2024) of winner i against
    loser j: w_ij = softmax_j(-(1 - s_ij) / tau), rows sum to 1. emb (M, 3, P): CLIP's unit-length embeddings of each
    pair's prompt c, winner x^w and loser x^l (--rpo_clip); s_ij is the cosine of the concatenated prompt and image
    embeddings of (c_i, x^w_i) and (c_j, x^l_j): (cos(c_i, c_j) + cos(x^w_i, x^l_j)) / 2. emb (M, E), the fallback
    without a CLIP model: one text embedding per pair, s_ij = cos(e_i, e_j) (RPO's prompt-only weights)."""
    if emb.dim() == 3:
        c, xw, xl = (F.normalize(emb[:, k].float(), dim=-1) for k in range(3))  # (M, P) each
        s = 0.5 * (c @ c.T + xw @ xl.T)  # (M, M)
    else:
        e = F.normalize(emb.float(), dim=-1)  # (M, E)
        s = e @ e.T
    return torch.softmax(-(1 - s) / tau, dim=1)  # (M, M)


def rpo_loss(model_pred, ref_pred, noise, beta, emb, tau, form="logit", weights=None):
    """Diffusion-RPO: winner i against EVERY loser j of the batch (all-gathered across ranks), eq. 14's logit for
    each (i, j) scaled by rpo_weights. form "logit", the paper's and RPO's code: the weight scales the logit,
    L = mean_ij -log sigmoid(w_ij * logit_ij); form "loss": the weight scales each (i, j)'s loss,
    L = mean_i sum_j w_ij * -log sigmoid(logit_ij). A single pair (M = 1, w = 1) is DPO in both forms. The loss is
    the whole gathered batch's: times world size before backward (DDP means)."""
    B = noise.shape[0]
    target = torch.cat([noise, noise])  # (2B, C, H, W)
    model_mse, ref_mse = mse(model_pred, target), mse(ref_pred, target).detach()  # (2B,)
    mw, ml = gather(model_mse[:B]), gather(model_mse[B:])  # (M,) the M pairs of all ranks
    rw, rl = gather(ref_mse[:B]), gather(ref_mse[B:])
    logits = preference_logits(mw[:, None], ml[None, :], rw[:, None], rl[None, :], beta)  # (M, M): i vs j
    if weights is None:
        weights = rpo_weights(gather(emb.detach()), tau)  # (M, M)
    if form == "logit":
        loss = -F.logsigmoid(weights * logits).mean()
    else:
        loss = (weights * -F.logsigmoid(logits)).sum(1).mean()
    return loss, stats(logits.diagonal(), torch.cat([mw, ml]).detach(), torch.cat([rw, rl]), beta)


def rpo(pred, ref_pred, eps, inputs, beta, tau=0.5, form="logit"):
    """Diffusion-RPO on a micro-batch: CLIP's prompt and image embeddings (--rpo_clip), else the UNet's text
    embedding (SDXL's pooled one; SD1.5 has none, so the mean of the context states), one per pair."""
    emb = inputs.get("rpo_emb")
    if emb is None:
        context, pooled = inputs["cond"][:2]
        emb = (context.mean(1) if pooled is None else pooled)[:eps.shape[0]]  # (B, E)
    return rpo_loss(pred, ref_pred, eps, beta, emb, tau, form)
