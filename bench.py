"""Speed figures, printed, never asserted. Compare numbers from one run on one machine.

    python bench.py coder        # the range coder on 300k Gaussian-conditional symbols (a 768x512 image's y)
"""
import argparse
import time

import numpy as np
import torch

import entropy


def best_time(fn, repeat):
    """Fastest of `repeat` runs (the least disturbed by whatever else the machine does)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def sample_from_tables(cdfs, lengths, offsets, indexes, rng):
    """Draw one value per index from that row's own quantized distribution (escape symbol excluded)."""
    values = np.empty(len(indexes), dtype=np.int32)
    bits = 0.0
    for k in np.unique(indexes):
        where = np.flatnonzero(indexes == k)
        freqs = np.diff(cdfs[k, :lengths[k]]).astype(np.float64)[:-1]       # regular symbols only
        s = rng.choice(len(freqs), size=len(where), p=freqs / freqs.sum())
        values[where] = s + offsets[k]
        bits -= np.log2(freqs[s] / (1 << entropy.PRECISION)).sum()          # the ideal code length
    return values, bits


def bench_coder(args):
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    gaussian = entropy.GaussianConditional()
    gaussian.update()
    cdfs, lengths, offsets = (t.numpy() for t in (gaussian.quantized_cdf, gaussian.cdf_length, gaussian.offset))
    # Scales of a trained hyperprior's y are mostly small: log-uniform in [0.11, 20] is a fair stand-in.
    scales = torch.exp(torch.empty(args.symbols).uniform_(np.log(0.11), np.log(20.0)))
    indexes = gaussian.build_indexes(scales).numpy()
    values, ideal_bits = sample_from_tables(cdfs, lengths, offsets, indexes, rng)
    entropy.decode_symbols(entropy.encode_symbols(values[:10], indexes[:10], cdfs, lengths, offsets),
                           indexes[:10], cdfs, lengths, offsets)                  # compile outside the clock
    t_enc, data = best_time(lambda: entropy.encode_symbols(values, indexes, cdfs, lengths, offsets), args.repeat)
    t_dec, out = best_time(lambda: entropy.decode_symbols(data, indexes, cdfs, lengths, offsets), args.repeat)
    assert np.array_equal(out, values), "round trip failed"
    n = args.symbols
    print(f"coder: {n} symbols, {len(data)} bytes, ideal {ideal_bits / 8:.0f} bytes "
          f"(overhead {100 * (8 * len(data) / ideal_bits - 1):.4f}%)")
    print(f"  encode {n / t_enc / 1e6:.1f} M symbols/s ({t_enc * 1e3:.1f} ms)")
    print(f"  decode {n / t_dec / 1e6:.1f} M symbols/s ({t_dec * 1e3:.1f} ms)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    coder = sub.add_parser("coder", help="range coder throughput and overhead over the ideal size")
    coder.add_argument("--symbols", type=int, default=300_000, help="how many symbols to code")
    coder.add_argument("--repeat", type=int, default=5, help="runs per figure; the fastest is reported")
    coder.set_defaults(run=bench_coder)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
