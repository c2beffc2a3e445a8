"""Cross-entropy fused with the output projection, without the batch's fp32 logits."""

from __future__ import annotations

import torch

# Rows per chunk are chosen so one chunk of fp32 logits is about 2**25 elements (128 MiB):
# big enough for efficient matmuls, small enough that the whole batch's logits never exist.
_CHUNK_ELEMENTS = 2**25


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed CE of (hidden @ weight.T [+ low_in @ low_out.T]) against labels; gradients are
    formed in forward.

    The loss is the last node of the graph, so d(loss)/d(logits) = softmax - onehot is known
    as soon as a chunk's logits are. Forming the input gradients right away means no logits
    are saved for backward and none are recomputed; backward only scales by grad_output.
    Only the gradients that are needed are formed: with a frozen output projection (LoRA)
    that skips the (V x D) weight gradient, a third of the loss's matmuls. The optional
    low-rank term is a LoRA adapter on the output projection: (N, r) @ (V, r).T. With
    ``softcap`` the loss is taken of cap * tanh(logits / cap), and the logits' gradient is
    the capped one's times 1 - tanh^2.
    """

    @staticmethod
    def forward(ctx, hidden, weight, low_in, low_out, labels, ignore_index, compute_dtype,
                grad_enabled, softcap):
        inputs = (hidden, weight, low_in, low_out)
        # needs_input_grad says which inputs require grad, even under no_grad: hence the flag.
        needed = [grad_enabled and t is not None and ctx.needs_input_grad[i]
                  for i, t in enumerate(inputs)]
        valid = (labels != ignore_index).nonzero().squeeze(1)
        # Rows without a target (prompt tokens, padding) cost nothing: skip their matmuls.
        rows_in = [None if t is None or i % 2 else t.index_select(0, valid).to(compute_dtype)
                   for i, t in enumerate(inputs)]  # hidden and low_in: (N', D) and (N', r)
        mats = [None if t is None or i % 2 == 0 else t.to(compute_dtype)
                for i, t in enumerate(inputs)]  # weight and low_out: (V, D) and (V, r)
        targets = labels.index_select(0, valid)  # (N',)
        vocab = weight.shape[0]
        chunk = max(1, _CHUNK_ELEMENTS // vocab)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grads = []
        for i, t in enumerate(inputs):
            if not needed[i]:
                grads.append(None)
            elif i % 2 == 0:  # per-row inputs: rows are written once, by index
                grads.append(torch.zeros_like(t))
            else:  # matrices: accumulated over chunks in fp32
                grads.append(torch.zeros(t.shape, dtype=torch.float32, device=t.device))
        # Two chunk-sized buffers reused by every chunk: fresh (C, V) tensors each time would
        # be fresh pages from the OS each time, and faulting them in costs as much as a pass
        # over them.
        n_rows = min(chunk, len(targets))
        logits_buf = torch.empty(n_rows, vocab, dtype=compute_dtype, device=hidden.device)
        logp_buf = torch.empty(n_rows, vocab, dtype=torch.float32, device=hidden.device)
        tanh_buf = None if softcap is None else torch.empty_like(logp_buf)
        for start in range(0, len(targets), chunk):
            yc = targets[start : start + chunk]
            ins = [None if t is None else t[start : start + chunk] for t in rows_in]
            logits = torch.mm(ins[0], mats[1].T, out=logits_buf[: len(yc)])  # (C, V)
            if low_in is not None:
                logits.addmm_(ins[2], mats[3].T)  # + the adapter's (C, r) @ (r, V)
            scores = logits.float()
            if softcap is not None:
                tanh = torch.tanh(scores / softcap, out=tanh_buf[: len(yc)])  # (C, V)
                scores = tanh * softcap
            # One fused log_softmax pass, then one exp for the gradient: cheaper than
            # logsumexp followed by a separate softmax.
            logp = torch.log_softmax(scores, dim=-1, out=logp_buf[: len(yc)])  # (C, V)
            loss -= logp.gather(1, yc[:, None]).sum()
            if not any(needed):
                continue
            probs = logp.exp_()  # softmax, in place: (C, V)
            probs[torch.arange(len(yc), device=yc.device), yc] -= 1.0
            if softcap is not None:  # through the cap: d(cap tanh(x / cap))/dx = 1 - tanh^2
                probs *= 1.0 - tanh.square_()
            g = probs.to(compute_dtype)
            for row_input, matrix in ((0, 1), (2, 3)):
                if needed[row_input]:  # d(loss)/d(rows) = g @ matrix
                    grads[row_input].index_copy_(
                        0, valid[start : start + chunk],
                        (g @ mats[matrix]).to(grads[row_input].dtype))
                if needed[matrix]:  # d(loss)/d(matrix) = g.T @ rows
                    if g.dtype == torch.float32:
                        # Accumulate inside the GEMM: no (V, D) temporary per chunk to add.
                        grads[matrix].addmm_(g.T, ins[row_input])
                    else:
                        grads[matrix] += (g.T @ ins[row_input]).float()
        if any(needed):  # save_for_backward takes None for a gradient not formed
            ctx.save_for_backward(*(None if g is None else g.to(t.dtype)
                                    for g, t in zip(grads, inputs)))
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        return (*(None if g is None else g * grad_output for g in ctx.saved_tensors),
                None, None, None, None, None)


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
    low_rank: tuple[torch.Tensor, torch.Tensor] | None = None, softcap: float | None = None,
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
        low_rank: Optional ``(u, b)`` with u (..., r) and b (V, r): the logits get
            ``u @ b.T`` added (a LoRA adapter on the output projection, u its scaled rank-r
            activations), still chunk by chunk.
        softcap: If set, the loss is of ``cap * tanh(logits / cap)`` (Gemma 2's final logit
            soft-capping), still chunk by chunk.

    Returns:
        fp32 scalar: the sum of the token losses.
    """
    device_type = hidden.device.type
    compute_dtype = hidden.dtype
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    low_in, low_out = (None, None) if low_rank is None else low_rank
    if low_in is not None:
        low_in = low_in.flatten(0, -2)
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropy.apply(
            hidden.flatten(0, -2), weight, low_in, low_out, labels.flatten(), ignore_index,
            compute_dtype, torch.is_grad_enabled(), softcap,
        )
