"""The single pass of ``LinearGRPOLoss``: per chunk of rows, logits -> statistics -> ``d loss / d
(logp, H, H~)`` -> ``dX, dW, db``, with the gradients formed inside the forward sweep.

The options and the call were checked once by the module; each chunk only slices its rows and asks
``_grpo.loss_and_grads`` for the per-token gradients, with the batch-wide normalizers.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from . import _grpo as G
from ._autograd import SinglePassFunction
from ._common import IGNORE_INDEX, compute_dtype
from ._types import LogitTransform

# Rows per chunk of the single pass: about this many logits per chunk. Each chunk holds two fp32
# [C, V] blocks (7 MiB each here). Measured on the bench's CPU case (V = 32768, so C = 56): smaller
# chunks pay for the dW update (all of dW is read and written once per chunk) and lose GEMM
# efficiency; above 56 rows MKL's sgemm packs the weight into an extra ~8 MiB buffer for the
# logits product at no gain in speed, which took working memory from 0.066 to 0.105 of [N, V].
SINGLE_PASS_ELEMENTS = 56 * 32768
# Rows outside the loss mask are marked with this target so the backends skip their gradients.
_IGNORE = IGNORE_INDEX


class SinglePass:
    """One forward of the single pass over ``x [B, T, H]`` and the head ``w [V, H]`` (+ ``bias``).

    ``options``: the checked loss options (their ``entropy_coef`` is ignored: ``coef`` is this call's
    bonus coefficient, read from the controller when there is one). ``controller``: observes the call
    (training with grad enabled), else None. ``inputs``: the loss tensors with ``logprobs``/entropies
    left None (this sweep computes them). Token-level objectives only compute the rows inside the
    mask; sequence-level ones (``whole_sequences``) take chunks of whole sequences.
    """

    def __init__(self, x, w, bias, targets, *, options: G.GRPOOptions, inputs: G.GRPOInputs, num_items_in_batch,
                 coef: float, controller: Any, generator, dp_group, k: Optional[int], tf: LogitTransform, be,
                 whole_sequences: bool, rows_per_chunk: Optional[int]):
        self.x, self.w, self.bias, self.k, self.tf, self.be = x, w, bias, k, tf, be
        self.inputs, self.controller, self.coef = inputs, controller, coef
        bsz, seqlen, _ = x.shape
        self.seqlen = seqlen
        n = bsz * seqlen
        cdt = compute_dtype(x.dtype)
        self.targets = targets.reshape(n)
        # Token-level objectives only need the rows inside the mask: gather them, so padding costs
        # no matrix product. Sequence-level ones keep the [B*T] layout and chunk by whole sequences;
        # luspo (Liger) has no masked rows to skip.
        self.rows_in = None
        if not whole_sequences and options.row.aggregation != "luspo":
            keep = self.targets != _IGNORE
            if not bool(keep.all()):
                self.rows_in = keep.nonzero().squeeze(1)
        n_rows = n if self.rows_in is None else self.rows_in.numel()
        # the backend's own chunk when it has one (Triton: the rows its bounded logits buffer holds)
        vocab = w.shape[0]
        rows_for = getattr(be, "single_pass_rows", None)
        base = rows_for(n_rows, vocab, x.dtype) if rows_for is not None else SINGLE_PASS_ELEMENTS // vocab
        step = rows_per_chunk or max(1, base)
        if whole_sequences:
            step = seqlen * max(1, step // max(seqlen, 1))
        self.step = max(1, min(step, n_rows)) if n_rows > 0 else 1
        self.norms = G.grpo_normalizers(
            inputs.mask, loss_type=options.loss_type, max_completion_length=options.max_completion_length,
            num_items_in_batch=num_items_in_batch, luspo_normalization="liger", dtype=cdt, dp_group=dp_group,
        )
        self.options = options.replace(entropy_coef=coef) if controller is None else options
        backend = G._resolve_backend(options.backend, x.device)
        # every chunk: this call's coefficient, no controller (the whole batch observes once, at the end)
        self.chunk_options = options.replace(entropy_coef=coef)
        self.chunk_call = G._Call(coef, None, num_items_in_batch, generator, self.norms, dp_group, backend)
        self.batch_kw = dict(num_items_in_batch=num_items_in_batch, entropy_controller=controller,
                             generator=generator, normalizers=self.norms, dp_group=dp_group)
        self.ref_is_self = options.beta != 0.0 and inputs.ref_logprobs is None
        self.lp = torch.zeros(bsz, seqlen, dtype=cdt, device=x.device)
        self.ent = torch.zeros_like(self.lp)
        self.cl = torch.zeros_like(self.lp) if k is not None else None
        self.metrics: Dict[str, torch.Tensor] = {}

    def __call__(self) -> torch.Tensor:
        return SinglePassFunction.apply(self.x, self.w, self.bias, self._sweep)

    def _chunk_grads(self, sl, logp_c, ent_c, cl_c):
        """The backend's callback for one chunk of rows: ``d loss / d (logp, H, H~)`` of its tokens."""
        seqlen = self.seqlen
        # flat [B*T] positions of the chunk's rows: a slice, or the gathered mask positions
        if self.rows_in is None:
            flat, first, last = sl, sl.start, sl.stop - 1
        else:
            flat = self.rows_in[sl]
            first, last = int(flat[0]), int(flat[-1])
        self.lp.view(-1)[flat] = logp_c
        self.ent.view(-1)[flat] = ent_c
        if self.cl is not None:
            self.cl.view(-1)[flat] = cl_c
        b0, b1 = first // seqlen, last // seqlen + 1
        # Rows b0..b1 hold every token of the chunk. For token-level objectives a token's gradient
        # depends only on its own values and the mask-derived weights, so the entries of those rows
        # outside the chunk (not computed yet, or already done) only produce gradients we drop.
        # Sequence-level objectives get chunks of whole sequences (step is a multiple of T).
        bonus = self.coef != 0.0
        full = self.options.entropy_source == "full"
        lp_rows = self.lp[b0:b1]
        rows = self.inputs.rows(b0, b1)
        part = rows._replace(
            logprobs=lp_rows,
            ref_logprobs=lp_rows.clone() if self.ref_is_self else rows.ref_logprobs,
            entropy=self.ent[b0:b1] if bonus and full else None,
            clamped_entropy=self.cl[b0:b1] if bonus and not full else None,
        )
        _, _, g_lp, g_ent, g_cl = G.loss_and_grads(self.chunk_options, self.chunk_call, part, observe=False)
        if self.rows_in is None:
            at = slice(sl.start - b0 * seqlen, sl.stop - b0 * seqlen)
        else:
            at = flat - b0 * seqlen
        take = lambda g: None if g is None else g.reshape(-1)[at]  # noqa: E731
        return take(g_lp), take(g_ent), take(g_cl)

    def _sweep(self) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
        x, w, bias = self.x, self.w, self.bias
        n, hidden = self.targets.numel(), x.shape[-1]
        x2, y = x.reshape(n, hidden), self.targets
        if self.rows_in is not None:
            x2, y = x2.index_select(0, self.rows_in), y.index_select(0, self.rows_in)
        needs = tuple(t is not None and t.requires_grad for t in (x, w, bias))
        _, gx, gw, gb = self.be.linear_forward_backward(
            x2.contiguous(), w.contiguous(), None if bias is None else bias.contiguous(), y.contiguous(), self.tf,
            _IGNORE, True, self.k, self._chunk_grads, rows_per_chunk=self.step, needs=needs,
        )
        if self.rows_in is not None and gx is not None:
            # rows outside the mask have exactly zero gradient
            gx = torch.zeros((n, hidden), dtype=gx.dtype, device=gx.device).index_copy_(0, self.rows_in, gx)
        # Loss and metrics of the whole batch from the per-token statistics (O(N) work); the
        # controller, if any, observes here once per call.
        observe = self.controller is not None
        inputs = self.inputs._replace(logprobs=self.lp, entropy=self.ent, clamped_entropy=self.cl,
                                      ref_logprobs=self.lp if self.ref_is_self else self.inputs.ref_logprobs)
        with torch.set_grad_enabled(observe):
            call = G.check_call(self.options, inputs, **self.batch_kw)
            loss, self.metrics = G.compute(self.options, call, inputs, observe=observe)
        return loss.detach(), None if gx is None else gx.reshape(x.shape), gw, gb
