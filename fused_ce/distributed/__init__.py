"""Cross-entropy over a vocabulary sharded across the ranks of a process group.

In tensor (vocabulary) parallel training each rank holds a contiguous slice of the
classes, in rank order -- the columns ``[vocab_start, vocab_start + V_s)`` of the
logits, or the matching rows of the LM head's weight -- and nobody holds a full row.
Each rank's kernel computes per-row statistics of its slice (``ops.py``)::

    loss_s = sum_{c in s} T_c (lse_s - z_c),   lse_s = logsumexp_{c in s} z_c,   mass_s = sum_{c in s} T_c

with the target distribution ``T`` over the *full* vocabulary (a target in another
slice adds no one-hot entry here; label smoothing spreads over every class). They
merge exactly into the full row's, with ``M = max_s lse_s`` as a shared reference so
that every term is >= 0 (no cancellation)::

    lse  = M + log sum_s exp(lse_s - M)
    loss = sum_s (loss_s + mass_s (M - lse_s)) + mass (lse - M),   mass = sum_s mass_s

and the gradient restricted to a slice is the backward op on that slice with the
global ``lse`` and ``mass``, so backward needs no communication at all (except the
input gradient of the fused linear head, which is a sum over ranks by nature).

Communication, per call: the statistics are O(N), whatever the vocabulary size.
Merging needs a reference every rank shares (a sum of ``exp(lse_s - R)`` over ranks
overflows or underflows unless ``R`` is near ``max_s lse_s``, and no rank knows that
alone), so there are two ways to do it:

* ``all_gather`` (the default up to ``ALL_GATHER_MAX_RANKS`` ranks): every rank
  sends its ``3N`` values (+1 with class weights) and merges all ``P`` of them
  locally. One collective, and every rank computes bitwise the same loss.
* ``all_reduce``: a MAX all-reduce of ``lse_s`` (``N`` values), then one SUM
  all-reduce of ``[exp(lse_s - M), loss_s + mass_s (M - lse_s), mass_s]`` (``3N``).
  Two latency-bound collectives, but the bytes do not grow with ``P``.

At the sizes of a training step (N ~ 10^4 rows: 100-200 KB of statistics) a
collective costs its latency, not its bytes, so one all_gather beats two
all-reduces within a node; the all-reduce pair wins only when ``P`` is large.
"""

from .api import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy"]
