"""Guided scores: classifier-free guidance and classifier guidance, as wrappers around ``score_fn(x, t)``.

Both return a plain ``score_fn(x, t) -> (B, *D)``, so every sampler in ``solvers`` can use them unchanged.

Classifier-free guidance (Ho & Salimans 2021).  One network learns both the conditional and the unconditional noise
prediction; sampling extrapolates from the unconditional towards the conditional one.  Written on noise predictions:

    eps_hat = eps(x) + w (eps(x, y) - eps(x))          (the convention used here: w = guidance_scale)
            = (1 + rho) eps(x, y) - rho eps(x)         (Ho & Salimans' form, rho = w - 1)

Scores are -eps / sigma(t), a linear map, so the same combination holds on scores:
s_hat = s(x) + w (s(x, y) - s(x)).  w = 0 is the unconditional score, **w = 1 the conditional score** (no guidance),
w > 1 sharpens.  By Bayes, s(x, y) - s(x) = grad_x log p_t(y | x), so CFG with scale w on exact scores is classifier
guidance with the exact classifier and scale w: the score of p_t(x) p_t(y | x)^w at each t.

Classifier guidance (Dhariwal & Nichol 2021; Song et al. 2021, App. I): s_hat = s(x) + scale * grad_x log p(y | x_t, t)
with a classifier trained on data perturbed by the same SDE (``sde_diffusion.classifier``).  scale = 1 with the exact
posterior gives the exact conditional score.

Note: for scales != 1 the guided scores at different t are not the scores of one diffused distribution, so a sampler
does not draw from the tilted density p_0(x) p_0(y | x)^w exactly, and the SDE and ODE samplers draw different laws
(Bradley & Nakkiran 2024, "Classifier-free guidance is a predictor-corrector").  tests/test_guidance.py measures what
they draw on a Gaussian (where the reverse SDE / ODE law is known in closed form): sharper than the conditional, and
sharper than the tilted density too - the ODE far more than the SDE.
"""
from __future__ import annotations

from typing import Callable, Union

import torch

Tensor = torch.Tensor
ScoreFn = Callable[[Tensor, Tensor], Tensor]

__all__ = ["cfg_score", "cfg_score_batched", "classifier_score", "as_labels"]


def as_labels(y, batch_size: int, device=None) -> Tensor:
    """Class labels as a long tensor of shape (B,): an int is repeated, a (B,) tensor is kept, a (1,) one broadcast."""
    y = torch.as_tensor(y, dtype=torch.long, device=device)
    if y.dim() == 0:
        return y.expand(batch_size)
    if y.dim() != 1 or y.shape[0] not in (1, batch_size):
        raise ValueError(f"labels must be an int or a tensor of shape ({batch_size},), got shape {tuple(y.shape)}")
    return y.expand(batch_size)


def cfg_score(cond_score_fn: ScoreFn, uncond_score_fn: ScoreFn, w: float) -> ScoreFn:
    """Classifier-free guided score s(x) + w (s(x, y) - s(x)).

    Args:
        cond_score_fn: ``(x, t) -> s(x, y)``, the conditional score with the label already bound.
        uncond_score_fn: ``(x, t) -> s(x)``, the unconditional score (null label).
        w: guidance scale; 0 = unconditional, 1 = conditional, > 1 = guided (Ho & Salimans' rho is w - 1).

    Each call evaluates both functions (a sampler's NFE counts it once); ``cfg_score_batched`` does both in one
    batched network call.
    """
    w = float(w)

    def score_fn(x: Tensor, t: Tensor) -> Tensor:
        s_u = uncond_score_fn(x, t)
        return s_u + w * (cond_score_fn(x, t) - s_u)
    return score_fn


def cfg_score_batched(label_score_fn: Callable[[Tensor, Tensor, Tensor], Tensor], y, null_label: int,
                      w: float) -> ScoreFn:
    """Classifier-free guidance for a class-conditional model ``label_score_fn(x, t, labels) -> score``: the
    conditional (labels ``y``) and unconditional (label ``null_label``) scores come from one call on the batch doubled,
    then combine as in ``cfg_score``.  ``y`` is an int or a (B,) tensor."""
    w = float(w)

    def score_fn(x: Tensor, t: Tensor) -> Tensor:
        B = x.shape[0]
        labels = as_labels(y, B, x.device)
        null = torch.full_like(labels, int(null_label))
        s = label_score_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
        s_c, s_u = s[:B], s[B:]
        return s_u + w * (s_c - s_u)
    return score_fn


def classifier_score(score_fn: ScoreFn, log_p_y_fn: Callable[[Tensor, Tensor, Tensor], Tensor],
                     y: Union[int, Tensor], scale: float = 1.0) -> ScoreFn:
    """Score plus ``scale * grad_x log p(y | x_t, t)``.

    Args:
        score_fn: ``(x, t) -> s(x)``, the (unconditional) score.
        log_p_y_fn: ``(x, t, y) -> (B,)`` log-probabilities of the labels ``y`` under a time-dependent classifier
            (``classifier.log_p_y_fn``; or the exact posterior of a mixture).
        y: the target class, an int or a (B,) tensor.
        scale: guidance scale (1 = Bayes' rule: the conditional score when the classifier is exact).

    The gradient is taken by autograd on a detached copy of x, so it works under ``torch.no_grad()`` and
    ``torch.inference_mode()`` callers, builds no graph that outlives the call, and returns a tensor without grad.
    """
    scale = float(scale)

    def guided(x: Tensor, t: Tensor) -> Tensor:
        s = score_fn(x, t)
        if scale == 0.0:
            return s
        with torch.inference_mode(False), torch.enable_grad():
            xg = x.detach().clone().requires_grad_(True)
            tg = t.detach().clone() if isinstance(t, Tensor) else t
            labels = as_labels(y.clone() if isinstance(y, Tensor) else y, x.shape[0], x.device)
            logp = log_p_y_fn(xg, tg, labels)
            if logp.shape != (x.shape[0],):
                raise ValueError(f"log_p_y_fn must return shape ({x.shape[0]},), got {tuple(logp.shape)}")
            (grad,) = torch.autograd.grad(logp.sum(), xg)
        return s + scale * grad.to(s.dtype)
    return guided
