"""The gradient steps of training (``common.maths.train``): sgd's and sgd_tied's, and PAM's encoder phase. One
step: the codes (training forward), the objective's terms beside the MSE with the proximal anchors, AuxK, the
Adam step with its learning-rate schedule, the projections (unit-norm atoms, a non-negative learned threshold);
under torchrun the gradients summed across ranks (docs/DESIGN.md, sections 3.1, 3.8, 3.9). ``cfg`` is the
run's ``TrainConfig`` throughout.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..infra import distributed as dist
from .sae import SAE


def _objective_terms(model: SAE, cfg, anchors: dict, out, trained: set):
    """Everything in the training objective except the reconstruction MSE; None when nothing applies.
    ``out``: the forward pass (dense codes, an SAEOutput, are needed only with an L1 or L0 penalty)."""
    terms = []
    if cfg.l1:
        terms.append(cfg.l1 * out.codes.abs().sum(-1).mean())
    if cfg.l0:
        terms.append(cfg.l0 * model.act.l0(out.preacts, model.threshold, cfg.bandwidth))
    if "decoder" in trained:
        if cfg.alpha:
            terms.append(cfg.alpha * model.atoms.pow(2).sum())
        if cfg.beta:
            terms.append(cfg.beta * model.b_dec.pow(2).sum())
    if cfg.prox_form == "l2":
        if cfg.mu:
            terms.append(cfg.mu * model.W_enc.pow(2).sum())
        if cfg.nu:
            terms.append(cfg.nu * model.b_enc.pow(2).sum())
    else:
        for name, anchor in anchors.items():
            coef = cfg.mu if anchor.ndim == 2 else cfg.nu  # weight matrices; biases (and thresholds)
            if coef:
                terms.append(coef * (getattr(model, name) - anchor).pow(2).sum())
    return sum(terms[1:], terms[0]) if terms else None


def lr_factor(step: int, total: int, warmup: int) -> float:
    """warmup_decay: the learning rate's multiplier at optimiser step ``step`` (0-based) of ``total``:
    linear warm-up to 1 over ``warmup`` steps, then linear decay to 0 at the end of the run."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(total - warmup, 1))


def _aux_loss(model: SAE, xb, out, dead: torch.Tensor, cfg):
    """AuxK (Gao et al. 2024; sparsify's scaling): reconstruct the residual x - recon (no gradient into the
    main reconstruction) from the min(aux_k, #dead) highest pre-activations among dead latents, ReLU'd as
    in both (topk_abs: |a| selects, the sign is kept), decoded without b_dec; MSE weighted by
    aux_coef * min(#dead / aux_k, 1). None when no latent is dead."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return None
    vals, idx = model.act.aux_select(out.preacts, dead, min(cfg.aux_k, n_dead))
    e_hat = F.embedding_bag(idx, model.atoms, per_sample_weights=vals, mode="sum")
    scale = min(n_dead / cfg.aux_k, 1.0)
    return cfg.aux_coef * scale * F.mse_loss(e_hat, (xb - out.recon).detach())


@torch.no_grad()
def _project_atom_gradient(W_dec: torch.nn.Parameter) -> None:
    """Remove from each atom's gradient its component along the (unit-norm) atom."""
    if W_dec.grad is not None:
        W_dec.grad.sub_((W_dec.grad * W_dec).sum(1, keepdim=True) * W_dec)


@torch.no_grad()
def _project_threshold(model: SAE) -> None:
    """A learned threshold (jumprelu) is kept >= 0 after every step (docs/DESIGN.md 3.10)."""
    if model.act.threshold == "learned":
        model.threshold.clamp_(min=0.0)


class Stepper:
    """The gradient steps of a run: Adam on ``params`` (PAM: the encoder's; SGD: every parameter) with its
    learning-rate schedule, the unit-norm atoms (sgd), AuxK's count of the samples since each latent fired, and
    the number of optimiser steps taken."""

    def __init__(self, model: SAE, cfg, opt, params: list, trained: set, n: int):
        self.model, self.cfg, self.opt, self.params, self.trained = model, cfg, opt, params, trained
        self.unit_norm = cfg.unit_norm_atoms and cfg.method == "sgd"
        self.aux = cfg.aux_k > 0 and model.is_topk
        self.device = model.W_enc.device
        # samples since each latent fired
        self.since_fired = torch.zeros(model.n_latents, dtype=torch.long, device=self.device)
        self.dead_after = cfg.dead_after or n
        total_steps = cfg.epochs * math.ceil(n / cfg.batch_size) * cfg.updates_per_batch
        self.sched = None
        if cfg.lr_schedule == "warmup_decay":
            warmup = max(1, min(cfg.warmup_steps, total_steps // 10))
            self.sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, warmup))
        self.steps = 0

    def step(self, xb: torch.Tensor, n_batch: int, anchors: dict) -> torch.Tensor:
        """One Adam step on this rank's rows ``xb`` of a global batch of ``n_batch`` rows, on the training objective
        (+ AuxK); returns the objective (without AuxK) before the step."""
        model, cfg = self.model, self.cfg
        aux_term = None
        if cfg.l1 or cfg.l0 or not model.is_topk:
            out = model.forward_train(xb, cfg.bandwidth)
            recon = out.recon
            if self.aux:
                fired = (out.codes != 0).any(0)
        else:  # no dense codes needed: a TopK model decodes from its k non-zeros
            out = model.forward_topk(xb)
            recon = out.recon
            if self.aux:
                fired = torch.zeros(model.n_latents, dtype=torch.bool, device=self.device)
                fired[out.idx[out.vals != 0]] = True
        if self.aux:
            aux_term = _aux_loss(model, xb, out, self.since_fired >= self.dead_after, cfg)
        loss = F.mse_loss(recon, xb)
        penalty = _objective_terms(model, cfg, anchors, out, self.trained)
        if penalty is not None:
            loss = loss + penalty
        total = loss if aux_term is None else loss + aux_term
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        if dist.active():
            dist.sum_gradients(self.params, xb.shape[0] / n_batch)  # this rank's weight in the batch's mean loss
        if self.unit_norm:
            _project_atom_gradient(model.W_dec)
        self.opt.step()
        _project_threshold(model)
        if self.unit_norm:
            with torch.no_grad():
                model.W_dec.div_(model.W_dec.norm(dim=1, keepdim=True))
        if self.sched is not None:
            self.sched.step()
        if self.aux:
            self.since_fired += n_batch
            self.since_fired[dist.any_rank(fired)] = 0
        self.steps += 1
        return loss

    def idle_step(self, n_batch: int) -> None:
        """A step on no rows: a last global batch smaller than the number of ranks left this rank none. It joins the
        other ranks' collectives with a zero gradient (sum_gradients, AuxK's any_rank) and steps as they do, so
        every rank's optimiser, schedule and step count stay the same (docs/DESIGN.md, section 3.9)."""
        self.opt.zero_grad(set_to_none=False)
        for p in self.params:
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad.zero_()
        dist.sum_gradients(self.params, 0.0)
        if self.aux:
            self.since_fired += n_batch
            self.since_fired[dist.any_rank(torch.zeros_like(self.since_fired, dtype=torch.bool))] = 0
        self.opt.step()
        _project_threshold(self.model)
        if self.sched is not None:
            self.sched.step()
        self.steps += 1
