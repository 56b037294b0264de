"""The language-model head and its loss in one step: logits = x Wᵀ, loss = mean_i (logsumexp_j z_ij − z_i,t_i).

The gradient of the mean cross-entropy with respect to the logits z is the softmax minus the one-hot target,

    ∂loss/∂z_ij = (softmax(z_i)_j − [j = t_i]) / n        (n: the targets that are not ignore_index, -100)

so dx = (softmax(z) / n) W − W[t] / n and, when W trains, dW = (softmax(z) / n)ᵀ x − the rows x_i / n added at t_i.

F.cross_entropy(F.linear(x, W), t) computes the same thing through three more (tokens, vocab) tensors: the
log-probabilities it saves, a one-hot gradient and the gradient of the logits. Each is 100 MB for 512 tokens of
GPT-2's 50,257 words, and on a CPU the first write to that much fresh memory costs more than an exp over it.
Here the logits are the only such tensor: the forward writes them and keeps them for the backward (the same bytes
log_softmax's output took). The loss, −log softmax(z_i) at t_i, and the backward's logsumexp come from log_softmax
run a few rows at a time into one small buffer; the backward then walks the vocabulary in column blocks of a few
MB, turning each block of logits into its block of gradient in one reused buffer and multiplying it into dx (and
dW) at once.

The logits are also written block by block: a BLAS writing rows of an odd length such as 50,257 floats is about a
third slower than one writing rows of 1,024, so each block is multiplied into an aligned buffer and copied over
(the same bytes: each entry is the same dot product). tests/test_linear_cross_entropy.py checks loss, logits and
gradients against F.cross_entropy(F.linear(...)).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

IGNORE = -100
BLOCK_BYTES = 2**21  # a column block of logits or gradient: small enough to stay in cache


def column_blocks(n_rows: int, n_cols: int) -> range:
    """Start columns of the blocks: at least 256 columns, about BLOCK_BYTES of float32 each."""
    return range(0, n_cols, max(256, BLOCK_BYTES // (4 * n_rows)))


def row_log_softmax(z: torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
    """For each row i, log softmax(z_i) at column cols_i, or with cols None logsumexp_j z_ij = max z_i − max log
    softmax(z_i) (exact to the rounding of a number no larger than log(vocab)). log_softmax is one fused pass; it
    runs a few rows at a time into one reused buffer, so no (rows, vocab) tensor is allocated."""
    N, V = z.shape
    rows = min(N, max(1, BLOCK_BYTES // (4 * V)))
    buf, out = z.new_empty(rows, V), z.new_empty(N)
    for i in range(0, N, rows):
        block = z[i:i + rows]
        logp = torch.log_softmax(block, dim=-1, out=buf[:block.size(0)])
        if cols is None:
            torch.sub(block.amax(1), logp.amax(1), out=out[i:i + rows])
        else:
            out[i:i + rows] = logp.gather(1, cols[i:i + rows, None]).squeeze(1)
    return out


class LinearCrossEntropy(torch.autograd.Function):
    """(x (N, C), W (V, C), targets (N,)) -> (logits (N, V), mean cross-entropy over targets != -100)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
        ctx.set_materialize_grads(False)
        (N, _), V = x.shape, weight.size(0)
        logits = x.new_empty(N, V)
        starts = column_blocks(N, V)
        buf = x.new_empty(N, starts.step)
        for j in starts:  # (N, w) blocks through an aligned buffer: see the module docstring
            w = min(starts.step, V - j)
            block = buf if w == starts.step else x.new_empty(N, w)
            logits[:, j:j + w].copy_(torch.mm(x, weight[j:j + w].t(), out=block))
        kept = targets != IGNORE
        n = kept.sum().to(logits.dtype)  # 0 when every target is ignored: loss 0/0 = nan, as F.cross_entropy
        loss = -torch.where(kept, row_log_softmax(logits, targets.clamp(min=0)), 0.0).sum() / n
        ctx.save_for_backward(x if weight.requires_grad else None, weight, logits, targets, n)
        return logits, loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logits: torch.Tensor | None, grad_loss: torch.Tensor | None):
        x, weight, logits, targets, n = ctx.saved_tensors
        (N, V), t = logits.shape, targets.clamp(min=0)
        want_x, want_w = ctx.needs_input_grad[:2]
        per_row = grad_loss / n if grad_loss is not None else logits.new_zeros(())
        scale = torch.where(targets != IGNORE, per_row, 0.0)  # (N,): 0 on ignored rows, even when n = 0
        lse = row_log_softmax(logits)[:, None] if grad_loss is not None else None  # (N, 1)
        dx = torch.zeros(N, weight.size(1), dtype=logits.dtype, device=logits.device) if want_x else None
        dw = torch.empty_like(weight) if want_w else None
        starts = column_blocks(N, V)
        buf = logits.new_empty(N, starts.step)
        for j in starts:
            w = min(starts.step, V - j)
            g = buf[:, :w]
            if lse is not None:  # softmax(z) / n · grad_loss on this block
                torch.sub(logits[:, j:j + w], lse, out=g).exp_().mul_(scale[:, None])
            else:
                g.zero_()
            if grad_logits is not None:  # the logits were used elsewhere too
                g.add_(grad_logits[:, j:j + w])
            if want_x:
                dx.addmm_(g, weight[j:j + w])
            if want_w:
                torch.mm(g.t(), x, out=dw[j:j + w])
        if want_x:  # the one-hot part: − W[t_i] / n for each row
            dx.sub_(scale[:, None] * weight[t])
        if want_w:
            dw.index_add_(0, t, x * -scale[:, None])
        return dx, dw, None


def fused_applies(head: nn.Module, x: torch.Tensor) -> bool:
    """A bias-free float32 nn.Linear (not a LoRA, quantized or hooked layer) on the CPU, outside autocast."""
    return (type(head) is nn.Linear and head.bias is None and x.dtype == head.weight.dtype == torch.float32
            and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
            and not (head._forward_hooks or head._forward_pre_hooks))


def head_and_loss(head: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """head(x) (B, T, vocab) and the mean cross-entropy over targets != -100: F.cross_entropy(head(x), targets),
    through LinearCrossEntropy where fused_applies(head, x)."""
    B, T, C = x.shape
    if not fused_applies(head, x):
        logits = head(x)
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1),
                                       ignore_index=IGNORE)
    t = targets.reshape(-1)
    V = head.weight.size(0)
    if t.numel() != B * T or t.dtype != torch.int64:
        raise ValueError(f"targets must be int64 of shape {(B, T)}, got {t.dtype} of shape {tuple(targets.shape)}")
    bad = (t != IGNORE) & ((t < 0) | (t >= V))
    if bad.any():
        raise IndexError(f"target {t[bad][0].item()} is out of bounds: targets must be in [0, {V}) or -100")
    logits, loss = LinearCrossEntropy.apply(x.reshape(B * T, C), head.weight, t)
    return logits.view(B, T, V), loss
