"""The slower figures (python -m machinery.bench train | bands | sets | caption): training throughput, large images
through the user's path, set metrics over COCO-30k-sized sets, captions. Printed, never asserted."""
import time

import numpy as np
import torch

import data
import taco
from machinery import captioner, checkpoints, clip_text, images, metrics
from machinery.measure import in_child, peak_mib


PHOTOS = ("coffee", "chelsea", "astronaut", "rocket")      # the benchmarks' photos (scikit-image's)


def photo(name):
    """One of scikit-image's photos as (1, 3, H, W) uint8."""
    return torch.from_numpy(data.skimage_photo(name)[:, :, :3].copy()).permute(2, 0, 1)[None]


def where(device):
    """-> where a benchmark runs, and what its memory figure is."""
    if device == "cpu":
        return f"CPU ({torch.get_num_threads()} threads)", "peak RSS"
    return device, "peak GPU memory"


def random_model(backbone="hyperprior", N=128, M=192, text_adapter=True):
    """A codec of seeded random weights, ready to code (text_adapter: through a random CLIP text tower)."""
    torch.manual_seed(0)
    config = taco.TacoConfig(N=N, M=M, text_adapter=text_adapter, clip_pretrained="random", backbone=backbone)
    return checkpoints.build_model(config).eval().update()


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
        data = model.compress(images.read_pixels(png, 1 << 28), features if config.text_adapter else "", memory=memory)
        with open(taco_file, "wb") as f:
            f.write(data)
    else:
        with open(taco_file, "rb") as f:
            data = f.read()
        images.write_image(model.decompress(data, dtype=None, memory=memory, max_pixels=1 << 28), png + ".out.png")
    queue.put((time.perf_counter() - start, before, peak_mib()))


def bench_bands(args):
    import os
    import tempfile

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
                                                 args.memory and args.memory * 2 ** 20,
                                                 step, png, taco_file)
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
    """Seconds per caption: --photos photos one at a time against side by side at caption_images' batch; peak RSS
    of each."""
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


def train_case(N, M, crop, batch, text_adapter, joint, steps, device, bf16, queue):
    """Training steps with every tower of the real architecture (random weights cost the same)."""
    import torchvision

    import train
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
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True         # as train.py

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
