"""fp32 round-off, for tolerances derived from the computation rather than tuned on one machine.

The error model the test modules' tolerance constants use (each module states its numbers):

* Two runs that compute the same value with other reduction orders (TP splits hidden and vocab
  sums, DP/ZeRO the gradient sums, another CPU's BLAS blocks its matmuls differently) differ in
  each stored result by rounding, up to ``ulp(x) / 2``, and in the reductions behind it by about
  ``sqrt(n) * U`` relative for ``n`` terms (random rounding errors; ``n * U`` is the worst case).
* A sum of per-token log-probs ``S`` (``|S|`` up to hundreds) carries an *absolute* error of a
  few ``ulp(S)``. A difference of two such sums -- a KL estimate, a DPO/KTO reward, a margin --
  inherits that absolute error, however small the difference itself is: compare those with an
  ``abs`` tolerance in ulps of the sums, not a ``rel`` one.
* After the first optimizer step the runs' weights differ. Adam moves every weight by about
  ``lr`` whatever the size of its gradient (``m / sqrt(v)`` is scale-free), so a coordinate whose
  gradient is round-off-small moves by up to ``lr`` in a direction the round-off picks. The loss
  hardly notices (those coordinates barely affect it, to first order), but quantities the loss
  does not constrain (a KL estimate between policy and reference, a reward model's mean reward)
  drift by ``lr * k * |d quantity / d weight|`` over ``k`` steps. The first step is therefore the
  tight comparison; later steps need the looser, stated bound.

A real bug (a wrong mask, a missing all-reduce, a mis-scaled reward) moves a loss or a KL
estimate by more than 1e-3; every tolerance derived here stays well below that.
"""

from __future__ import annotations

import math

U = 2.0**-24
"""fp32 unit round-off: half the spacing of fp32 numbers at 1.0."""


def ulp(x: float) -> float:
    """Spacing of fp32 numbers at ``|x|``: ``2**(e - 23)`` for ``2**e <= |x| < 2**(e + 1)``."""
    return 2.0 ** (math.floor(math.log2(abs(x))) - 23) if x else 2.0**-149
