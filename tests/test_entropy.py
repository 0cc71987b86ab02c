"""Claims about rangecoder.py and entropy.py: the coder is lossless and near-optimal, the models' likelihoods
are densities."""
import copy
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from scipy.stats import norm

import rangecoder
from entropy import EntropyBottleneck, GaussianConditional, quantize
from machinery.tables import pmf_to_quantized_cdf
from rangecoder import check_cdfs, decode_symbols, encode_symbols

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_tables(rng, count=12, max_len=40):
    """Tables from random pmfs, including one very skewed row (long runs of 0xFF bytes, many carries)."""
    rows = []
    for _ in range(count):
        pmf = rng.random(int(rng.integers(1, max_len))) ** 4
        rows.append(pmf_to_quantized_cdf(pmf / pmf.sum() * 0.999, 0.001))
    rows.append(pmf_to_quantized_cdf([0.99998, 0.00001], 0.00001))
    table = np.zeros((len(rows), max(map(len, rows))), dtype=np.int32)
    for k, row in enumerate(rows):
        table[k, :len(row)] = row
    lengths = np.array([len(r) for r in rows], dtype=np.int32)
    offsets = -rng.integers(0, 20, len(rows)).astype(np.int32)
    return table, lengths, offsets


def roundtrip(values, indexes, tables):
    data = encode_symbols(values, indexes, *tables)
    return data, decode_symbols(data, indexes, *tables)


@pytest.mark.core
@pytest.mark.parametrize("n", [0, 1, 1000, 1_000_000])
def test_roundtrip_is_exact_for_random_symbols_and_escapes(n):
    rng = np.random.default_rng(n)
    tables = random_tables(rng)
    indexes = rng.integers(0, len(tables[0]), n).astype(np.int32)
    values = rng.integers(-60, 60, n).astype(np.int32)          # many outside their row: escapes
    _, decoded = roundtrip(values, indexes, tables)
    assert decoded.dtype == np.int32 and np.array_equal(decoded, values)


def test_every_int32_roundtrips_however_far_in_the_tails():
    rng = np.random.default_rng(1)
    tables = random_tables(rng)
    extremes = np.array([2 ** 31 - 1, -2 ** 31, 2 ** 31 - 2, -2 ** 31 + 1, 0, 1, -1, 65536, -65537], np.int32)
    values = np.concatenate([extremes, rng.integers(-2 ** 31, 2 ** 31, 5000, dtype=np.int64).astype(np.int32)])
    for k in range(len(tables[0])):                              # every row, with its own offset
        indexes = np.full(len(values), k, dtype=np.int32)
        assert np.array_equal(roundtrip(values, indexes, tables)[1], values)


def test_empty_input_gives_empty_bytes():
    tables = random_tables(np.random.default_rng(2))
    assert encode_symbols([], [], *tables) == b""
    assert decode_symbols(b"", [], *tables).size == 0


def sample_from_tables(rng, cdfs, cdf_lengths, offsets, indexes):
    """Draw one value per index from that row's own quantized distribution (escape excluded), and the ideal
    code length of them all in bits, -sum log2(freq / 2**16): what the coder is held to."""
    values, bits = np.empty(len(indexes), dtype=np.int32), 0.0
    for k in np.unique(indexes):
        where = np.flatnonzero(indexes == k)
        freqs = np.diff(cdfs[k, :cdf_lengths[k]]).astype(np.float64)[:-1]   # regular symbols only
        s = rng.choice(len(freqs), size=len(where), p=freqs / freqs.sum())
        values[where] = s + offsets[k]
        bits -= np.log2(freqs[s] / (1 << rangecoder.PRECISION)).sum()
    return values, bits


@pytest.mark.core
def test_bits_match_entropy_within_1pct():
    rng = np.random.default_rng(3)
    tables = random_tables(rng)
    indexes = rng.integers(0, len(tables[0]), 200_000).astype(np.int32)
    values, ideal_bits = sample_from_tables(rng, *tables, indexes)
    data, decoded = roundtrip(values, indexes, tables)
    assert np.array_equal(decoded, values)
    assert 8 * len(data) <= ideal_bits * 1.01 + 8 * 8
    assert 8 * len(data) >= ideal_bits - 8                        # no code beats the entropy


@pytest.mark.core
def test_gaussian_tables_code_within_1pct_of_entropy():
    rng = np.random.default_rng(4)
    gaussian = GaussianConditional()
    gaussian.update()
    tables = gaussian.tables()
    indexes = rng.integers(0, 64, 100_000).astype(np.int32)
    values, ideal_bits = sample_from_tables(rng, *tables, indexes)
    data, decoded = roundtrip(values, indexes, tables)
    assert np.array_equal(decoded, values)
    assert abs(8 * len(data) - ideal_bits) <= 0.01 * ideal_bits + 64


def test_compiled_coder_writes_the_same_bytes_as_the_readable_python():
    code = textwrap.dedent("""
        import numpy as np, sys
        sys.path.insert(0, %r)
        import rangecoder
        from machinery import tables
        rng = np.random.default_rng(5)
        cdf = tables.pmf_to_quantized_cdf([0.5, 0.3, 0.15, 0.05], 0.001)[None]
        values = rng.integers(-9, 12, 3000).astype(np.int32)
        indexes = np.zeros(3000, np.int32)
        data = rangecoder.encode_symbols(values, indexes, cdf, np.array([6]), np.array([-1]))
        assert np.array_equal(rangecoder.decode_symbols(data, indexes, cdf, np.array([6]), np.array([-1])), values)
        sys.stdout.write(data.hex())
    """ % ROOT)
    outputs = []
    for disable in ("0", "1"):
        env = dict(os.environ, NUMBA_DISABLE_JIT=disable)
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        outputs.append(run.stdout)
    assert outputs[0] == outputs[1] and len(outputs[0]) > 0


@pytest.mark.slow
def test_decoding_garbage_or_truncated_bytes_terminates_without_crashing():
    """In a child process, so that a hang hits the timeout and a crash shows in the exit code."""
    code = textwrap.dedent("""
        import numpy as np, sys
        sys.path[:0] = [%r, %r]
        import rangecoder
        from test_entropy import random_tables        # (not tests.test_entropy: some packages install a "tests")
        rng = np.random.default_rng(6)
        tables = random_tables(rng)
        indexes = rng.integers(0, len(tables[0]), 20000).astype(np.int32)
        good = rangecoder.encode_symbols(rng.integers(-30, 30, 20000).astype(np.int32), indexes, *tables)
        inputs = [rng.bytes(int(rng.integers(0, 3000))) for _ in range(300)]
        inputs += [good[:int(rng.integers(0, len(good)))] for _ in range(100)]
        inputs += [bytes([255]) * 5000, bytes(5000)]
        errors = 0
        for data in inputs:
            try:
                out = rangecoder.decode_symbols(data, indexes, *tables)
                assert out.shape == indexes.shape
            except ValueError:
                errors += 1
        print(errors, len(inputs))
    """ % (ROOT, os.path.join(ROOT, "tests")))
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    errors, total = map(int, run.stdout.split())
    assert 0 < errors <= total                                    # garbage is caught, at least sometimes


def test_quantized_cdf_gives_every_symbol_a_frequency_and_sums_to_precision():
    pmf = np.array([0.7, 0.0, 1e-12, 0.3 - 1e-12])
    cdf = pmf_to_quantized_cdf(pmf, 0.0)
    freqs = np.diff(cdf)
    assert cdf[0] == 0 and cdf[-1] == 2 ** 16 and len(cdf) == len(pmf) + 2
    assert freqs.min() >= 1
    assert np.allclose(freqs[:-1] / 2 ** 16, pmf, atol=1e-3)


@pytest.mark.parametrize("bad", ["zero_frequency", "wrong_end", "nonzero_start", "short"])
def test_check_cdfs_rejects_tables_that_would_break_the_coder(bad):
    cdf = np.array([[0, 100, 200, 65536]], dtype=np.int32)
    lengths, offsets = np.array([4]), np.array([0])
    if bad == "zero_frequency":
        cdf[0, 2] = 100
    elif bad == "wrong_end":
        cdf[0, 3] = 65535
    elif bad == "nonzero_start":
        cdf[0, 0] = 1
    else:
        lengths = np.array([1])
    with pytest.raises(ValueError):
        check_cdfs(cdf, lengths, offsets)
    with pytest.raises(ValueError):
        encode_symbols([0], [0], cdf, lengths, offsets)


@pytest.mark.core
def test_quantize_modes():
    x = torch.tensor([0.4, 1.6, -2.5, 3.2])
    means = torch.tensor([0.5, 0.5, 0.0, -0.2])
    assert torch.equal(quantize(x, "symbols", means), torch.tensor([0, 1, -2, 3], dtype=torch.int32))
    assert torch.allclose(quantize(x, "dequantize", means), torch.tensor([0.5, 1.5, -2.0, 2.8]))
    noisy = quantize(x.repeat(1000), "noise")
    assert (noisy - x.repeat(1000)).abs().max() <= 0.5
    x.requires_grad_(True)
    quantize(x, "ste", means).sum().backward()
    assert torch.equal(x.grad, torch.ones(4))


@pytest.mark.core
def test_each_scale_codes_with_the_table_level_nearest_in_log_scale():
    gaussian = GaussianConditional()
    table = gaussian.scale_table.double().numpy()
    scales = np.exp(np.random.default_rng(0).uniform(np.log(0.05), np.log(400), 20000))
    distance = np.abs(np.log(scales)[:, None] - np.log(table)[None, :])             # (scales, levels)
    two_nearest = np.sort(distance, 1)[:, :2]
    clear = two_nearest[:, 1] - two_nearest[:, 0] > 1e-9             # not within log's rounding of a tie
    chosen = gaussian.build_indexes(torch.from_numpy(scales)).numpy()
    assert clear.mean() > 0.99 and np.array_equal(chosen[clear], distance.argmin(1)[clear])
    assert gaussian.build_indexes(torch.tensor([1e-3, 0.11, 256.0, 1e4])).tolist() == [0, 0, 63, 63]  # the ends
    assert gaussian.build_indexes(torch.from_numpy(table)).tolist() == list(range(64))
    midpoints = np.sqrt(table[:-1] * table[1:])                      # exact ties: the wider level
    assert gaussian.build_indexes(torch.from_numpy(midpoints)).tolist() == list(range(1, 64))
    assert gaussian.build_indexes(torch.from_numpy(np.nextafter(midpoints, 0))).tolist() == list(range(63))


@pytest.mark.core
def test_gaussian_likelihood_matches_scipy():
    v = torch.linspace(-6, 6, 25, dtype=torch.float64)
    scales = torch.full_like(v, 1.7)
    means = torch.full_like(v, 0.3)
    ours = GaussianConditional().likelihood(v, scales, means)
    reference = norm.cdf(v + 0.5, loc=0.3, scale=1.7) - norm.cdf(v - 0.5, loc=0.3, scale=1.7)
    assert np.allclose(ours.numpy(), reference, rtol=1e-6, atol=1e-12)


def test_gaussian_likelihoods_sum_to_one_over_the_integers():
    v = torch.arange(-400, 401, dtype=torch.float64).view(-1, 1)
    scales = torch.tensor([[0.11, 0.5, 3.0, 40.0]], dtype=torch.float64)
    means = torch.tensor([[0.0, 0.3, -0.7, 5.2]], dtype=torch.float64)
    total = GaussianConditional().likelihood(v, scales.expand(len(v), 4), means.expand(len(v), 4)).sum(0)
    assert torch.allclose(total, torch.ones(4, dtype=torch.float64), atol=1e-6)


def test_bottleneck_likelihoods_sum_to_one_over_the_integers():
    torch.manual_seed(0)
    bottleneck = EntropyBottleneck(3).eval()
    v = torch.arange(-300, 301, dtype=torch.float32).view(1, 1, -1, 1).expand(1, 3, -1, 1).contiguous()
    with torch.no_grad():
        likelihoods = bottleneck._likelihood(v.permute(1, 0, 2, 3).reshape(3, 1, -1))
    assert torch.allclose(likelihoods.sum(-1).squeeze(), torch.ones(3), atol=1e-4)


def test_bottleneck_aux_loss_moves_only_the_quantiles_toward_their_targets():
    torch.manual_seed(0)
    bottleneck = EntropyBottleneck(4)
    optimizer = torch.optim.Adam([bottleneck.quantiles], lr=1.0)
    first = bottleneck.aux_loss().item()
    for _ in range(300):
        optimizer.zero_grad()
        bottleneck.aux_loss().backward()
        optimizer.step()
    assert bottleneck.aux_loss().item() < 0.1 * first
    # the density is not moved by it
    assert all(p.grad is None for n, p in bottleneck.named_parameters() if n != "quantiles")


@pytest.mark.core
def test_bottleneck_compress_roundtrip_equals_dequantize():
    torch.manual_seed(0)
    bottleneck = EntropyBottleneck(8).eval()
    bottleneck.update()
    z = torch.randn(2, 8, 5, 7) * 4
    z[0, 0, 0, 0] = 1000.0                                        # far outside the tables: escape
    data = bottleneck.compress(z)
    z_hat = bottleneck.decompress(data, z.shape)
    assert torch.equal(z_hat, quantize(z, "dequantize", bottleneck.medians.view(1, -1, 1, 1)))
    assert torch.equal(z_hat, bottleneck(z)[0])


@pytest.mark.core
def test_gaussian_compress_roundtrip_equals_dequantize():
    torch.manual_seed(0)
    gaussian = GaussianConditional().eval()
    gaussian.update()
    scales = torch.rand(1, 16, 8, 8) * 10
    means = torch.randn(1, 16, 8, 8)
    y = means + scales * torch.randn(1, 16, 8, 8)
    y[0, 0, 0, 0] = -5000.0
    data = gaussian.compress(y, scales, means)
    y_hat = gaussian.decompress(data, scales, means)
    assert torch.equal(y_hat, quantize(y, "dequantize", means))
    assert torch.equal(y_hat, gaussian(y, scales, means)[0])


def test_tables_survive_a_state_dict_roundtrip_into_a_fresh_model():
    torch.manual_seed(0)
    source = EntropyBottleneck(5).eval()
    source.update()
    target = EntropyBottleneck(5).eval()
    target.load_state_dict(source.state_dict())
    z = torch.randn(1, 5, 4, 4) * 3
    assert torch.equal(target.decompress(source.compress(z), z.shape), source.decompress(source.compress(z), z.shape))


def test_coding_without_tables_says_to_call_update():
    with pytest.raises(RuntimeError, match="update"):
        GaussianConditional().compress(torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1))


def test_decoding_in_several_calls_equals_decoding_at_once():
    rng = np.random.default_rng(7)
    tables = random_tables(rng)
    indexes = rng.integers(0, len(tables[0]), 5000).astype(np.int32)
    values = rng.integers(-40, 40, 5000).astype(np.int32)
    data = encode_symbols(values, indexes, *tables)
    decoder = rangecoder.SymbolDecoder(data)
    cuts = [0, 1, 700, 701, 3000, 5000]
    parts = [decoder.decode(indexes[a:b], *tables) for a, b in zip(cuts, cuts[1:])]
    assert np.array_equal(np.concatenate(parts), values)


def test_encoding_in_several_calls_gives_the_bytes_of_one_call():
    rng = np.random.default_rng(8)
    tables = random_tables(rng)
    indexes = rng.integers(0, len(tables[0]), 5000).astype(np.int32)
    values = rng.integers(-40, 40, 5000).astype(np.int32)          # many escapes as well
    encoder = rangecoder.SymbolEncoder()
    cuts = [0, 1, 700, 701, 3000, 5000]
    for a, b in zip(cuts, cuts[1:]):
        encoder.encode(values[a:b], indexes[a:b], *tables)
    data = encoder.finish()
    assert data == encode_symbols(values, indexes, *tables)
    assert np.array_equal(decode_symbols(data, indexes, *tables), values)


def per_channel_tables(bottleneck):
    """The factorized prior's tables computed the slow, obvious way: each channel alone, on its own grid, with
    torch's float64 functions (the last bits differ from tables.py's, far too little to move a frequency)."""
    bottleneck = copy.deepcopy(bottleneck).double()
    q = bottleneck.quantiles.detach()
    cdfs, offsets = [], []
    with torch.no_grad():
        for c in range(q.shape[0]):
            median = q[c, 0, 1]
            low = int(torch.ceil(median - q[c, 0, 0]).clamp_min(0))
            high = int(torch.ceil(q[c, 0, 2] - median).clamp_min(0))
            v = (median + torch.arange(-low, high + 1).double()).view(1, 1, -1).expand(q.shape[0], 1, -1)
            pmf = bottleneck._likelihood(v)[c, 0]
            below = torch.sigmoid(bottleneck._logits_cumulative(v[:, :, :1] - 0.5)[c, 0, 0])
            above = torch.sigmoid(-bottleneck._logits_cumulative(v[:, :, -1:] + 0.5)[c, 0, 0])
            cdfs.append(pmf_to_quantized_cdf(pmf.double().numpy(), float(below + above)))
            offsets.append(-low)
    return cdfs, offsets


def test_fast_bottleneck_update_equals_the_per_channel_computation():
    torch.manual_seed(3)
    bottleneck = EntropyBottleneck(24)
    with torch.no_grad():
        for p in bottleneck.parameters():
            p.add_(0.3 * torch.randn_like(p))
        bottleneck.quantiles[:, 0, 0] -= torch.rand(24) * 20                 # uneven ranges per channel
        bottleneck.quantiles[:, 0, 2] += torch.rand(24) * 30
    bottleneck.update()
    cdfs, offsets = per_channel_tables(bottleneck)
    table, lengths, ours = bottleneck.tables()
    assert lengths.tolist() == [len(c) for c in cdfs] and ours.tolist() == offsets
    for row, cdf in zip(table, cdfs):
        assert row[:len(cdf)].tolist() == cdf.tolist()


def test_gaussian_tables_cost_at_most_003_bits_per_symbol_over_the_true_pmf():
    """Cross-entropy of the quantized table against the true discretized Gaussian (scipy), minus its entropy:
    the price of 16-bit tables, at every scale of the table, the widest included."""
    from scipy.stats import norm
    gaussian = GaussianConditional()
    gaussian.update()
    cdfs, lengths, offsets = gaussian.tables()
    for k, scale in enumerate(gaussian.scale_table.double().numpy()):
        v = np.arange(lengths[k] - 2) + offsets[k]
        p = norm.cdf((v + 0.5) / scale) - norm.cdf((v - 0.5) / scale)
        p = np.append(p, 1 - p.sum())                                        # the escape: both tails
        q = np.diff(cdfs[k, :lengths[k]]) / 2 ** 16
        inside = p > 0
        extra = (p[inside] * np.log2(p[inside] / q[inside])).sum()
        assert extra <= 0.03, (scale, extra)
