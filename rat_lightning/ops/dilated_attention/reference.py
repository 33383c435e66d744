"""Dilated causal attention with a local window and sink tokens, plain PyTorch.

Query t attends, in one softmax, to the keys j with

    allowed(t, j) = j <= t and ((j + 1) % D == 0     # dilated: the last position of every D-block
                                or t - j <= W        # local window (W = 0 still keeps j = t)
                                or j < I)            # I "sink" tokens

D = 1 is dense causal attention. Every query sees at least itself, so no softmax row is empty.
q and k arrive with RoPE already applied by the caller (the op knows nothing about positions
beyond the mask).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dilated_mask_rows(
    start: int,
    stop: int,
    dilation: int,
    window: int,
    sinks: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Rows ``start .. stop - 1`` of the mask: bool ``(stop - start, stop)``, True where allowed.

    Queries t in ``[start, stop)`` against keys j in ``[0, stop)`` (later keys are never allowed).
    Lets a check of a long sequence build only the rows it needs instead of the full T x T mask.
    """
    rows = torch.arange(start, stop, device=device)
    cols = torch.arange(stop, device=device)
    distance = rows[:, None] - cols[None, :]
    dilated = ((cols + 1) % dilation == 0)[None, :]
    sink = (cols < sinks)[None, :]
    return (distance >= 0) & (dilated | (distance <= window) | sink)


def dilated_mask(
    length: int, dilation: int, window: int, sinks: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Bool ``(T, T)`` mask, True where query t may attend to key j (see the module docstring).

    Args:
        length: T.
        dilation: D >= 1 (1 = dense causal).
        window: W >= 0, the local window (t - j <= W).
        sinks: I >= 0, the number of leading keys every later query sees.
        device: where to build the mask.
    """
    return dilated_mask_rows(0, length, dilation, window, sinks, device)


def dilated_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dilation: int,
    window: int,
    sinks: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Dilated + window + sink causal attention through masked ``F.scaled_dot_product_attention``.

    Differentiable (this is the training path on every device); it materialises the T x T bool
    mask, so its memory grows with T^2.

    Args:
        q, k, v: ``(B, T, H, P)`` of one float dtype (RoPE already applied to q and k).
        dilation, window, sinks: D, W, I of the mask (see :func:`dilated_mask`).
        scale: softmax scale, default ``P ** -0.5``.

    Returns:
        ``(B, T, H, P)`` in q's dtype (a transposed view of SDPA's ``(B, H, T, P)`` output).
    """
    mask = dilated_mask(q.shape[1], dilation, window, sinks, device=q.device)
    # SDPA wants (B, H, T, P); transposed views, no copies (the backends take strided inputs).
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale
    )
    return out.transpose(1, 2)
