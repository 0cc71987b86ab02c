"""Speed figures, printed, never asserted. Compare numbers from one run on one machine.

    python bench.py coder        # the range coder on 300k Gaussian-conditional symbols (a 768x512 image's y)
    python bench.py codec        # compress / decompress time and peak memory, with and without the adapter
"""
import argparse
import multiprocessing
import resource
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
    cdfs, lengths, offsets = gaussian.tables()
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


def codec_case(N, M, text_adapter, height, width, repeat, queue):
    """One configuration, in its own process so that its peak memory is its own."""
    import taco
    torch.manual_seed(0)
    config = taco.TacoConfig(N=N, M=M, text_adapter=text_adapter, clip_pretrained="random")
    model = taco.TACO(config).eval().update()
    if text_adapter:
        model.attach_text_encoder()          # the full ViT-B-32 text tower, random weights: same cost
    x = torch.rand(1, 3, height, width)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    first = time.perf_counter()
    data = model.compress(x, "a red barn in the snow")
    first = time.perf_counter() - first
    t_enc, data = best_time(lambda: model.compress(x, "a red barn in the snow"), repeat)
    t_dec, _ = best_time(lambda: model.decompress(data), repeat)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put((first, t_enc, t_dec, baseline / 1024, peak / 1024, len(data)))


def bench_codec(args):
    context = multiprocessing.get_context("spawn")
    print(f"codec on CPU ({torch.get_num_threads()} threads), {args.width}x{args.height}, N={args.N} M={args.M}")
    for text_adapter in (False, True):
        queue = context.Queue()
        process = context.Process(target=codec_case, args=(args.N, args.M, text_adapter, args.height,
                                                            args.width, args.repeat, queue))
        process.start()
        first, t_enc, t_dec, before, peak, size = queue.get()
        process.join()
        name = "TACO (text adapter)" if text_adapter else "hyperprior (no text)"
        print(f"  {name:22s} compress {t_enc * 1e3:7.0f} ms (first call {first * 1e3:.0f} ms, caption "
              f"encoded then), decompress {t_dec * 1e3:7.0f} ms, peak RSS {peak:.0f} MiB "
              f"(model loaded: {before:.0f} MiB), {size} bytes")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    coder = sub.add_parser("coder", help="range coder throughput and overhead over the ideal size")
    coder.add_argument("--symbols", type=int, default=300_000, help="how many symbols to code")
    coder.add_argument("--repeat", type=int, default=5, help="runs per figure; the fastest is reported")
    coder.set_defaults(run=bench_coder)
    codec = sub.add_parser("codec", help="compress/decompress time and peak memory (random weights)")
    codec.add_argument("--height", type=int, default=512)
    codec.add_argument("--width", type=int, default=768)
    codec.add_argument("-N", type=int, default=128, help="transform channels")
    codec.add_argument("-M", type=int, default=192, help="latent channels")
    codec.add_argument("--repeat", type=int, default=3, help="runs per figure; the fastest is reported")
    codec.set_defaults(run=bench_codec)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
