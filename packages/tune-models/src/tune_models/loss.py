"""Cross-entropy fused with the output projection, without the batch's fp32 logits."""

from __future__ import annotations

import torch

# Rows per chunk are chosen so one chunk of fp32 logits is about 2**25 elements (128 MiB):
# big enough for efficient matmuls, small enough that the whole batch's logits never exist.
_CHUNK_ELEMENTS = 2**25


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed CE of (hidden @ weight.T) against labels; gradients are formed in forward.

    The loss is the last node of the graph, so d(loss)/d(logits) = softmax - onehot is known
    as soon as a chunk's logits are. Forming dhidden and dweight right away means no logits
    are saved for backward and none are recomputed; backward only scales by grad_output.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, compute_dtype, with_grad):
        n, dim = hidden.shape
        valid = (labels != ignore_index).nonzero().squeeze(1)
        # Rows without a target (prompt tokens, padding) cost nothing: skip their matmuls.
        h = hidden.index_select(0, valid).to(compute_dtype)  # (N', D)
        targets = labels.index_select(0, valid)  # (N',)
        w = weight.to(compute_dtype)  # (V, D)
        vocab = w.shape[0]
        chunk = max(1, _CHUNK_ELEMENTS // vocab)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        if with_grad:
            grad_hidden = torch.zeros_like(hidden)
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        # Two chunk-sized buffers reused by every chunk: fresh (C, V) tensors each time would
        # be fresh pages from the OS each time, and faulting them in costs as much as a pass
        # over them.
        rows = min(chunk, h.shape[0])
        logits_buf = torch.empty(rows, vocab, dtype=compute_dtype, device=hidden.device)
        logp_buf = torch.empty(rows, vocab, dtype=torch.float32, device=hidden.device)
        for start in range(0, h.shape[0], chunk):
            hc, yc = h[start : start + chunk], targets[start : start + chunk]
            logits = torch.mm(hc, w.T, out=logits_buf[: len(yc)])  # (C, V)
            # One fused log_softmax pass, then one exp for the gradient: cheaper than
            # logsumexp followed by a separate softmax.
            logp = torch.log_softmax(logits.float(), dim=-1, out=logp_buf[: len(yc)])  # (C, V)
            loss -= logp.gather(1, yc[:, None]).sum()
            if with_grad:
                probs = logp.exp_()  # softmax, in place: (C, V)
                probs[torch.arange(len(yc), device=yc.device), yc] -= 1.0
                g = probs.to(compute_dtype)
                grad_hidden.index_copy_(
                    0, valid[start : start + chunk], (g @ w).to(grad_hidden.dtype)
                )
                if g.dtype == grad_weight.dtype:
                    # Accumulate inside the GEMM: no (V, D) temporary per chunk to add.
                    grad_weight.addmm_(g.T, hc)
                else:
                    grad_weight += (g.T @ hc).float()
        if with_grad:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_output, grad_weight * grad_output, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weight.T`` against ``labels``.

    Equal to ``F.cross_entropy(hidden @ weight.T, labels, reduction="sum")`` (softmax in fp32)
    but in chunks, with gradients formed chunk by chunk, skipping rows whose label is
    ``ignore_index``. Peak extra memory is one chunk of logits instead of (N, V) fp32 logits.

    Args:
        hidden: (..., D) final hidden states.
        weight: (V, D) output projection.
        labels: (...) target ids, ignore_index where no loss is taken.
        ignore_index: Label value that takes no loss.

    Returns:
        fp32 scalar: the sum of the token losses.
    """
    device_type = hidden.device.type
    compute_dtype = hidden.dtype
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropy.apply(
            hidden.flatten(0, -2), weight, labels.flatten(), ignore_index, compute_dtype,
            with_grad,
        )
