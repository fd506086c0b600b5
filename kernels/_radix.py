"""Shared @triton.jit helpers for the exact top-k threshold: order-preserving keys, radix counts.

The k-th largest logit ``tau`` of a row is found by a most-significant-digit radix select on
unsigned integer keys with ``key(a) < key(b)`` iff ``a < b`` (IEEE bits, negatives flipped; -0.0 and
+0.0 share the key of +0.0 because they compare equal). Each pass counts, per row, the digit of every
logit whose higher digits equal the prefix chosen so far, into a ``[N, NBINS]`` int32 histogram.
"""
import triton
import triton.language as tl


@triton.jit
def order_key(z):
    """uint32 (uint64 for fp64) key of z, ordered like z; -inf is the smallest key used."""
    z = tl.where(z == 0.0, 0.0, z)  # one key for -0.0 and +0.0
    if z.dtype == tl.float64:
        bits = z.to(tl.uint64, bitcast=True)
        key = bits ^ tl.where((bits >> 63) != 0, 0xFFFFFFFFFFFFFFFF, 0x8000000000000000)
    else:
        bits = z.to(tl.uint32, bitcast=True)
        key = bits ^ tl.where((bits >> 31) != 0, 0xFFFFFFFF, 0x80000000)
    return key


@triton.jit
def key_to_float(key):
    """Inverse of ``order_key`` (uint32 keys give fp32, uint64 keys fp64)."""
    if key.dtype == tl.uint64:
        bits = key ^ tl.where((key >> 63) != 0, 0x8000000000000000, 0xFFFFFFFFFFFFFFFF)
        z = bits.to(tl.float64, bitcast=True)
    else:
        bits = key ^ tl.where((key >> 31) != 0, 0x80000000, 0xFFFFFFFF)
        z = bits.to(tl.float32, bitcast=True)
    return z


@triton.jit
def radix_count(z, mask, hist_block, prefix, SHIFT: tl.constexpr, BITS: tl.constexpr, NBINS: tl.constexpr,
                FIRST: tl.constexpr):
    """Count digit ``(key >> SHIFT) & (2^BITS - 1)`` of every logit whose key agrees with ``prefix``
    above bit SHIFT + BITS (every logit on the first pass).

    ``z`` [BLOCK_N, BLOCK_V]; ``hist_block`` points at the histogram row of the tile's first row
    (rows are NBINS apart; int32 offsets from it keep the address registers small). ``mask`` is
    ignored on the first pass, which counts every entry of the tile unmasked to stay within the
    GEMM epilogue's register budget: the histogram has a row for every row of the last row block,
    and padded columns (z = -inf) are subtracted from the -inf bin by ``radix_select_kernel`` (by the
    launcher, before the ranks' histograms are summed, when the vocabulary is split across ranks).
    Several programs (vocabulary splits) add to the same row's bins; integer adds commute, so the
    counts are exact and deterministic. Returns the keys.
    """
    key = order_key(z)
    offs = tl.arange(0, z.shape[0])[:, None] * NBINS + ((key >> SHIFT) & ((1 << BITS) - 1)).to(tl.int32)
    if FIRST:
        tl.atomic_add(hist_block + offs, 1, sem="relaxed")
    else:
        hit = mask & ((key >> (SHIFT + BITS)) == prefix[:, None])
        tl.atomic_add(hist_block + offs, 1, mask=hit, sem="relaxed")
    return key
