"""Speed figures, printed, never asserted: `python -m machinery.bench <what> --help` for each. Compare numbers from
one run on one machine; docs/speed.md gives them with their commands.

    python -m machinery.bench codec --backbone elic -N 192 -M 320        # the paper's model at the reference widths
    python -m machinery.bench gap --checkpoint runs/demo/best.pt         # real streams against -sum log2 p
    python -m machinery.bench bands --sizes 10000x10000                  # a 100-megapixel image
"""
import argparse
from types import SimpleNamespace

import numpy as np
import torch

import entropy
import rangecoder
import taco
from machinery import captioner, checkpoints, clip_text, container, metrics
from machinery.bench_scale import (PHOTOS, bench_bands, bench_caption, bench_sets, bench_train, photo, random_model,
                                   where)
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
    model = random_model(backbone, N, M, text_adapter).to(device)
    if text_adapter:
        model.attach_text_encoder(clip_text.TextEncoder(model.config.clip_model, "random").to(device))   # full size
    x = torch.rand(1, 3, height, width)
    loaded = peak_mib()
    first, data = best_time(lambda: model.compress(x, "a red barn in the snow"), 1)
    t_enc, data = best_time(lambda: model.compress(x, "a red barn in the snow"), repeat)
    t_dec, _ = best_time(lambda: model.decompress(data), repeat)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device.startswith("cuda") else peak_mib()
    queue.put((first, t_enc, t_dec, loaded, peak, len(data)))


def bench_codec(args):
    device, memory = where(args.device)
    print(f"codec on {device}, {args.width}x{args.height}, {args.backbone}, N={args.N} M={args.M}, random weights "
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
    # torch.load, the strict key check, update() of every table
    timings["load (tables rebuilt)"], (model, _) = best_time(lambda: checkpoints.load_checkpoint(path), 1)
    x, features = torch.rand(1, 3, height, width), torch.randn(1, 38, 512)     # CLIP token features given
    caption = features if model.config.text_adapter else ""
    timings["first compress"], data = best_time(lambda: model.compress(x, caption), 1)
    timings["first decompress"], _ = best_time(lambda: model.decompress(data), 1)
    queue.put(timings)


def bench_release(args):
    """A file laid out as the released lambda_*.pth.tar (a training state {"state_dict", "epoch"}: N=192, M=320,
    random weights, quantile ranges up to +-40 as trained ones reach): loaded, tables rebuilt, in a fresh process."""
    import os
    import tempfile

    from machinery import elic
    torch.manual_seed(0)
    state = elic.ElicTACO(elic.OFFICIAL).state_dict()
    quantiles = state["entropy_bottleneck.quantiles"]
    quantiles[:, 0, 0], quantiles[:, 0, 2] = -40 * torch.rand(len(quantiles)), 40 * torch.rand(len(quantiles))
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "lambda_0.004.pth.tar")
        torch.save({"state_dict": state, "epoch": 49}, path)
        timings = in_child(release_case, path, args.height, args.width)
    print(f"released-size checkpoint (N=192, M=320), {args.width}x{args.height}, CPU ({torch.get_num_threads()} "
          f"threads):")
    for name, seconds in timings.items():
        print(f"  {name:24s} {seconds * 1e3:8.0f} ms")


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
        model = random_model(backbone, *((192, 320) if backbone == "elic" else (128, 192)))
        label = f"{backbone}, random weights"
    if model.config.text_adapter:
        model.attach_text_encoder(clip_text.TextEncoder(model.config.clip_model, "random", model.config.text_tokens))
    return model, label


def integer_case(checkpoint, backbone, repeat, path, queue):
    """Integer or float entropy parameters on photos, in a fresh process: real file sizes, compress / decompress
    times. The float path is the same code given the float networks (before anything is coded): this machine's
    figures only, its files decode nowhere else."""
    model, label = coding_model(checkpoint, backbone)
    if path == "float":
        floats = float_path(model)
        model.integer_networks = lambda: floats                  # what integer.networks() converts
    sizes, t_enc, t_dec = [], 0.0, 0.0
    for name in PHOTOS:
        x = photo(name).float() / 255
        model.compress(x, name)                                              # warm-up
        seconds, file = best_time(lambda: model.compress(x, name), repeat)
        t_enc += seconds
        t_dec += best_time(lambda: model.decompress(file), repeat)[0]
        sizes.append(8 * len(file) / (x.shape[-1] * x.shape[-2]))
    queue.put((label, (sizes, t_enc, t_dec)))


def bench_integer(args):
    rows = {path: in_child(integer_case, args.checkpoint, args.backbone, args.repeat, path)
            for path in ("integer", "float")}
    label, rows = rows["integer"][0], {path: row[1] for path, row in rows.items()}
    print(f"integer vs float entropy parameters: {label}, CPU ({torch.get_num_threads()} threads), "
          f"{len(PHOTOS)} photos ({', '.join(PHOTOS)})")
    (int_bpp, int_enc, int_dec), (float_bpp, float_enc, float_dec) = rows["integer"], rows["float"]
    for name, a, b in zip(PHOTOS, int_bpp, float_bpp):
        print(f"  {name:12s} bpp integer {a:.4f}  float {b:.4f}  ({100 * (a / b - 1):+.2f}%)")
    print(f"  total bpp {100 * (sum(int_bpp) / sum(float_bpp) - 1):+.2f}%; compress {int_enc * 1e3:.0f} vs "
          f"{float_enc * 1e3:.0f} ms ({100 * (int_enc / float_enc - 1):+.1f}%), decompress {int_dec * 1e3:.0f} vs "
          f"{float_dec * 1e3:.0f} ms ({100 * (int_dec / float_dec - 1):+.1f}%)")


def gap_case(checkpoint, backbone, queue):
    """Real y and z streams (their lengths in the file's header) against the model's own estimate -sum log2 p."""
    model, label = coding_model(checkpoint, backbone)
    rows = {}
    for name in PHOTOS:
        x = photo(name)
        *_, z_bytes, y_bytes = container.HEADER.unpack_from(model.compress(x, name))
        with torch.no_grad():
            likelihoods = model(taco.pad_to_64(x.float() / 255), [name] if model.config.text_adapter else None)
        estimate = [float(metrics.bits(likelihoods["likelihoods"][k])) for k in ("y", "z")]
        rows[name] = (*estimate, 8 * y_bytes, 8 * z_bytes)
    queue.put((label, rows))


def bench_gap(args):
    label, rows = in_child(gap_case, args.checkpoint, args.backbone)
    print(f"real streams against the model's own estimate -sum log2 p: {label}, 4 photos")
    print(f"  {'photo':10s} {'y estimate':>11s} {'y stream':>17s} {'z estimate':>11s} {'z stream':>17s}")
    for name, (y_est, z_est, y, z) in [*rows.items(), ("all", np.sum(list(rows.values()), axis=0))]:
        print(f"  {name:10s} {y_est:11.0f} {y:9.0f} ({100 * (y / y_est - 1):+.2f}%) {z_est:11.0f} {z:9.0f} "
              f"({100 * (z / z_est - 1):+.2f}%)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)

    def command(name, run, text, size=False, widths=False, model=False, device=False, repeat=None):
        command = sub.add_parser(name, help=text)
        if size:
            command.add_argument("--height", type=int, default=512)
            command.add_argument("--width", type=int, default=768)
        if widths:
            command.add_argument("--backbone", default="hyperprior", help="hyperprior or elic (then use -N 192 -M 320)")
            command.add_argument("-N", type=int, default=128, help="transform channels")
            command.add_argument("-M", type=int, default=192, help="latent channels")
        if model:
            command.add_argument("--checkpoint", help="a trained checkpoint (e.g. runs/demo/best.pt); default random "
                                                      "weights")
            command.add_argument("--backbone", default="hyperprior", help="without --checkpoint: hyperprior or elic")
        if device:
            command.add_argument("--device", default="cpu", help="where the networks run: cpu, or cuda on a GPU "
                                                                 "machine")
        if repeat:
            command.add_argument("--repeat", type=int, default=repeat, help="runs per figure; the fastest is reported")
        command.set_defaults(run=run)
        return command
    coder = command("coder", bench_coder, "range coder throughput and overhead over the ideal size", repeat=5)
    coder.add_argument("--symbols", type=int, default=300_000, help="how many symbols to code")
    command("codec", bench_codec, "compress/decompress time and peak memory (random weights), 768x512 by default",
            size=True, widths=True, device=True, repeat=3)
    command("integer", bench_integer, "integer vs float entropy parameters: bpp and coding time on 4 photos",
            model=True, repeat=2)
    command("gap", bench_gap, "real y / z streams against the model's own -sum log2 p on 4 photos", model=True)
    command("release", bench_release, "load a released-size checkpoint (tables rebuilt) and code its first image",
            size=True)
    training = command("train", bench_train, "training throughput and peak memory, with and without the adapter "
                                             "and the joint loss", device=True)
    training.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    training.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False,
                          help="bf16 autocast on GPU (train.py --bf16); default fp32 with TF32 matmuls, as train.py")
    banded = command("bands", bench_bands, "peak memory and time per megapixel at two image sizes", widths=True)
    banded.add_argument("--sizes", nargs="+", default=["1632x1224", "1632x9792"],
                        help="WIDTHxHEIGHT, smallest first (default 2 MP and 16 MP of the same width, so that the "
                             "bands have the same shape and the growth is what the image and latents hold)")
    banded.add_argument("--memory", type=int, help="the bands' working memory in MiB (codec.py --memory; default: "
                                                    "the model's)")
    caption = command("caption", bench_caption, "seconds per caption of the captioner (--caption auto): one photo "
                                                "at a time against side by side", device=True)
    captioner.add_arguments(caption)
    caption.add_argument("--photos", type=int, default=64, help="photos captioned one at a time and side by side")
    sets = command("sets", bench_sets, "CMMD and FID over large sets: time and peak memory (COCO-30k: 30000)")
    sets.add_argument("--sizes", nargs="+", type=int, default=[3000, 30000], help="images per set")
    sets.add_argument("--clip-dim", type=int, default=768, help="CLIP embedding width (ViT-L/14: 768)")
    sets.add_argument("--inception-dim", type=int, default=2048, help="Inception pool feature width")
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
