"""GPTQ (Frantar et al., 2022): quantize a layer's weight column by column, pushing each column's rounding error
onto the columns not yet quantized, so that the layer's OUTPUT on calibration data changes as little as possible.

Objective, per output row w (all rows share one Hessian):  min ‖X·wᵀ - X·ŵᵀ‖²,  X = calibration inputs (n, in)

    H      = 2 XᵀX + λ I,    λ = damp · mean(diag(XᵀX) · 2)     (dampening keeps H invertible)
    OBS    quantizing column q moves the remaining columns F by   δ_F = -(w_q - quant(w_q)) / [H_F⁻¹]_qq · [H_F⁻¹]_{:,q}
    GPTQ   quantize the columns in a fixed order; then H_F⁻¹ for every step is read off one upper Cholesky factor
           U of H⁻¹ (H⁻¹ = UᵀU): row q of U, divided by U_qq, is [H_F⁻¹]_{q,:} / sqrt([H_F⁻¹]_qq). So
               err_q = (w_q - quant(w_q)) / U_qq,     w_{q+1:} -= err_q · U_{q, q+1:}
    lazy batches: the update of the columns beyond a batch of 128 is applied once per batch, as a matrix
           product W[:, i2:] -= Err · U[i1:i2, i2:] (same arithmetic, in a cache-friendly order).
    act_order: quantize the columns in order of decreasing diag(H) (the most activated first); the weight is
           stored in that order with the permutation, and dequantized back through its inverse.

The grid is the affine one of affine.py (q = round(w / S + Z)); a group's S and Z are found from the already
updated weights when the group's first column comes up, so a lazy batch never straddles a group start. The
error feedback can push a weight near its dtype's largest value beyond it, so the grid's range is clipped to
±max · (2^b - 1)/(2^b + 1) of weight.dtype (or of float32, the scales' dtype): then every grid point, Z rounded
to an integer included, is representable.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .affine import (AffineState, check_bits, check_float, check_groupsize, dequantize_affine, from_codes,
                     grid_params, state_from_codes, to_codes)

BATCH = 128  # columns per lazy batch


@dataclass
class GPTQState:
    """GPTQ's result: the weight's columns, in quantization order, on the affine grid, and that order."""
    affine: AffineState              # (out, in) codes in quantization order (groups along that order)
    perm: torch.Tensor | None = None  # int32 (in,): stored column k is original column perm[k]; None: identity

    @property
    def nbytes(self) -> int:
        return self.affine.nbytes + (0 if self.perm is None else self.perm.numel() * self.perm.element_size())

    @property
    def bits_per_param(self) -> float:
        return 8 * self.nbytes / self.affine.numel

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        w = dequantize_affine(self.affine, dtype)
        if self.perm is None:
            return w
        return w[:, torch.argsort(self.perm.long())]  # the inverse permutation


def dequantize_gptq(state: GPTQState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The (out, in) weight GPTQ chose, in the original column order."""
    if not isinstance(state, GPTQState):
        raise TypeError(f"state must be a GPTQState, got {type(state).__name__}")
    return state.dequantize(dtype)


def check_weight(weight: torch.Tensor) -> None:
    """weight must be a finite float (out, in) tensor with at least one row and one column."""
    check_float(weight, "weight")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    if 0 in weight.shape:
        raise ValueError(f"weight must have at least one row and one column (out, in), got shape {tuple(weight.shape)}")


def hessian(inputs: torch.Tensor, in_features: int | None = None) -> torch.Tensor:
    """H = 2/n · XᵀX of calibration inputs (..., in) flattened to (n, in), in float64 (the 1/n does not change GPTQ)."""
    check_float(inputs, "inputs")
    if in_features is not None and inputs.shape[-1] != in_features:
        raise ValueError(f"inputs must have {in_features} features in the last dim (the weight's in_features), "
                         f"got shape {tuple(inputs.shape)}")
    if inputs.shape[-1] == 0:
        raise ValueError(f"inputs must have at least one feature in the last dim, got shape {tuple(inputs.shape)}")
    x = inputs.detach().reshape(-1, inputs.shape[-1]).double()
    if x.shape[0] == 0:
        raise ValueError("inputs must hold at least one calibration row")
    return 2 * x.T @ x / x.shape[0]


def gptq_quantize(weight: torch.Tensor, inputs: torch.Tensor, bits: int = 4, groupsize: int | None = 128,
                  damp: float = 0.01, act_order: bool = False) -> GPTQState:
    """Quantize weight (out, in) for calibration inputs (n, in) (or (..., in)); see the module docstring."""
    check_weight(weight)
    return gptq_quantize_hessian(weight, hessian(inputs, weight.shape[1]), bits, groupsize, damp, act_order)


def gptq_quantize_hessian(weight: torch.Tensor, H: torch.Tensor, bits: int = 4, groupsize: int | None = 128,
                          damp: float = 0.01, act_order: bool = False) -> GPTQState:
    """GPTQ from a Hessian H (in, in) = 2XᵀX/n. Works in float32, or in float64 when weight is float64 or so large
    (|w| > 2^100) that a group's range xmax - xmin or the error feedback could overflow float32: finite in, finite out."""
    check_weight(weight)
    check_bits(bits)
    out_f, in_f = weight.shape
    gs = check_groupsize(groupsize, in_f)
    if H.shape != (in_f, in_f):
        raise ValueError(f"H must be ({in_f}, {in_f}) for a weight with {in_f} input features, got {tuple(H.shape)}")
    if not torch.isfinite(H).all():
        raise ValueError("H holds NaN or Inf: the calibration inputs are not finite")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 <= damp < 1:
        raise ValueError(f"damp must be a float in [0, 1), got {damp!r}")
    f32_max = torch.finfo(torch.float32).max
    if (big := weight.detach().abs().max().item()) > f32_max:
        raise ValueError(f"weight has values up to {big:.3g}; GPTQ stores its scales in float32, so |weight| must "
                         f"stay below {f32_max:.3g}")
    wide = weight.dtype == torch.float64 or weight.detach().abs().max().item() > 2.0 ** 100
    work = torch.float64 if wide else torch.float32
    W = weight.detach().to(work).clone()
    H = H.detach().double().clone()

    dead = torch.diag(H) == 0          # inputs that are always 0: their weights never matter; set them to 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = None
    if act_order:                      # the most activated columns first
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.diag(H).mean() * torch.eye(in_f, dtype=H.dtype)
    U = upper_cholesky_of_inverse(H).to(work)

    Q = torch.zeros_like(W)            # the codes
    n_groups = in_f // gs
    scale = torch.zeros(out_f, n_groups, dtype=work)
    zero = torch.zeros(out_f, n_groups, dtype=work)
    lim = min(torch.finfo(weight.dtype).max, f32_max) * (2 ** bits - 1) / (2 ** bits + 1)  # grid stays representable
    starts = sorted(set(range(0, in_f, BATCH)) | set(range(0, in_f, gs)))  # batches never straddle a group start
    for i1, i2 in zip(starts, starts[1:] + [in_f]):
        if i1 % gs == 0:               # a new group: its grid from the weights updated so far
            g = i1 // gs
            s, z = grid_params(W[:, i1:i1 + gs].clamp(-lim, lim), bits)
            scale[:, g], zero[:, g] = s.float().to(work), z    # the scale as it will be stored (float32)
        s, z = scale[:, i1 // gs], zero[:, i1 // gs]
        W1, Err1, U1 = W[:, i1:i2].clone(), torch.zeros(out_f, i2 - i1, dtype=work), U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            q = to_codes(w, s, z, bits)
            err = (w - from_codes(q, s, z)) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]     # the OBS update of this batch's columns
            Q[:, i1 + i], Err1[:, i] = q, err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]                       # the lazy update of all later columns
    affine = state_from_codes(Q, scale, zero, bits, gs, weight.dtype)
    state = GPTQState(affine, None if perm is None else perm.to(torch.int32))
    if not torch.isfinite(state.dequantize()).all():
        raise ValueError(f"GPTQ gave non-finite weights for a finite {weight.dtype} weight (|w| up to "
                         f"{weight.detach().abs().max().item():.3g}); the grid overflows {weight.dtype}")
    return state


def upper_cholesky_of_inverse(H: torch.Tensor) -> torch.Tensor:
    """U upper triangular with H⁻¹ = UᵀU (H symmetric positive definite)."""
    L, info = torch.linalg.cholesky_ex(H)
    if info.item() != 0:
        raise ValueError("the damped Hessian is not positive definite; raise damp or give more calibration data")
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


class _Stop(Exception):
    """Raised by the capture hook: the rest of the forward pass is not needed."""


@torch.no_grad()
def quantize_model_gptq(model: nn.Module, calibration_batches, targets, bits: int = 4, groupsize: int | None = 128,
                        act_order: bool = False, damp: float = 0.01) -> dict[str, GPTQState]:
    """GPTQ every target nn.Linear of model, in forward order, IN PLACE: each weight is replaced by its dequantized
    GPTQ weight (a dense float tensor on the quantized grid); returns {name: GPTQState}, the stored form.

    Each layer's Hessian comes from its inputs in the model whose earlier targets are already quantized
    (calibration_batches: a list of model inputs, e.g. token-id tensors; re-run once per layer, stopped at it).

    All or nothing: a target that is not an nn.Linear, that the forward pass never reaches, or whose weight is tied
    to another module's (a GPT's lm_head and wte) is refused before any weight changes; a layer that fails later
    (a NaN weight, a Hessian that damp cannot make positive definite) restores every layer already changed (a copy
    of each changed weight is kept until the call returns).
    A tied lm_head is refused rather than untied: quantizing it in place would also change the token embedding,
    and untying silently would double its memory and change what the saved model holds. To quantize it anyway,
    untie it first: model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone()).
    """
    batches = list(calibration_batches)
    if not batches:
        raise ValueError("calibration_batches must hold at least one batch")
    names = _find_linears(model, targets)
    for name in names:
        if not isinstance(model.get_submodule(name), nn.Linear):
            raise TypeError(f"target {name!r} is a {type(model.get_submodule(name)).__name__}, not an nn.Linear")
    _refuse_tied(model, names)
    was_training = model.training
    model.eval()
    originals: dict[str, torch.Tensor] = {}
    try:
        order = _forward_order(model, names, batches)
        states = {}
        for name in order:
            layer = model.get_submodule(name)
            try:
                H = _layer_hessian(model, layer, batches)
                state = gptq_quantize_hessian(layer.weight, H, bits, groupsize, damp, act_order)
            except ValueError as e:
                raise ValueError(f"GPTQ of {name!r}: {e}") from None
            originals[name] = layer.weight.detach().clone()
            layer.weight.copy_(state.dequantize(layer.weight.dtype))
            states[name] = state
    except BaseException:
        for name, w in originals.items():    # a refusal leaves the model as it was
            model.get_submodule(name).weight.copy_(w)
        raise
    finally:
        model.train(was_training)
    return states


def _layer_hessian(model: nn.Module, layer: nn.Linear, batches: list) -> torch.Tensor:
    """H = 2XᵀX/n of the layer's inputs over all batches; each forward pass is stopped at the layer (machinery)."""
    H = torch.zeros(layer.in_features, layer.in_features, dtype=torch.float64)
    rows = [0]

    def capture(module, args):
        x = args[0].detach().reshape(-1, module.in_features).double()
        H.add_(2 * x.T @ x)
        rows[0] += x.shape[0]
        raise _Stop

    handle = layer.register_forward_pre_hook(capture)
    try:
        for batch in batches:
            try:
                model(batch)
            except _Stop:
                pass
    finally:
        handle.remove()
    if rows[0] == 0:
        raise ValueError("calibration_batches gave it no input rows (every batch is empty)")
    return H / rows[0]


def _refuse_tied(model: nn.Module, names: list[str]) -> None:
    """Refuse a target whose weight is also another module's parameter (tied weights)."""
    for name in names:
        weight = model.get_submodule(name).weight
        others = [n.removesuffix(".weight") for n, p in model.named_parameters(remove_duplicate=False)
                  if p is weight and n != name + ".weight"]
        if others:
            raise ValueError(f"target {name!r} shares its weight with {others[0]!r} (tied weights): GPTQ in place would "
                             f"change {others[0]!r} too; untie it first (model.{name}.weight = "
                             f"nn.Parameter(model.{name}.weight.detach().clone())) or leave it out of targets")


def _find_linears(model: nn.Module, targets) -> list[str]:
    """Module names equal to a target or ending in "." + target ("c_fc" selects "transformer.h.0.mlp.c_fc")."""
    patterns = [targets] if isinstance(targets, str) else list(targets)
    if not patterns:
        raise ValueError("targets must name at least one module")
    names = [n for n, _ in model.named_modules() if n]
    chosen = [n for n in names if any(n == p or n.endswith("." + p) for p in patterns)]
    missing = [p for p in patterns if not any(n == p or n.endswith("." + p) for n in names)]
    if missing:
        raise ValueError(f"targets {missing} match no module of {type(model).__name__}")
    return chosen


def _forward_order(model: nn.Module, names: list[str], batches: list) -> list[str]:
    """The target names in the order the forward passes over batches reach them; refuses a target never reached."""
    seen: list[str] = []
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen.append(n) if n not in seen
                                                                else None) for n in names]
    try:
        for batch in batches:
            model(batch)
    finally:
        for h in hooks:
            h.remove()
    missing = [n for n in names if n not in seen]
    if missing:
        raise ValueError(f"targets {missing} are never reached by the model's forward pass on calibration_batches; "
                         f"they would get no calibration inputs (leave them out of targets)")
    return seen
