"""Weights -> figures: rate-distortion evaluation of checkpoints with real files, the Pillow baselines, BD-rate,
the caption ablation, results.json / results.csv / rd.png.

    python eval.py --checkpoint runs/demo/best.pt --images kodak/ --captions kodak_captions.json
    python eval.py --checkpoint runs/demo/best.pt --explain photo.png --caption "..." -o explain.png
    torchrun --nproc_per_node 4 eval.py --checkpoint lambda_*.pth.tar --images val2014/ \\
        --image-list mscoco_30k_list.json --captions captions_val2014.json --baselines "" --out coco30k

Every finished image is written at once to --out (results.py): --resume continues a run killed at any moment,
and torchrun shares the images among processes (one GPU each, or CPU processes); rank 0 computes the set
metrics over all of them and writes the report (report.py).
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

import data
import taco
from machinery import captioner, checkpoints, clip_text, container, devices, explain, metrics, report, results
from machinery import images as image_files


@torch.no_grad()
def evaluate(model, images, captions, lpips_models, clip, inception, folder, save_dir=None, own=None):
    """Real compress/decompress of every image -> (row of per-image metrics, features for the set metrics), one
    image at a time. `captions`: what the encoder reads; `own`: each image's own caption (default `captions`),
    which the CLIP score is measured against in every caption mode of the ablation: the question is whether the
    decoded image matches its true caption, whatever the encoder was shown."""
    own = own or captions
    device = next(model.parameters()).device
    for name in images:
        try:
            x = image_files.read_image(os.path.join(folder, name)).to(device)
        except OSError as error:                            # named, and left out; the finished rows stay
            yield {"image": name, "unreadable": str(error)}, None
            continue
        H, W = x.shape[-2:]
        metrics.check_one_piece(H, W, name)
        start = time.perf_counter()
        data = model.compress(x, captions[name])
        encode = time.perf_counter() - start
        start = time.perf_counter()
        x_hat = model.decompress(data).to(device)
        decode = time.perf_counter() - start
        padded = taco.pad_to_64(image_files.as_rgb(x))
        likelihoods = model(padded, [captions[name]] if model.config.text_adapter else None)["likelihoods"]
        x, x_hat = image_files.as_rgb(x), image_files.as_rgb(x_hat)
        row = {"image": name, "caption": captions[name], "scored_against": own[name], "bytes": len(data),
               "bpp": 8 * len(data) / (H * W),
               "bpp_estimate": sum(float(metrics.bits(l)) for l in likelihoods.values()) / (H * W),
               "psnr": float(metrics.psnr(x_hat, x)), "ms_ssim": float(metrics.ms_ssim(x_hat, x)),
               "encode_s": encode, "decode_s": decode}
        for convention, lpips in lpips_models.items():
            row[f"lpips_{convention}"] = float(lpips(x_hat, x))
        # FID, KID and CMMD are figures of the whole set: keep what they need of this image (and its CLIP score)
        scores, features = metrics.set_features(x, x_hat, inception, clip, model.config.clip_model, own[name])
        row.update(scores)
        if save_dir:
            image_files.write_image(x_hat, os.path.join(save_dir, os.path.splitext(name)[0] + ".png"))
        yield row, features


def shuffled(captions, seed=0):
    """Every image gets another image's caption: walk a random order, each taking its successor's."""
    names = list(captions)
    order = np.random.default_rng(seed).permutation(len(names))
    return {names[order[i]]: captions[names[order[(i + 1) % len(names)]]] for i in range(len(names))}


def load_towers(args, config):
    """LPIPS in both conventions and a CLIP model for the CLIP score; what cannot load is skipped, said once."""
    lpips = {}
    try:
        for convention in ("standard", "reference"):
            lpips[convention] = metrics.load_lpips(convention, args.alexnet_weights).to(args.device)
    except clip_text.WeightsUnavailable as error:
        print(f"note: LPIPS skipped: {error}")
    clip, pretrained = None, args.clip_pretrained or config.clip_pretrained
    try:
        clip = clip_text.load_clip(config.clip_model, pretrained).eval().to(args.device)
        if pretrained == "random":
            print("note: CLIP has random weights: the CLIP score and CMMD below carry no meaning")
    except clip_text.WeightsUnavailable as error:
        print(f"note: CLIP score and CMMD skipped, and captions cannot be read: {error}")
    inception = None
    if refused := report.whole_image_fid_refusal(args.images_count, args.fid_patches, args.fid_few_images):
        print(f"note: FID and KID skipped: {refused}")
        return lpips, clip, pretrained, inception
    try:
        inception = metrics.load_fid_inception(args.fid_weights).to(args.device)
        inception.patches = args.fid_patches
        inception.protocol = "patches" if args.fid_patches else "inception"     # the stored features' names
    except clip_text.WeightsUnavailable as error:
        print(f"note: FID and KID skipped: {error}")
    return lpips, clip, pretrained, inception


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", nargs="+", required=True, help="one or more checkpoints (rate points)")
    parser.add_argument("--images", help="folder of images (Kodak, CLIC, COCO val, ...)")
    parser.add_argument("--image-list", help="evaluate only the images this file names, in its order: a JSON list "
                        "(the reference's materials/mscoco_30k_list.json) or one name per line")
    parser.add_argument("--explain", metavar="IMAGE", help="instead: one figure for one image (with --caption): "
                        "original, decoded, error, where the bits go, what the caption changed, and where the "
                        "text adapter looks (explain.py)")
    parser.add_argument("--caption", help="--explain: the image's caption ('auto': the captioner's; '' the empty "
                                           "one)")
    parser.add_argument("-o", "--output", default="explain.png",
                        help="--explain: the figure's file; its extension picks the format (.png, .jpg, .pdf, .svg)")
    parser.add_argument("--captions", help="JSON {file name: caption or [captions]} (--caption-choice), a COCO "
                        "caption annotation file such as captions_val2014.json (per image, the caption with the "
                        "lowest annotation id), or 'auto': written by a captioner (CoCa, --captioner) once per "
                        "image, kept in --out/captions-auto.json")
    parser.add_argument("--caption-choice", choices=("first", "last"), default="first", help="which caption of a "
                        "list the encoder reads; last: the one the reference's COCO-30k script reports with its "
                        "materials/mscoco_val41k_img_cap_pair.json (docs/evaluation.md)")
    captioner.add_arguments(parser)
    parser.add_argument("--allow-missing-captions", action="store_true", help="code images without a caption "
                        "with the empty caption instead of stopping")
    parser.add_argument("--ablation", action="store_true", help="also run with empty and with shuffled captions")
    parser.add_argument("--baselines", default="JPEG,WEBP,AVIF", help="Pillow codecs to sweep ('' for none): JPEG, "
                        "WEBP, AVIF, and with their plugins HEIC (HEVC intra as in BPG: pip install pillow-heif) "
                        "and JXL (pip install pillow-jxl-plugin)")
    parser.add_argument("--reference", action="store_true", help="overlay published Kodak numbers (released TACO "
                        "checkpoints, ELIC, and CompressAI's VTM, BPG 4:4:4 and Minnen 2018) on the plot")
    parser.add_argument("--clip-pretrained", help="CLIP weights (tag or file) if not the checkpoint's")
    parser.add_argument("--alexnet-weights", help="torchvision AlexNet weights file for LPIPS")
    parser.add_argument("--fid-weights", help="torch-fidelity's TF-Inception weights file for FID and KID "
                        "(weights-inception-2015-12-05-6726825d.pth) if not in its cache")
    parser.add_argument("--fid-patches", action="store_true", help="FID and KID on 256x256 patches of the original "
                        "and the decoded images at the same positions (HiFiC / MS-ILLM FID/256), for small sets")
    parser.add_argument("--fid-few-images", action="store_true", help="whole-image FID and KID even on fewer "
                        "images than the 2048 feature dimensions (a singular covariance: comparable with nothing)")
    parser.add_argument("--save-reconstructions", action="store_true", help="write decoded PNGs (e.g. for an "
                        "external FID tool) under --out/<checkpoint name>/")
    parser.add_argument("--out", default="results", help="folder for the rows as they finish, results.json, "
                        "results.csv, rd.png")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted run in --out (same settings)")
    parser.add_argument("--force", action="store_true", help="replace the run in --out (--explain: overwrite an "
                        "existing figure)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the networks run (entropy coding is always on the CPU)")
    args = parser.parse_args(argv)
    if args.explain:
        return explain.from_command_line(args)            # one figure for one image (machinery/explain.py)
    if not args.images:
        parser.error("--images is required (or --explain IMAGE)")

    devices.check_device(args.device)
    images = data.list_images(args.images, args.image_list)
    args.images_count = len(images)
    rank, world, device = devices.join_ranks(args.device)           # torchrun: every world-th image
    args.device = str(device)
    settings = run_settings(args, images)
    results.check(args.out, settings, args.resume, args.force)          # before anything is captioned or coded
    given = auto_captions(args, images, rank, world) if args.captions == "auto" else None
    store = results.ResultStore(args.out, settings, rank, args.resume, args.force)
    if args.resume and rank == 0:
        store.say_what_changed(images)
    share = images[rank::world]                                            # this process's images
    from tqdm import tqdm
    total = len(args.checkpoint) * (3 if args.ablation else 1) * len(share)
    mine = set(share)
    done = len([k for k in store.done if k[2] in mine])
    with tqdm(total=total, initial=done, desc=f"rows of rank {rank}" if world > 1 else "rows") as bar:
        for path in args.checkpoint:
            evaluate_checkpoint(path, args, images, share, store, bar, given)
    devices.barrier()
    if rank == 0:
        report.write_report(args, images, store)


def evaluate_checkpoint(path, args, images, share, store, bar, given=None):
    """One checkpoint: every image of this process's `share` not yet in the store coded for real, with the given
    captions (and, with --ablation, empty and shuffled ones: each image takes another's caption from all
    `images`), each row stored as it finishes; then a summary line. `given`: the captions, when written by the
    captioner."""
    try:
        model, _ = checkpoints.load_checkpoint(path, args.device)
    except checkpoints.CheckpointError as error:
        raise SystemExit(f"error: {error}")
    lpips, clip, pretrained, inception = load_towers(args, model.config)
    text_model = model.config.text_adapter
    if text_model:
        if clip is None:
            raise SystemExit(f"error: {path} reads captions but its CLIP text tower cannot be loaded")
        model.attach_text_encoder(clip_text.TextEncoder(model.config.clip_model, pretrained,
                                                        model.config.text_tokens, clip=clip))
    captions = given or data.captions_for(images, args.captions, args.allow_missing_captions or not text_model,
                                                args.caption_choice)
    save_dir = os.path.join(args.out, os.path.splitext(os.path.basename(path))[0]) \
        if args.save_reconstructions else None
    if save_dir:
        os.makedirs(save_dir, exist_ok=True)
    runs = {"given": captions}
    if args.ablation and text_model:
        runs.update(empty={n: "" for n in images}, shuffled=shuffled(captions))
    elif args.ablation:
        bar.total -= 2 * len(share)                                         # no caption to ablate
    for run, caps in runs.items():
        todo = [n for n in share if (path, run, n) not in store.done]
        bar.update(len([n for n in todo if n in store.unreadable]))             # found unreadable before
        for row, features in evaluate(model, [n for n in todo if n not in store.unreadable], caps, lpips, clip,
                                      inception, args.images, save_dir if run == "given" else None, own=captions):
            if features is None:
                store.add_unreadable(row["image"], row["unreadable"])
                bar.write(f"skipped (unreadable): {row['unreadable']}")
            else:
                store.add(dict(row, checkpoint=path, captions=run), features)
            bar.update(1)
    share = set(share)
    mine = [r for r in store.rows() if r["checkpoint"] == path and r["captions"] == "given" and r["image"] in share]
    if not mine:
        return bar.write(f"{path}: no image of this process could be read")
    bpp, estimate = (np.mean([r[k] for r in mine]) for k in ("bpp", "bpp_estimate"))
    bar.write(f"{path}: {len(mine)} images{' (this process)' if len(share) < len(images) else ''}: {bpp:.4f} bpp "
              f"(the model's estimate {estimate:.4f}: {100 * (bpp / estimate - 1):+.2f}%), "
              f"{np.mean([r['psnr'] for r in mine]):.2f} dB")


def auto_captions(args, images, rank, world):
    """--captions auto: each image captioned once by the captioner, every process its share, logged in --out and
    reused by later runs with the same captioner and weights (captioner.caption_images); the table is also
    written as --out/captions-auto.json ({image: caption}, which --captions reads)."""
    table = captioner.caption_images(args.images, images, image_files.read_pixels, args.out, args.captioner,
                                     args.captioner_pretrained, args.device, rank, world)
    if rank == 0:
        with open(os.path.join(args.out, "captions-auto.json"), "w", encoding="utf-8") as f:
            json.dump(table, f, indent=1, ensure_ascii=False)
    return table


def run_settings(args, images):
    """What the rows depend on: --resume refuses to continue a run with any of these changed."""
    return {"--checkpoint": args.checkpoint, "--images": os.path.abspath(args.images),
            "--captions": args.captions if args.captions in (None, "auto") else os.path.abspath(args.captions),
            "--captioner": args.captions == "auto" and [args.captioner, args.captioner_pretrained],
            "--caption-choice": args.caption_choice,
            "--allow-missing-captions": args.allow_missing_captions, "--ablation": args.ablation,
            "--clip-pretrained": args.clip_pretrained, "--alexnet-weights": args.alexnet_weights,
            "--fid-weights": args.fid_weights, "FID features": "torch-fidelity inception-v3-compat 2048",
            "--fid-patches": args.fid_patches, "--fid-few-images": args.fid_few_images}


if __name__ == "__main__":
    try:
        main()
    except (checkpoints.CheckpointError, clip_text.WeightsUnavailable, container.BitstreamError, ValueError,
            OSError) as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:
        sys.exit("interrupted: every finished row is kept in --out; the same command with --resume continues")
