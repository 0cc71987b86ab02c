"""Speed and memory figures, printed, never asserted: `python bench.py <what> --help` for each. Every figure but the
coder's is measured in a fresh child process, so that its peak memory is its own; compare numbers from one run on
one machine. docs/speed.md gives them with their commands.

    python bench.py coder                                      # the range coder against the ideal size
    python bench.py codec --backbone elic -N 192 -M 320        # the paper's model at the reference widths
    python bench.py gap --checkpoint runs/demo/best.pt         # real streams against -sum log2 p
    python bench.py reference --checkpoint runs/demo/best.pt   # our bpp against the reference's coding choices
    python bench.py bands --sizes 1632x1224 10000x10000        # a 100-megapixel image
"""
import argparse
import multiprocessing
import os
import queue as queues
import resource
import tempfile
import time

import numpy as np
import torch

import data
import entropy
import rangecoder
import taco
from machinery import captioner, checkpoints, clip_text, container, images, metrics

PHOTOS = ("coffee", "chelsea", "astronaut", "rocket")      # the benchmarks' photos (scikit-image's)


# ----------------------------------------------------------------------------------------------------------
# Measuring: the best time over repeats, the peak memory of a fresh process, and what is measured
# ----------------------------------------------------------------------------------------------------------
def best_time(fn, repeat):
    """Fastest of `repeat` runs (the least disturbed by whatever else the machine does) and the last result."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def in_child(target, *args):
    """Run target(*args, queue) in a fresh process, so that its peak memory is its own; return what it puts."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    while True:
        try:
            result = queue.get(timeout=1)
            break
        except queues.Empty:
            if not process.is_alive():
                raise SystemExit(f"the measured process failed (exit status {process.exitcode})")
    process.join()
    return result


def peak_mib():
    """This process's peak RSS in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def where(device):
    """-> where a benchmark runs, and what its memory figure is."""
    if device == "cpu":
        return f"CPU ({torch.get_num_threads()} threads)", "peak RSS"
    return device, "peak GPU memory"


def photo(name):
    """One of scikit-image's photos as (1, 3, H, W) uint8."""
    return torch.from_numpy(data.skimage_photo(name)[:, :, :3].copy()).permute(2, 0, 1)[None]


def random_model(backbone="hyperprior", N=128, M=192, text_adapter=True):
    """A codec of seeded random weights, ready to code (text_adapter: through a random CLIP text tower)."""
    torch.manual_seed(0)
    config = taco.TacoConfig(N=N, M=M, text_adapter=text_adapter, clip_pretrained="random", backbone=backbone)
    return checkpoints.build_model(config).eval().update()


# ----------------------------------------------------------------------------------------------------------
# Coding: the range coder, the codec, real streams against the model's estimate, a released file
# ----------------------------------------------------------------------------------------------------------
def bench_coder(args):
    """Symbols y = round(N(0, s^2)) with s log-uniform in [0.11, 20] (a trained hyperprior's scales are mostly
    small), coded with the Gaussian conditional's tables; the bytes against the model's own -sum log2 p (its
    likelihoods at each symbol's own scale), so the overhead includes coding with the nearest table scale."""
    torch.manual_seed(0)
    gaussian = entropy.GaussianConditional().eval()
    gaussian.update()
    scales = torch.exp(torch.empty(args.symbols).uniform_(np.log(0.11), np.log(20.0)))
    y = torch.round(scales * torch.randn(args.symbols))
    ideal_bits = float(metrics.bits(gaussian(y, scales)[1].double()))
    symbols, indexes, tables = y.to(torch.int32).numpy(), gaussian.build_indexes(scales).numpy(), gaussian.tables()
    rangecoder.decode_symbols(rangecoder.encode_symbols(symbols[:10], indexes[:10], *tables), indexes[:10],
                              *tables)                                       # compile outside the clock
    t_enc, stream = best_time(lambda: rangecoder.encode_symbols(symbols, indexes, *tables), args.repeat)
    t_dec, out = best_time(lambda: rangecoder.decode_symbols(stream, indexes, *tables), args.repeat)
    assert np.array_equal(out, symbols), "round trip failed"
    n = args.symbols
    print(f"coder: {n} symbols, {len(stream)} bytes, ideal {ideal_bits / 8:.0f} bytes by the model's likelihoods "
          f"(overhead {100 * (8 * len(stream) / ideal_bits - 1):.4f}%)")
    print(f"  encode {n / t_enc / 1e6:.1f} M symbols/s ({t_enc * 1e3:.1f} ms)")
    print(f"  decode {n / t_dec / 1e6:.1f} M symbols/s ({t_dec * 1e3:.1f} ms)")


def codec_case(backbone, N, M, text_adapter, height, width, repeat, device, queue):
    model = random_model(backbone, N, M, text_adapter).to(device)
    if text_adapter:
        model.attach_text_encoder(clip_text.TextEncoder(model.config.clip_model, "random").to(device))   # full size
    x = torch.rand(1, 3, height, width)
    loaded = peak_mib()
    first, stream = best_time(lambda: model.compress(x, "a red barn in the snow"), 1)
    t_enc, stream = best_time(lambda: model.compress(x, "a red barn in the snow"), repeat)
    t_dec, _ = best_time(lambda: model.decompress(stream), repeat)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device.startswith("cuda") else peak_mib()
    queue.put((first, t_enc, t_dec, loaded, peak, len(stream)))


def bench_codec(args):
    """Random pixels, without the text adapter and with it (ELIC: with it), each in a fresh process."""
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


def gap_case(checkpoint, backbone, queue):
    """Real y and z streams (their lengths from the file's header) against the model's own estimate -sum log2 p
    (an eval-mode forward, which computes what coding does)."""
    if checkpoint:
        model, label = checkpoints.load_checkpoint(checkpoint)[0], checkpoint
    else:
        model = random_model(backbone, *((192, 320) if backbone == "elic" else (128, 192)))
        label = f"{backbone}, random weights"
    if model.config.text_adapter:          # captions read through a text tower of random weights (no download)
        model.attach_text_encoder(clip_text.TextEncoder(model.config.clip_model, "random", model.config.text_tokens))
    rows = {}
    for name in PHOTOS:
        x = photo(name)
        info = container.unpack(model.compress(x, name), container.fingerprint(model))
        with torch.no_grad():
            likelihoods = model(taco.pad_to_64(x.float() / 255), [name] if model.config.text_adapter else None)
        estimate = [float(metrics.bits(likelihoods["likelihoods"][k])) for k in ("y", "z")]
        rows[name] = (*estimate, 8 * len(info.y_bytes), 8 * len(info.z_bytes))
    queue.put((label, rows))


def bench_gap(args):
    label, rows = in_child(gap_case, args.checkpoint, args.backbone)
    print(f"real streams against the model's own estimate -sum log2 p: {label}, {len(PHOTOS)} photos")
    print(f"  {'photo':10s} {'y estimate':>11s} {'y stream':>17s} {'z estimate':>11s} {'z stream':>17s}")
    for name, (y_est, z_est, y, z) in [*rows.items(), ("all", np.sum(list(rows.values()), axis=0))]:
        print(f"  {name:10s} {y_est:11.0f} {y:9.0f} ({100 * (y / y_est - 1):+.2f}%) {z_est:11.0f} {z:9.0f} "
              f"({100 * (z / z_est - 1):+.2f}%)")


def reference_case(checkpoint, backbone, queue):
    """The same photos coded four ways, real files each: ours; with the reference's table choice (CompressAI's
    build_indexes: the first table scale >= sigma, where ours takes the nearest in log sigma); with zeros padding
    the image to a multiple of 64 (the reference's F.pad) instead of its edges; and with both."""
    if checkpoint:
        model, label = checkpoints.load_checkpoint(checkpoint)[0], checkpoint
    else:
        model = random_model(backbone, *((192, 320) if backbone == "elic" else (128, 192)))
        label = f"{backbone}, random weights (trained weights differ the other way: pass --checkpoint)"
    if model.config.text_adapter:
        model.attach_text_encoder(clip_text.TextEncoder(model.config.clip_model, "random", model.config.text_tokens))
    conditional = model.gaussian_conditional
    levels = conditional.scale_table.double()
    nearest = conditional.build_indexes
    def round_up(scales):                                   # CompressAI's rule: the first level >= sigma
        first_above = torch.bucketize(entropy.to_cpu(scales).double().contiguous(), levels)
        return first_above.clamp_max(len(levels) - 1).to(torch.int32)
    rows = {}
    coco_sized = {f"{name} (crop)": photo(name)[..., :480, :640] for name in ("hubble_deep_field", "stereo_motorcycle")}
    for name, x in [*((name, photo(name)) for name in PHOTOS), *coco_sized.items()]:   # COCO's 640x480: 32 rows
        H, W = x.shape[-2:]
        zeros = torch.nn.functional.pad(x, (0, -W % 64, 0, -H % 64))             # what F.pad(x, ..., value=0) gives
        sizes = []
        for picture, rule in ((x, nearest), (x, round_up), (zeros, nearest), (zeros, round_up)):
            conditional.build_indexes = rule                # this model instance only: both sides of its files
            sizes.append(8 * len(model.compress(picture, name)) / (H * W))
        rows[f"{name} {W}x{H}"] = sizes
    conditional.build_indexes = nearest
    queue.put((label, rows))


def bench_reference(args):
    label, rows = in_child(reference_case, args.checkpoint, args.backbone)
    print(f"bpp of our files against the reference pipeline's choices, real files: {label}")
    print(f"  {'photo':32s} {'ours':>7s} {'tables: first >= s':>21s} {'zero padding':>17s} {'both':>17s}")
    for name, (ours, *others) in [*rows.items(), ("mean", np.mean(list(rows.values()), axis=0))]:
        print(f"  {name:32s} {ours:7.4f}" + "".join(f" {b:8.4f} ({100 * (b / ours - 1):+.2f}%)" for b in others))


def release_case(path, height, width, queue):
    timings = {}
    timings["load (tables rebuilt)"], (model, _) = best_time(lambda: checkpoints.load_checkpoint(path), 1)
    config = model.config
    x = torch.rand(1, 3, height, width)
    caption = torch.randn(1, config.text_tokens, config.text_dim) if config.text_adapter else ""  # CLIP features
    timings["first compress"], stream = best_time(lambda: model.compress(x, caption), 1)
    timings["first decompress"], _ = best_time(lambda: model.decompress(stream), 1)
    queue.put(timings)


def bench_release(args):
    """In a fresh process: the file loaded (torch.load, the strict key check, update() of every table), then one
    compress and one decompress of random pixels (random CLIP token features for a caption)."""
    if not os.path.isfile(args.checkpoint):
        raise SystemExit(f"bench release: no such file {args.checkpoint} (a released lambda_*.pth.tar of the "
                         f"reference TACO, see docs/released.md)")
    timings = in_child(release_case, args.checkpoint, args.height, args.width)
    print(f"{args.checkpoint}, {args.width}x{args.height}, CPU ({torch.get_num_threads()} threads):")
    for name, seconds in timings.items():
        print(f"  {name:24s} {seconds * 1e3:8.0f} ms")


# ----------------------------------------------------------------------------------------------------------
# At scale: large images through the user's path, training, set metrics, captions
# ----------------------------------------------------------------------------------------------------------
def photo_like(height, width, seed=0):
    """A uint8 image with smooth structure and grain, made band by band (never a float image whole)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 64 + 2, width // 64 + 2, 3)).astype(np.float32)
    x = np.empty((height, width, 3), dtype=np.uint8)
    columns = np.arange(width) / 64
    for r0 in range(0, height, 256):
        rows = np.arange(r0, min(r0 + 256, height)) / 64
        top, left = rows.astype(int), columns.astype(int)
        fy, fx = (rows - top)[:, None, None], (columns - left)[None, :, None]
        band = (coarse[top][:, left] * (1 - fy) * (1 - fx) + coarse[top + 1][:, left] * fy * (1 - fx)
                + coarse[top][:, left + 1] * (1 - fy) * fx + coarse[top + 1][:, left + 1] * fy * fx)
        band += rng.normal(0, 6, band.shape).astype(np.float32)
        x[r0:r0 + len(rows)] = np.clip(band, 0, 255)
    return torch.from_numpy(x).permute(2, 0, 1)[None]


def bands_case(backbone, N, M, memory, step, png, taco_file, queue):
    """One step of the user's path in a fresh process (codec.py compress: PNG -> .taco, or decompress: .taco ->
    PNG): its time, and the peak RSS of the whole process and of the process with the model loaded."""
    model = random_model(backbone, N, M, text_adapter=backbone == "elic")
    config = model.config
    features = torch.zeros(1, config.text_tokens, config.text_dim)      # the caption's features (no text tower)
    before = peak_mib()
    start = time.perf_counter()
    if step == "compress":
        stream = model.compress(images.read_pixels(png, 1 << 28), features if config.text_adapter else "",
                                memory=memory)
        with open(taco_file, "wb") as f:
            f.write(stream)
    else:
        with open(taco_file, "rb") as f:
            stream = f.read()
        images.write_image(model.decompress(stream, dtype=None, memory=memory, max_pixels=1 << 28), png + ".out.png")
    queue.put((time.perf_counter() - start, before, peak_mib()))


def bench_bands(args):
    from PIL import Image
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes]
    print(f"bands: {args.backbone} N={args.N} M={args.M}, --memory {args.memory or 'default'} (MiB), CPU "
          f"({torch.get_num_threads()} threads), random weights, photo-like PNGs through images.read_pixels / "
          f"write_image; each step in a fresh process; peak RSS of the whole process")
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for width, height in [(64, 64)] + sizes:                # 64x64 first: the fixed cost of a step
            png, taco_file = os.path.join(folder, f"{width}x{height}.png"), os.path.join(folder, "image.taco")
            Image.fromarray(photo_like(height, width)[0].permute(1, 2, 0).numpy()).save(png, compress_level=1)
            for step in ("compress", "decompress"):
                seconds, before, peak = in_child(bands_case, args.backbone, args.N, args.M,
                                                 args.memory and args.memory * 2 ** 20, step, png, taco_file)
                results[width, height, step] = seconds, peak
                print(f"  {width}x{height} ({width * height / 1e6:.1f} MP) {step:10s} {seconds:7.1f} s "
                      f"({seconds / (width * height / 1e6):.2f} s/MP), peak RSS {peak:6.0f} MiB "
                      f"(model loaded: {before:.0f} MiB)")
    if len(sizes) >= 2:
        (w0, h0), (w1, h1) = sizes[0], sizes[-1]
        if w0 != w1:
            print("  (the widths differ, so do the bands' shapes: part of the growth may be theirs)")
        for step in ("compress", "decompress"):
            (t0, p0), (t1, p1), (fixed, _) = results[w0, h0, step], results[w1, h1, step], results[64, 64, step]
            slope = (p1 - p0) * 2 ** 20 / (w1 * h1 - w0 * h0)
            ratio = ((t1 - fixed) / (w1 * h1)) / ((t0 - fixed) / (w0 * h0))
            print(f"  {step:10s} peak RSS grows {slope:5.1f} bytes per extra pixel; time per megapixel "
                  f"{ratio:.2f}x from {w0 * h0 / 1e6:.0f} to {w1 * h1 / 1e6:.0f} MP, beyond the fixed cost of a "
                  f"step (a 64x64 image: {fixed:.2f} s)")


def train_case(N, M, crop, batch, text_adapter, joint, steps, device, bf16, queue):
    """Training steps with every tower of the real architecture (random weights cost the same)."""
    import torchvision

    import train                     # here, not at the top: the other measured processes do without it
    torch.manual_seed(0)
    clip = clip_text.load_clip("ViT-B-32-quickgelu", "random")
    encoder = clip_text.TextEncoder("ViT-B-32-quickgelu", "random", clip=clip) if text_adapter else None
    model = taco.TACO(taco.TacoConfig(N=N, M=M, text_adapter=text_adapter)).train()
    if encoder:
        model.attach_text_encoder(encoder)
    lpips = metrics.LPIPS(torchvision.models.alexnet(weights=None).state_dict(), metrics.lpips_linear_weights())
    criterion = train.JointLoss(0.004, 3.5, 0.0025, lpips if joint else None, clip.visual if joint else None)
    for module in (model, criterion, encoder):
        if module is not None:
            module.to(device)
    optimizer = torch.optim.Adam(model.parameters(), 1e-4)
    x, captions = torch.rand(batch, 3, crop, crop, device=device), [f"caption {i}" for i in range(batch)]
    on_gpu = device.startswith("cuda")
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True   # as train.py

    def step():
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=on_gpu and bf16):
            text = encoder(captions) if encoder else None
            loss, _ = criterion(model(x, text[:2] if text else None), x, text[2] if text else None)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    step()                                                                       # warm-up
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    memory = torch.cuda.max_memory_allocated() / 2 ** 20 if on_gpu else peak_mib()
    queue.put((batch * steps / (time.perf_counter() - start), memory))


def bench_train(args):
    device, memory = where(args.device)
    print(f"training on {device}, random weights, {args.steps} steps per figure" +
          (f", bf16 {'on' if args.bf16 else 'off'}" if args.device != "cpu" else ""))
    configs = {"demo (N=64 M=96, 8 x 128x128)": (64, 96, 128, 8),
               "default (N=128 M=192, 8 x 256x256)": (128, 192, 256, 8)}
    for name, (N, M, crop, batch) in configs.items():
        for text_adapter, joint in ((False, False), (True, False), (True, True)):
            speed, peak = in_child(train_case, N, M, crop, batch, text_adapter, joint, args.steps, args.device,
                                   args.bf16)
            terms = "rate+MSE" + ("+LPIPS+J" if joint else "")
            print(f"  {name:36s} adapter={'on ' if text_adapter else 'off'} {terms:17s} "
                  f"{speed:6.2f} images/s, {memory} {peak:.0f} MiB")


def sets_case(n, dimensions, metric, queue):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, dimensions, generator=g)                # float32, as eval.py reads the stored features
    b = a + 0.1 * torch.randn(n, dimensions, generator=g)
    before = peak_mib()
    start = time.perf_counter()
    if metric == "fid+kid":              # as report.summarize runs them: FID, then KID on the same two sets
        distance, k = metrics.fid(a, b), metrics.kid(a, b)
        value = f"FID {distance:.6g}, KID {k['kid']:.6g} +- {k['kid_std']:.2g} (subsets of {k['kid_subset_size']})"
    else:
        value = f"{getattr(metrics, metric)(a, b):.6g}"
    queue.put((value, time.perf_counter() - start, before, peak_mib()))


def bench_sets(args):
    print(f"set metrics: CMMD on {args.clip_dim}-d CLIP embeddings, FID and KID (torch-fidelity) on "
          f"{args.inception_dim}-d Inception features, random sets, CPU ({torch.get_num_threads()} threads); each "
          f"in a fresh process, peak RSS")
    for metric, dimensions in (("cmmd", args.clip_dim), ("fid+kid", args.inception_dim)):
        for n in args.sizes:
            value, seconds, before, peak = in_child(sets_case, n, dimensions, metric)
            print(f"  {metric} {n:6d} x {n:6d}: {seconds:6.1f} s, peak RSS {peak:6.0f} MiB (the two feature sets "
                  f"loaded: {before:.0f} MiB), value {value}")


def caption_case(name, pretrained, device, photos, batch, queue):
    """In a fresh process: `photos` of the four photos (cycled) captioned `batch` at a time (caption_many) ->
    seconds per caption, peak RSS, the captions. Random weights never end a caption early: every caption runs the
    full max_tokens."""
    try:
        model = captioner.Captioner(name, pretrained, device)
    except clip_text.WeightsUnavailable as error:
        queue.put(str(error))
        return
    pixels = [photo(PHOTOS[i % len(PHOTOS)]) for i in range(photos)]
    start, captions = time.perf_counter(), []
    for first in range(0, photos, batch):
        captions += model.caption_many(pixels[first:first + batch])
    queue.put(((time.perf_counter() - start) / photos, peak_mib(), captions, model.beams, model.bytes_per_photo()))


def bench_caption(args):
    """--photos photos (the four benchmark photos, cycled) one at a time, then side by side at the batch that
    caption_images takes from its memory budget; peak RSS of each."""
    one = in_child(caption_case, args.captioner, args.captioner_pretrained, args.device, args.photos, 1)
    if isinstance(one, str):
        print(f"caption: not measured here: {one}")
        return
    beams, per_photo = one[3:]
    batch = max(1, min(args.photos, captioner.CAPTION_MEMORY // per_photo))
    many = in_child(caption_case, args.captioner, args.captioner_pretrained, args.device, args.photos, batch)
    print(f"caption: {args.captioner} ({args.captioner_pretrained}), beam search of {beams}, on {args.device} "
          f"({torch.get_num_threads()} threads); batch {batch} from a {captioner.CAPTION_MEMORY >> 20} MiB budget at "
          f"{per_photo / 2 ** 20:.0f} MiB per photo")
    for label, (seconds, peak, *_) in (("1 at a time", one), (f"{batch} side by side", many)):
        print(f"  {label:20s} {seconds:6.2f} s per caption ({seconds / one[0]:.2f}x one at a time), peak RSS "
              f"{peak:6.0f} MiB")
    print(f"  the same captions side by side and one at a time: {many[2] == one[2]}")


# ----------------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser(prog="bench.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)

    def command(name, run, text, size=False, widths=False, model=False, device=False, repeat=None):
        command = sub.add_parser(name, help=text, description=f"{text}. {run.__doc__ or ''}".strip())
        if size:
            command.add_argument("--height", type=int, default=512, help="image height (default 512)")
            command.add_argument("--width", type=int, default=768, help="image width (default 768)")
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
    coder = command("coder", bench_coder, "range coder throughput and its bytes over the model's -sum log2 p",
                    repeat=5)
    coder.add_argument("--symbols", type=int, default=300_000, help="how many symbols to code")
    command("codec", bench_codec, "compress/decompress time and peak memory (random weights), 768x512 by default",
            size=True, widths=True, device=True, repeat=3)
    command("gap", bench_gap, "real y / z streams against the model's own -sum log2 p on 4 photos", model=True)
    command("reference", bench_reference, "our files' bpp against the reference pipeline's table choice and zero "
                                          "padding, on 4 photos and 2 COCO-sized crops (640x480)", model=True)
    release = command("release", bench_release, "load a released file (tables rebuilt) and code its first image",
                      size=True)
    release.add_argument("--checkpoint", required=True, help="the released lambda_*.pth.tar to load")
    training = command("train", bench_train, "training throughput and peak memory, with and without the adapter "
                                             "and the joint loss", device=True)
    training.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    training.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False,
                          help="bf16 autocast on GPU (train.py --bf16); default fp32, TF32 convolutions, as train.py")
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
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
