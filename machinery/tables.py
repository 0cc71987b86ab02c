"""Coding tables that are the same integers on every machine.

Encoder and decoder must code with identical CDF tables, and a released checkpoint ships without them: every
machine builds them from the float weights when it loads the file. Built with torch's float32 kernels, the
tables came out different on CPUs with and without AVX2 (vectorised exp, tanh and sums round differently in the
last bit, and a last bit sometimes flips a frequency), so a file written on one would not open on the other.

Here every number on the way from weights to integers comes from IEEE-754 float64 additions, multiplications,
divisions and exact scalings by powers of two, in a fixed order. The standard makes each of those operations
correctly rounded, so a vector unit, a scalar unit, x86 or ARM all produce the same bits. The functions the
tables need (exp, log, tanh, the normal CDF) are therefore written out below from those operations alone, with
series and continued fractions; accurate to about 1e-15, and, more to the point, reproducible bit for bit.
What is not used: numpy's or torch's exp/log/tanh (SIMD versions per CPU), matrix products and sums whose order
the library chooses, and the platform's libm (glibc, macOS and MSVC differ in the last bit).
"""
import math

import numpy as np

from rangecoder import PRECISION

LN2_HI, LN2_LO = 6.93147180369123816490e-01, 1.90821492927058770002e-10      # ln 2 = HI + LO, HI exact * k
SQRT_PI = 1.77245385090551602730
SQRT_HALF = 0.70710678118654752440


# ----------------------------------------------------------------------------------------------------------
# Elementary functions from + - * / and powers of two only.
# ----------------------------------------------------------------------------------------------------------
def exp(x):
    """e^x = 2^k e^r with k = round(x / ln 2) and |r| <= ln(2)/2, e^r by its Taylor series (19 terms:
    the first omitted term is below 1e-19)."""
    x = np.asarray(x, dtype=np.float64)
    k = np.rint(x / (LN2_HI + LN2_LO)).clip(-1100, 1100)
    r = (x - k * LN2_HI) - k * LN2_LO
    series = np.ones_like(r)
    for n in range(19, 0, -1):                                              # Horner: 1 + r/1 (1 + r/2 (...))
        series = 1.0 + series * r / n
    with np.errstate(over="ignore", under="ignore"):
        return np.ldexp(series, k.astype(np.int64))


def log(x):
    """ln x = e ln 2 + ln m with x = m 2^e, m in [sqrt(1/2), sqrt(2)); ln m = 2 atanh(s), s = (m - 1)/(m + 1),
    |s| < 0.172, by the series 2 s (1 + s^2/3 + s^4/5 + ...) to s^24."""
    m, e = np.frexp(np.asarray(x, dtype=np.float64))
    low = m < SQRT_HALF
    m, e = np.where(low, 2 * m, m), np.where(low, e - 1, e).astype(np.float64)
    s = (m - 1) / (m + 1)
    s2, series = s * s, np.zeros_like(m)
    for n in range(25, 0, -2):
        series = 1.0 / n + s2 * series
    return e * LN2_HI + (e * LN2_LO + 2 * s * series)


def sigmoid(x):
    """1 / (1 + e^-x), written so that neither side overflows and tiny tails keep their relative precision."""
    t = exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + t), t / (1 + t))


def softplus(x):
    """ln(1 + e^x) = max(x, 0) + ln(1 + e^-|x|)."""
    return np.maximum(x, 0) + log(1 + exp(-np.abs(x)))


def tanh(x):
    """sign(x) (1 - 2 / (e^(2|x|) + 1))."""
    return np.sign(x) * (1 - 2 / (exp(2 * np.abs(x)) + 1))


def erfc(x):
    """Complementary error function for x >= 0. Below 2: 1 - erf(x), erf by its Taylor series
    2/sqrt(pi) sum (-1)^n x^(2n+1) / (n! (2n+1)) (50 terms); from 2 on: Laplace's continued fraction
    erfc(x) = e^(-x^2)/sqrt(pi) / (x + (1/2)/(x + 1/(x + (3/2)/(x + ...)))) (120 terms)."""
    x = np.asarray(x, dtype=np.float64)
    small = np.minimum(x, 2.0)
    term, total = small.copy(), small.copy()
    for n in range(1, 50):
        term = -term * small * small / n
        total = total + term / (2 * n + 1)
    large = np.maximum(x, 2.0)
    fraction = large.copy()
    for k in range(120, 0, -1):
        fraction = large + (k / 2) / fraction
    return np.where(x < 2, 1 - 2 / SQRT_PI * total, exp(-large * large) / SQRT_PI / fraction)


def upper_normal_tail(t):
    """P(N(0, 1) > t) for t >= 0."""
    return 0.5 * erfc(np.asarray(t, dtype=np.float64) * SQRT_HALF)


# ----------------------------------------------------------------------------------------------------------
# pmf -> integer CDF, and the tables of the two entropy models (entropy.py).
# ----------------------------------------------------------------------------------------------------------
def pmf_to_quantized_cdf(pmf, tail_mass):
    """Turn a float pmf plus the mass of its tails into an int32 CDF of length len(pmf) + 2.

    The tail mass becomes the escape symbol. Every symbol gets a frequency >= 1 and the total is exactly
    2**PRECISION. Rounding leaves an excess (or a shortfall); it is settled one unit at a time where a unit
    costs the fewest bits: taking one from frequency f of a symbol with probability p costs p*log2(f/(f-1)) bits
    per coded symbol on average, giving one gains p*log2((f+1)/f). (Taking whole symbols down to frequency 1
    would cost far more at wide scales, where thousands of tail symbols each claim their minimum unit.)
    The sum is math.fsum (exact, then rounded once) and the costs use log() above: the same bits everywhere.
    """
    pmf = np.append(np.clip(np.asarray(pmf, dtype=np.float64), 0, None), max(float(tail_mass), 0.0))
    total = 1 << PRECISION
    mass = math.fsum(pmf) if np.isfinite(pmf).all() else math.nan
    if len(pmf) > total or not mass > 0:
        raise ValueError("pmf must be finite, non-zero, and shorter than 2**PRECISION")
    p = pmf / mass
    freqs = np.maximum(1, np.round(p * total)).astype(np.int64)
    excess = int(freqs.sum()) - total
    while excess != 0:      # each round moves one unit on each of the cheapest half: close to one at a time
        if excess > 0:
            cost = np.full(len(p), np.inf)
            can = freqs > 1
            cost[can] = p[can] * log(freqs[can] / (freqs[can] - 1))
            n = max(1, min(excess, int(can.sum())) // 2)
            freqs[np.argsort(cost, kind="stable")[:n]] -= 1
            excess -= n
        else:
            gain = p * log((freqs + 1) / freqs)
            n = max(1, min(-excess, len(p)) // 2)
            freqs[np.argsort(-gain, kind="stable")[:n]] += 1
            excess += n
    return np.concatenate([[0], np.cumsum(freqs)]).astype(np.int32)


def factorized_logits(matrices, biases, factors, v):
    """The factorized density's CDF logits (entropy.EntropyBottleneck._logits_cumulative) at v (C, P), in
    float64: each layer x <- softplus(H) x + b, then x <- x + tanh(a) tanh(x) (all but the last). The matrix
    product is written out as a sum in a fixed order."""
    x = v[:, None, :]                                                       # (C, 1, P)
    for i, (matrix, bias) in enumerate(zip(matrices, biases)):
        weight = softplus(matrix)                                           # (C, out, in)
        total = weight[:, :, :1] * x[:, None, 0]                            # (C, out, P)
        for k in range(1, weight.shape[2]):
            total = total + weight[:, :, k:k + 1] * x[:, None, k]
        x = total + bias
        if i < len(factors):
            x = x + tanh(factors[i]) * tanh(x)
    return x[:, 0]                                                          # (C, P)


def factorized_cdfs(matrices, biases, factors, quantiles):
    """One CDF per channel over the integers v = median + k, k in [-low, high], where low and high reach the
    quantiles (C, 3). P(v) = c(v + 1/2) - c(v - 1/2), taken on the side where the sigmoids are not saturated;
    the escape holds both tails. -> (cdfs, offsets)."""
    medians = quantiles[:, 1]
    lows = np.maximum(np.ceil(medians - quantiles[:, 0]), 0).astype(np.int64)
    highs = np.maximum(np.ceil(quantiles[:, 2] - medians), 0).astype(np.int64)
    edges = np.arange(int((lows + highs).max()) + 2)[None, :] - lows[:, None] - 0.5     # (C, L + 1)
    logits = factorized_logits(matrices, biases, factors, medians[:, None] + edges)    # c(v -+ 1/2)
    lower, upper = logits[:, :-1], logits[:, 1:]                                        # (C, L)
    side = np.where(lower + upper > 0, -1.0, 1.0)
    pmf = np.abs(sigmoid(side * upper) - sigmoid(side * lower))
    cdfs = []
    for c, n in enumerate(lows + highs + 1):
        tails = sigmoid(logits[c, 0]) + sigmoid(-logits[c, n])
        cdfs.append(pmf_to_quantized_cdf(pmf[c, :n], tails))
    return cdfs, (-lows).tolist()


def normal_quantile(tail):
    """t with P(N(0, 1) > t) = tail (0 < tail < 1/2), by bisection: 64 halvings of [0, 40]."""
    low, high = 0.0, 40.0
    for _ in range(64):
        middle = (low + high) / 2
        low, high = (middle, high) if upper_normal_tail(middle) > tail else (low, middle)
    return high


def gaussian_cdfs(scales, tail_mass):
    """One CDF per scale s of the discretized N(0, s^2), over [-half, half], half = ceil(s t) where
    P(|N(0, 1)| > t) = tail_mass. With Q the upper tail and t_k = (k + 1/2)/s: P(0) = 1 - 2 Q(t_0),
    P(+-k) = Q(t_(k-1)) - Q(t_k); the escape holds 2 Q(t_half). -> (cdfs, offsets)."""
    bound = normal_quantile(tail_mass / 2)
    cdfs, offsets = [], []
    for s in np.asarray(scales, dtype=np.float64):
        half = int(math.ceil(s * bound))
        tail = upper_normal_tail((np.arange(half + 1) + 0.5) / s)           # Q(t_0) ... Q(t_half)
        right = np.concatenate([[1 - 2 * tail[0]], tail[:-1] - tail[1:]])   # P(0) ... P(half)
        cdfs.append(pmf_to_quantized_cdf(np.concatenate([right[:0:-1], right]), 2 * tail[-1]))
        offsets.append(-half)
    return cdfs, offsets


def scale_table(low=0.11, high=256.0, levels=64):
    """The log-spaced scales exp(linspace(ln low, ln high, levels)) in float32 (CompressAI's get_scale_table)."""
    step = (log(high) - log(low)) / (levels - 1)
    return exp(log(low) + np.arange(levels) * step).astype(np.float32)
