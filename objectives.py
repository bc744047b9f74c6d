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


# ----------------------------------------------------------------------------------------------------
# Online RL on the policy's own samples: group-relative advantages, Flow-GRPO / DDPO's clipped ratio, DiffusionNFT


def group_advantages(rewards, groups, eps=1e-4):
    """GRPO's advantages (Shao et al. 2024, as flow_grpo's per-prompt tracker): each reward against its group (the
    samples of one prompt), (r - mean) / (std + 1e-4), std with ddof 0. rewards (N,), groups (N,) ints -> (N,)."""
    r = rewards.double()
    out = torch.empty_like(r)
    for g in torch.unique(groups):
        k = groups == g
        out[k] = (r[k] - r[k].mean()) / (r[k].std(unbiased=False) + eps)
    return out.to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def grpo_loss(log_prob, old_log_prob, adv, clip_range, adv_clip, kl_beta=0.0, mean=None, ref_mean=None, std=None):
    """Flow-GRPO's loss on one denoising step (Liu et al. 2025; DDPO's with the KL): the PPO-clipped ratio of the
    step's probability under the policy to the sampler's, times the clipped advantage, and kl_beta times the KL to
    the reference of two Gaussians of the same std, |mean - ref_mean|^2 / (2 std^2) (pixel-averaged). log_prob,
    old_log_prob, adv (B,); mean, ref_mean (B, C, h, w) -> (loss, stats: clip fraction, approximate KL, KL)."""
    adv = adv.clamp(-adv_clip, adv_clip)
    ratio = torch.exp(log_prob - old_log_prob)
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range)).mean()
    stats = {"clip_frac": ((ratio - 1).abs() > clip_range).float().mean().detach(),
             "approx_kl": (0.5 * (log_prob - old_log_prob) ** 2).mean().detach()}
    if kl_beta > 0:
        kl = ((mean - ref_mean) ** 2).mean(dim=tuple(range(1, mean.ndim)), keepdim=True) / (2 * std ** 2)
        loss = loss + kl_beta * kl.mean()
        stats["kl"] = kl.mean().detach()
    return loss, stats


def nft_loss(v, v_old, v_ref, x_t, x0, sigma, adv, beta, adv_clip, kl_beta=0.0):
    """DiffusionNFT's loss (Zheng et al. 2025) as its code computes it, on the forward process: the implicit positive
    and negative policies v+ = beta v + (1 - beta) v_old and v- = (1 + beta) v_old - beta v, each turned into its x0
    prediction x_t - sigma v+-, weighted by its own mean absolute error (adaptive weighting, no gradient), mixed by
    the reward r = clip(adv) / adv_clip / 2 + 1/2 in [0, 1], scaled by adv_clip / beta; plus kl_beta |v - v_ref|^2
    (v_ref None: no reference).
    v, v_old, v_ref, x_t, x0 (B, C, h, w); sigma, adv (B,) -> (loss, stats: the old policy's deviation, KL)."""
    dims = tuple(range(1, x0.ndim))
    r = (adv.clamp(-adv_clip, adv_clip) / adv_clip / 2 + 0.5).clamp(0, 1)
    s = sigma.view(-1, *([1] * (x0.ndim - 1)))
    v_old = v_old.detach()
    losses = []
    for implicit in (beta * v + (1 - beta) * v_old, (1 + beta) * v_old - beta * v):
        x0_pred = x_t - s * implicit
        with torch.no_grad():
            w = (x0_pred.double() - x0.double()).abs().mean(dim=dims, keepdim=True).clip(min=1e-5)
        losses.append(((x0_pred - x0) ** 2 / w).mean(dim=dims))
    loss = ((r * losses[0] / beta + (1 - r) * losses[1] / beta) * adv_clip).mean()
    stats = {"old_deviation": ((v - v_old) ** 2).mean().detach()}
    if v_ref is not None:
        kl = ((v - v_ref) ** 2).mean(dim=dims).mean()
        loss, stats["kl"] = loss + kl_beta * kl, kl.detach()
    return loss, stats
