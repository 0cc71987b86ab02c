"""Speed figures, printed, never asserted. Compare numbers from one run on one machine.

    python -m machinery.bench coder
        # the range coder on 300k Gaussian-conditional symbols (a 768x512 image's y)
    python -m machinery.bench codec
        # compress / decompress time and peak memory, with and without the adapter
    python -m machinery.bench codec --backbone elic -N 192 -M 320
        # the paper's model at the reference widths
    python -m machinery.bench integer --checkpoint runs/demo/best.pt
        # integer vs float entropy parameters
    python -m machinery.bench gap --checkpoint runs/demo/best.pt
        # real y and z streams against the model's own -sum log2 p, and the table choice's share of the gap
    python -m machinery.bench zoo
        # a CompressAI mbt2018-mean-sized file against our own checkpoint: load, compress, decompress
    python -m machinery.bench release
        # load a released-size checkpoint (tables rebuilt) and code its first image
    python -m machinery.bench train
        # training images/s and peak memory (demo and default configs)
    python -m machinery.bench bands
        # peak memory and time per megapixel at 2 and 16 MP: the growth per pixel
    python -m machinery.bench bands --sizes 10000x10000
        # a 100-megapixel image
"""
import argparse
import time
from types import SimpleNamespace

import numpy as np
import torch

import data
import entropy
import rangecoder
import taco
from machinery import captioner, checkpoints, clip_text, container
from machinery.bench_scale import bench_bands, bench_caption, bench_sets, bench_train
from machinery.measure import best_time, in_child, peak_mib


def bench_coder(args):
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    gaussian = entropy.GaussianConditional()
    gaussian.update()
    cdfs, lengths, offsets = gaussian.tables()
    # Scales of a trained hyperprior's y are mostly small: log-uniform in [0.11, 20] is a fair stand-in.
    scales = torch.exp(torch.empty(args.symbols).uniform_(np.log(0.11), np.log(20.0)))
    indexes = gaussian.build_indexes(scales).numpy()
    values, ideal_bits = rangecoder.sample_from_tables(rng, cdfs, lengths, offsets, indexes)
    rangecoder.decode_symbols(rangecoder.encode_symbols(values[:10], indexes[:10], cdfs, lengths, offsets),
                           indexes[:10], cdfs, lengths, offsets)                  # compile outside the clock
    t_enc, data = best_time(lambda: rangecoder.encode_symbols(values, indexes, cdfs, lengths, offsets), args.repeat)
    t_dec, out = best_time(lambda: rangecoder.decode_symbols(data, indexes, cdfs, lengths, offsets), args.repeat)
    assert np.array_equal(out, values), "round trip failed"
    n = args.symbols
    print(f"coder: {n} symbols, {len(data)} bytes, ideal {ideal_bits / 8:.0f} bytes "
          f"(overhead {100 * (8 * len(data) / ideal_bits - 1):.4f}%)")
    print(f"  encode {n / t_enc / 1e6:.1f} M symbols/s ({t_enc * 1e3:.1f} ms)")
    print(f"  decode {n / t_dec / 1e6:.1f} M symbols/s ({t_dec * 1e3:.1f} ms)")


def codec_case(backbone, N, M, text_adapter, height, width, repeat, device, queue):
    torch.manual_seed(0)
    config = taco.TacoConfig(N=N, M=M, text_adapter=text_adapter, clip_pretrained="random", backbone=backbone)
    model = checkpoints.build_model(config).eval().update().to(device)
    if text_adapter:
        model.attach_text_encoder(clip_text.TextEncoder(config.clip_model, "random").to(device))   # full size
    x = torch.rand(1, 3, height, width)
    loaded = peak_mib()
    first = time.perf_counter()
    data = model.compress(x, "a red barn in the snow")
    first = time.perf_counter() - first
    t_enc, data = best_time(lambda: model.compress(x, "a red barn in the snow"), repeat)
    t_dec, _ = best_time(lambda: model.decompress(data), repeat)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device.startswith("cuda") else peak_mib()
    queue.put((first, t_enc, t_dec, loaded, peak, len(data)))


def bench_codec(args):
    where = args.device if args.device != "cpu" else f"CPU ({torch.get_num_threads()} threads)"
    memory = "peak GPU memory" if args.device != "cpu" else "peak RSS"
    print(f"codec on {where}, {args.width}x{args.height}, {args.backbone}, N={args.N} M={args.M}, random weights "
          f"(entropy coding always on the CPU)")
    for text_adapter in ((True,) if args.backbone == "elic" else (False, True)):
        first, t_enc, t_dec, loaded, peak, size = in_child(codec_case, args.backbone, args.N, args.M, text_adapter,
                                                           args.height, args.width, args.repeat, args.device)
        name = "with text adapter" if text_adapter else "no text adapter"
        print(f"  {name:18s} compress {t_enc * 1e3:7.0f} ms (first call {first * 1e3:.0f} ms, caption "
              f"encoded then), decompress {t_dec * 1e3:7.0f} ms, {memory} {peak:.0f} MiB "
              f"(RSS with the model loaded: {loaded:.0f} MiB), {size} bytes")


def release_case(path, height, width, queue):
    timings = {}
    start = time.perf_counter()
    model, _ = checkpoints.load_checkpoint(path)              # torch.load, strict key check, update() of every table
    timings["load (tables rebuilt)"] = time.perf_counter() - start
    x, features = torch.rand(1, 3, height, width), torch.randn(1, 38, 512)     # CLIP token features given
    start = time.perf_counter()
    data = model.compress(x, features if model.config.text_adapter else "")
    timings["first compress"] = time.perf_counter() - start
    start = time.perf_counter()
    model.decompress(data)
    timings["first decompress"] = time.perf_counter() - start
    queue.put(timings)


def bench_release(args):
    """A file laid out as the released lambda_*.pth.tar (N=192, M=320, random weights, saved before any
    update(): empty coding tables, CompressAI >= 1.2.7 parameter names, a DDP "module." prefix)."""
    import os
    import tempfile

    from machinery import elic
    torch.manual_seed(0)
    state = elic.ElicTACO(elic.OFFICIAL).state_dict()
    with torch.no_grad():
        quantiles = state["entropy_bottleneck.quantiles"]
        quantiles[:, 0, 0], quantiles[:, 0, 2] = -40 * torch.rand(len(quantiles)), 40 * torch.rand(len(quantiles))
    for key in [k for k in state if k.endswith(entropy.TABLE_BUFFERS + ("scale_table",))]:
        state[key] = state[key].new_zeros(0)
    for ours, theirs in (("_matrix", "matrices."), ("_bias", "biases."), ("_factor", "factors.")):
        for i in range(5):
            if f"entropy_bottleneck.{ours}{i}" in state:
                state[f"entropy_bottleneck.{theirs}{i}"] = state.pop(f"entropy_bottleneck.{ours}{i}")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "lambda_0.004.pth.tar")
        torch.save({"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 49}, path)
        timings = in_child(release_case, path, args.height, args.width)
    print(f"released-size checkpoint (N=192, M=320, quantile ranges up to +-40), {args.width}x{args.height}, "
          f"CPU ({torch.get_num_threads()} threads):")
    for name, seconds in timings.items():
        print(f"  {name:24s} {seconds * 1e3:8.0f} ms")


def compressai_layout(state):
    """Our adapter-free hyperprior's state dict as CompressAI's MeanScaleHyperprior writes it in its zoo files:
    g_a as one Sequential, GDN's beta / gamma under their own names beside their parametrizers' buffers."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[:2] == ["g_a", "stages"]:
            stage, rest = int(parts[2]), parts[3:]
            parts = ["g_a", "6", *rest] if stage == 3 else ["g_a", str(2 * stage + int(rest[0])), *rest[1:]]
        if parts[-1] == "param":                                  # GDN's NonNegative: CompressAI keeps it bare
            parts = parts[:-1]
            for bound in ("pedestal", "lower_bound.bound"):
                out[".".join(parts[:-1] + [f"{parts[-1]}_reparam", bound])] = torch.tensor([2.0 ** -36])
        out[".".join(parts)] = value
    return out


def bench_zoo(args):
    """A zoo-sized CompressAI mbt2018-mean file (N=128, M=192, random weights, after update()) against our own
    checkpoint of the same model: load, first compress, first decompress, each in a fresh process."""
    import os
    import tempfile
    torch.manual_seed(0)
    model = taco.TACO(taco.TacoConfig(text_adapter=False)).eval().update()
    with tempfile.TemporaryDirectory() as folder:
        ours, zoo = os.path.join(folder, "ours.pt"), os.path.join(folder, "mbt2018-mean-3-0000.pth.tar")
        checkpoints.save_checkpoint(ours, model)
        torch.save(compressai_layout(model.state_dict()), zoo)
        timings = {name: in_child(release_case, path, args.height, args.width)
                   for name, path in (("ours", ours), ("CompressAI zoo file", zoo))}
    print(f"mbt2018-mean-sized checkpoint (N=128, M=192), {args.width}x{args.height}, CPU "
          f"({torch.get_num_threads()} threads): ours / CompressAI's zoo layout")
    for step, seconds in timings["ours"].items():
        print(f"  {step:24s} {seconds * 1e3:8.0f} ms / {timings['CompressAI zoo file'][step] * 1e3:8.0f} ms")


class InFloat32(torch.nn.Module):
    """A float network run on float32 copies of the coding loop's float64 inputs, its outputs returned in float64
    as the integer networks give them: the float path, for timing on this machine only."""

    def __init__(self, network, every_position=False):
        super().__init__()
        self.network, self.every_position = network, every_position

    def forward(self, x):
        if not self.every_position:
            return self.network(x.float()).double()
        # The reference computes ELIC's parameters at every position and keeps half; the coding loop gathers the
        # pass's half: the network also runs on as many other positions (1x1 convolutions), as it would there.
        return self.network(torch.cat([x, x], dim=-1).float())[..., :x.shape[-1]].double()


def float_path(model):
    """The model's coding-time networks in float32, doing the work the reference implementation does."""
    nets = vars(model.float_networks())
    wrap = lambda n, name: InFloat32(n, name in ("anchor", "nonanchor")) if n is not None else None  # noqa: E731
    return SimpleNamespace(**{k: [wrap(n, k) for n in v] if isinstance(v, (list, torch.nn.ModuleList)) else wrap(v, k)
                              for k, v in nets.items()})


def coding_model(checkpoint, backbone):
    """-> a checkpoint's model (or one of random weights at the reference widths) ready to code, its label. A
    text adapter reads captions through a text tower of random weights (the weights need a download)."""
    if checkpoint:
        model, _ = checkpoints.load_checkpoint(checkpoint)
        label = checkpoint
    else:
        torch.manual_seed(0)
        config = dict(N=192, M=320) if backbone == "elic" else {}
        model = checkpoints.build_model(taco.TacoConfig(clip_pretrained="random", backbone=backbone, **config))
        model.eval().update()
        label = f"{backbone}, random weights"
    if model.config.text_adapter:
        model.attach_text_encoder(clip_text.TextEncoder(model.config.clip_model, "random", model.config.text_tokens))
    return model, label


def integer_case(checkpoint, backbone, repeat, queue):
    """Integer vs float entropy parameters on photos: real file sizes, compress / decompress times."""
    import skimage.data

    model, label = coding_model(checkpoint, backbone)
    photos = {name: getattr(skimage.data, name)() for name in ("coffee", "chelsea", "astronaut", "rocket")}
    rows = {}
    for path in ("integer", "float"):
        if path == "float":                  # the same code with the float networks: this machine only
            floats = float_path(model)
            model.integer_networks = lambda: floats                  # what integer.networks() converts
            model.__dict__.pop("_integer_networks", None)            # and its cache of the integer ones
        sizes, t_enc, t_dec = [], 0.0, 0.0
        for name, array in photos.items():
            x = torch.from_numpy(array[:, :, :3].copy()).permute(2, 0, 1)[None].float() / 255
            model.compress(x, name)                                              # warm-up
            seconds, data = best_time(lambda: model.compress(x, name), repeat)
            t_enc += seconds
            t_dec += best_time(lambda: model.decompress(data), repeat)[0]
            sizes.append(8 * len(data) / (x.shape[-1] * x.shape[-2]))
        rows[path] = (sizes, t_enc, t_dec)
    queue.put((label, list(photos), rows))


def bench_integer(args):
    label, names, rows = in_child(integer_case, args.checkpoint, args.backbone, args.repeat)
    print(f"integer vs float entropy parameters: {label}, CPU ({torch.get_num_threads()} threads), "
          f"{len(names)} photos ({', '.join(names)})")
    (int_bpp, int_enc, int_dec), (float_bpp, float_enc, float_dec) = rows["integer"], rows["float"]
    for name, a, b in zip(names, int_bpp, float_bpp):
        print(f"  {name:12s} bpp integer {a:.4f}  float {b:.4f}  ({100 * (a / b - 1):+.2f}%)")
    print(f"  total bpp {100 * (sum(int_bpp) / sum(float_bpp) - 1):+.2f}%; compress {int_enc * 1e3:.0f} vs "
          f"{float_enc * 1e3:.0f} ms ({100 * (int_enc / float_enc - 1):+.1f}%), decompress {int_dec * 1e3:.0f} vs "
          f"{float_dec * 1e3:.0f} ms ({100 * (int_dec / float_dec - 1):+.1f}%)")


def rounded_up_indexes(gaussian, scales):
    """Format version 4's table choice (and CompressAI's), for comparison: the first table scale >= s."""
    scales = scales.detach().cpu().double().contiguous().clamp_min(gaussian.scale_bound)
    table = gaussian.scale_table.detach().cpu().double()
    return torch.bucketize(scales, table).clamp_max(len(table) - 1).to(torch.int32)


def gap_case(checkpoint, backbone, queue):
    """Real y and z streams against the model's own estimate -sum log2 p, and how often y escapes its table,
    with the nearest-in-log table choice and with the rounded-up one."""
    model, label = coding_model(checkpoint, backbone)
    photos = {name: data.skimage_photo(name)[:, :, :3] for name in ("coffee", "chelsea", "astronaut", "rocket")}
    escapes, rows = {}, {name: {} for name in photos}
    encode = container.CheckedEncoder.encode

    def counting(coder, symbols, indexes):                # every y symbol passes here, in coding order
        _, lengths, offsets = coder.tables
        k = indexes.numpy()
        shifted = symbols.numpy() - offsets[k]
        escapes[rule][0] += int(((shifted < 0) | (shifted >= lengths[k] - 2)).sum())
        escapes[rule][1] += shifted.size
        encode(coder, symbols, indexes)
    container.CheckedEncoder.encode = counting
    for rule in ("nearest", "rounded up"):
        escapes[rule] = [0, 0]
        if rule == "rounded up":
            gaussian = model.gaussian_conditional
            gaussian.build_indexes = lambda scales: rounded_up_indexes(gaussian, scales)
        for name, array in photos.items():
            x = torch.from_numpy(array.copy()).permute(2, 0, 1)[None]
            *_, z_bytes, y_bytes = container.HEADER.unpack_from(model.compress(x, name))
            rows[name][rule] = 8 * y_bytes, 8 * z_bytes
            if rule == "nearest":
                with torch.no_grad():
                    text = [name] if model.config.text_adapter else None
                    likelihoods = model(taco.pad_to_64(x.float() / 255), text)["likelihoods"]
                rows[name]["estimate"] = [float(-torch.log2(likelihoods[k]).sum()) for k in ("y", "z")]
    queue.put((label, rows, escapes))


def bench_gap(args):
    label, rows, escapes = in_child(gap_case, args.checkpoint, args.backbone)
    print(f"real streams against the model's own estimate -sum log2 p: {label}, 4 photos")
    print(f"  {'photo':10s} {'y estimate':>11s} {'y stream':>17s} {'(rounded up)':>17s} {'z estimate':>11s} "
          f"{'z stream':>17s}")
    total = np.zeros(5)
    for name, row in rows.items():
        (y_est, z_est), (y, z), (y_up, _) = row["estimate"], row["nearest"], row["rounded up"]
        total += (y_est, y, y_up, z_est, z)
        print(f"  {name:10s} {y_est:11.0f} {y:9.0f} ({100 * (y / y_est - 1):+.2f}%) {y_up:9.0f} "
              f"({100 * (y_up / y_est - 1):+.2f}%) {z_est:11.0f} {z:9.0f} ({100 * (z / z_est - 1):+.2f}%)")
    y_est, y, y_up, z_est, z = total
    print(f"  {'all':10s} y {100 * (y / y_est - 1):+.2f}% (rounded up: {100 * (y_up / y_est - 1):+.2f}%), "
          f"z {100 * (z / z_est - 1):+.2f}%")
    for rule, (escaped, n) in escapes.items():
        print(f"  y symbols outside their table ({rule}): {escaped} of {n} ({100 * escaped / n:.4f}%)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    coder = sub.add_parser("coder", help="range coder throughput and overhead over the ideal size")
    coder.add_argument("--symbols", type=int, default=300_000, help="how many symbols to code")
    coder.add_argument("--repeat", type=int, default=5, help="runs per figure; the fastest is reported")
    coder.set_defaults(run=bench_coder)
    coding = sub.add_parser("codec", help="compress/decompress time and peak memory (random weights)")
    coding.add_argument("--height", type=int, default=512)
    coding.add_argument("--width", type=int, default=768)
    coding.add_argument("-N", type=int, default=128, help="transform channels")
    coding.add_argument("-M", type=int, default=192, help="latent channels")
    coding.add_argument("--repeat", type=int, default=3, help="runs per figure; the fastest is reported")
    coding.add_argument("--backbone", default="hyperprior", help="hyperprior or elic (then use -N 192 -M 320)")
    coding.add_argument("--device", default="cpu", help="where the transforms run: cpu, or cuda on a GPU machine")
    coding.set_defaults(run=bench_codec)
    exact = sub.add_parser("integer", help="integer vs float entropy parameters: bpp and coding time on photos")
    exact.add_argument("--checkpoint", help="a trained checkpoint (e.g. runs/demo/best.pt); default random weights")
    exact.add_argument("--backbone", default="hyperprior", help="without --checkpoint: hyperprior or elic")
    exact.add_argument("--repeat", type=int, default=2, help="runs per figure; the fastest is reported")
    exact.set_defaults(run=bench_integer)
    gap = sub.add_parser("gap", help="real y / z streams against the model's own -sum log2 p, table choices "
                                     "side by side, escapes")
    gap.add_argument("--checkpoint", help="a trained checkpoint (e.g. runs/demo/best.pt); default random weights")
    gap.add_argument("--backbone", default="hyperprior", help="without --checkpoint: hyperprior or elic")
    gap.set_defaults(run=bench_gap)
    release = sub.add_parser("release", help="load a released-size checkpoint and code its first image")
    release.add_argument("--height", type=int, default=512)
    release.add_argument("--width", type=int, default=768)
    release.set_defaults(run=bench_release)
    zoo = sub.add_parser("zoo", help="load and code a CompressAI mbt2018-mean-sized file against our own checkpoint")
    zoo.add_argument("--height", type=int, default=512)
    zoo.add_argument("--width", type=int, default=768)
    zoo.set_defaults(run=bench_zoo)
    training = sub.add_parser("train", help="training throughput and peak memory, with and without the adapter "
                                            "and the joint loss")
    training.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    training.add_argument("--device", default="cpu", help="cpu, or cuda to measure a GPU")
    training.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False,
                          help="bf16 autocast on GPU (train.py --bf16); default fp32 with TF32 matmuls, as train.py")
    training.set_defaults(run=bench_train)
    banded = sub.add_parser("bands", help="peak memory and time per megapixel at two image sizes")
    banded.add_argument("--sizes", nargs="+", default=["1632x1224", "1632x9792"],
                        help="WIDTHxHEIGHT, smallest first (default 2 MP and 16 MP of the same width, so that the "
                             "bands have the same shape and the growth is what the image and latents hold)")
    banded.add_argument("--backbone", default="hyperprior", help="hyperprior or elic (then use -N 192 -M 320)")
    banded.add_argument("-N", type=int, default=128, help="transform channels")
    banded.add_argument("-M", type=int, default=192, help="latent channels")
    banded.add_argument("--memory", type=int, help="the bands' working memory in MiB (codec.py --memory; default: "
                                                    "the model's)")
    banded.set_defaults(run=bench_bands)
    caption = sub.add_parser("caption", help="seconds per caption of the captioner (--caption auto): cached against "
                                             "uncached, one photo at a time against side by side")
    captioner.add_arguments(caption)
    caption.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine")
    caption.add_argument("--photos", type=int, default=64, help="photos captioned one at a time and side by side")
    caption.add_argument("--uncached", type=int, default=2, help="photos captioned by the uncached loop (slow)")
    caption.set_defaults(run=bench_caption)
    sets = sub.add_parser("sets", help="CMMD and FID over large sets: time and peak memory (COCO-30k: 30000)")
    sets.add_argument("--sizes", nargs="+", type=int, default=[3000, 30000], help="images per set")
    sets.add_argument("--clip-dim", type=int, default=768, help="CLIP embedding width (ViT-L/14: 768)")
    sets.add_argument("--inception-dim", type=int, default=2048, help="Inception pool feature width")
    sets.set_defaults(run=bench_sets)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
