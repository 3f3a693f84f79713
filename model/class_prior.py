"""The class-conditional top prior: a Gaussian per class on the top level's latent.

Glow's class-conditional model (Kingma & Dhariwal, NeurIPS 2018, section 5 and
appendix: the top prior's mean and log-std as functions of the label). Here the top
level's standardised latent eps (``layers.TopPrior``, shape (C, H, W)) has, under class
k of K, the density N(eps; m_k, diag(s_k^2)) with m_k and log s_k learned per class and
per position. Both start at zero, so every class starts as N(0, I) and a conditional
model starts as its unconditional one; :meth:`ClassPrior.fit` sets them to their
maximum-likelihood values for a fixed flow instead (a closed-form start when a trained
unconditional flow is made conditional). With pi_k the classes' training frequencies:

    log p(x | k) = log N(eps_top; m_k, s_k) + (the rest of log p(x), as unconditional)
    log p(x)     = logsumexp_k [log pi_k + log p(x | k)]                  (the mixture)
    p(k | x)     = softmax_k [log pi_k + log N(eps_top; m_k, s_k)]        (Bayes' rule)

Everything but the top prior is shared by the classes, so the mixture and the class
posterior cost one evaluation of the top prior per class and no second pass through the
flow. The flat latent (``model.glow``) stays the bijection's eps: encode and decode do
not depend on a label; sampling class k draws eps_top = m_k + T s_k n, n ~ N(0, I).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class ClassPrior(nn.Module):
    """K Gaussians on the top latent (C, H, W), with log mixture weights ``log_weights`` (a buffer)."""

    def __init__(self, classes: int, shape: tuple[int, int, int]) -> None:
        super().__init__()
        if classes < 2:
            raise ValueError(f"a class-conditional prior needs at least 2 classes, got {classes}")
        self.mean = nn.Parameter(torch.zeros(classes, *shape))
        self.log_sigma = nn.Parameter(torch.zeros(classes, *shape))
        self.register_buffer("log_weights", torch.full((classes,), -math.log(classes)))

    @property
    def classes(self) -> int:
        return self.mean.shape[0]

    @torch.no_grad()
    def set_frequencies(self, labels: Tensor) -> None:
        """pi_k from the training labels (each class must occur: a class never seen has no density to learn)."""
        counts = torch.bincount(labels.flatten().long(), minlength=self.classes)
        if len(counts) != self.classes or bool((counts == 0).any()):
            raise ValueError(f"labels must cover classes 0..{self.classes - 1}, each at least once; "
                             f"counts {counts.tolist()}")
        self.log_weights.copy_(torch.log(counts.double() / counts.sum()).to(self.log_weights))

    @torch.no_grad()
    def fit(self, eps: Tensor, labels: Tensor, min_sigma: float = 1e-3) -> None:
        """The maximum-likelihood Gaussians for top latents ``eps`` (N, C, H, W) of labelled images: each class's
        per-position mean and standard deviation (at least ``min_sigma``). With the flow held fixed this is the
        exact maximiser of sum_i log p(x_i | y_i) over the class prior's parameters (a closed-form start)."""
        for k in range(self.classes):
            chosen = eps[labels == k].double()
            if len(chosen) < 2:
                raise ValueError(f"class {k}: {len(chosen)} images; need at least 2 to fit its Gaussian")
            self.mean[k] = chosen.mean(0).to(self.mean)
            self.log_sigma[k] = chosen.std(0, unbiased=False).clamp_min(min_sigma).log().to(self.log_sigma)

    def log_likelihoods(self, eps: Tensor) -> Tensor:
        """log N(eps_b; m_k, s_k) summed over the latent, shape (B, K), for eps of shape (B, C, H, W), computed in
        eps's dtype (float64 eps: float64 throughout)."""
        mean, log_sigma = self.mean.to(eps.dtype), self.log_sigma.to(eps.dtype)
        standard = (eps.unsqueeze(1) - mean) * torch.exp(-log_sigma)
        per_value = -0.5 * (standard**2 + math.log(2 * math.pi)) - log_sigma
        return per_value.flatten(2).sum(2)

    def log_joint(self, eps: Tensor) -> Tensor:
        """log pi_k + log N(eps_b; m_k, s_k), shape (B, K): the unnormalised log posterior over classes."""
        return self.log_likelihoods(eps) + self.log_weights.to(eps.dtype)

    def log_mixture(self, eps: Tensor) -> Tensor:
        """log sum_k pi_k N(eps_b; m_k, s_k), shape (B,)."""
        return torch.logsumexp(self.log_joint(eps), dim=1)

    def log_likelihood_of(self, eps: Tensor, labels: Tensor) -> Tensor:
        """log N(eps_b; m_{y_b}, s_{y_b}) for each image's own label y_b, shape (B,)."""
        return self.log_likelihoods(eps).gather(1, labels.view(-1, 1)).squeeze(1)

    def draw_labels(self, n: int, generator: torch.Generator) -> Tensor:
        """n labels drawn with the mixture weights pi (on the CPU, from ``generator``)."""
        return torch.multinomial(self.log_weights.double().exp().cpu(), n, replacement=True, generator=generator)

    @torch.no_grad()
    def place(self, standard: Tensor, labels: Tensor) -> Tensor:
        """Standard normal draws n (B, C, H, W), already scaled by the temperature -> m_y + s_y n, in the
        dtype and on the device of ``standard``."""
        mean, log_sigma = (p.detach().to(standard) for p in (self.mean, self.log_sigma))
        labels = labels.to(standard.device)
        return mean[labels] + torch.exp(log_sigma[labels]) * standard
