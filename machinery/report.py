"""Rows -> figures: what eval.py reports once every image is coded -- the means and set metrics per checkpoint
and caption mode, the Pillow baselines, BD-rate, and results.json, results.csv and rd.png in --out."""
import dataclasses
import json
import os
import re

import numpy as np
import torch

from machinery import baselines, checkpoints, metrics
from machinery.images import as_rgb, read_image

# CompressAI's published Kodak results (InterDigitalInc/CompressAI, results/image/kodak/, commit 128f003): bpp and
# RGB PSNR, the means over the 24 images, eight points each, as the files hold them.
VTM = list(zip((0.04824490017361111, 0.11249542236328125, 0.24581654866536465, 0.4905454847547744,   # vtm.json
                0.8748101128472224, 1.43084971110026, 2.3246070014105906, 3.6326090494791665),
               (26.14484539430146, 28.493021754424603, 31.199873720014093, 34.26153257289846, 37.419793158067485,
                40.42444421698711, 43.505766973634486, 46.59176008512777)))
BPG = list(zip((0.06776767306857638, 0.1610234578450521, 0.35155402289496523, 0.6846966213650174,   # bpg_444_x265_ycbcr
                1.1996654934353295, 1.9297120836046002, 3.0578757392035594, 4.703142801920573),
               (26.19512806390954, 28.68154930675666, 31.5946565907943, 34.857473813062924, 38.259886899666974,
                41.47887283561703, 44.70311031066196, 47.63251604714922)))
MINNEN = list(zip((0.12392171223958336, 0.19798109266493058, 0.3072441948784722, 0.46061197916666674,  # mbt2018-mean
                   0.6616651746961806, 0.9144049750434027, 1.2342088487413194, 1.619089762369792),  # _mse_cpu.json
                  (27.699472968534337, 29.358805876639696, 31.128916719551516, 32.95067527714903,
                   34.96831704422008, 36.91109403854906, 38.83750942961362, 40.63331397919807)))
PUBLISHED_ANCHORS = {"VTM (CompressAI, Kodak)": VTM, "BPG 4:4:4 (CompressAI, Kodak)": BPG}
REFERENCE = {   # published Kodak figures: the released TACO files measured by a third party, CompressAI's
    # results files above, and the ELIC paper (He et al., CVPR 2022, Kodak)
    "TACO (released, Kodak)": [(0.183, 28.79), (0.226, 30.09), (0.322, 31.88), (0.450, 33.66), (0.566, 34.89)],
    **PUBLISHED_ANCHORS,
    "Minnen 2018 mean-scale (CompressAI, Kodak)": MINNEN,
    "ELIC (paper, Kodak)": [(0.124, 29.11), (0.197, 30.70), (0.334, 32.78), (0.491, 34.58), (0.704, 36.49)],
}


# What a report holds per image (cmmd, fid, kid: per set only), in the order printed and written to results.csv.
METRIC_KEYS = ("bpp", "bpp_estimate", "psnr", "ms_ssim", "lpips_standard", "lpips_reference", "clip_score", "cmmd",
               "fid", "kid", "kid_std", "encode_s", "decode_s")
BASELINE_KEYS = ("bpp", "psnr", "ms_ssim", "encode_s", "decode_s")               # per quality of a Pillow codec
PROTOCOLS = {  # the stored features' name -> what produced the FID / KID, said beside the number
    "inception": "whole images",
    "patches": f"{metrics.PATCH}x{metrics.PATCH} patches (HiFiC / MS-ILLM FID/{metrics.PATCH}: the grid and the grid "
               f"shifted by {metrics.PATCH // 2})"}


def whole_image_fid_refusal(images, patches, asked):
    """Why whole-image FID is refused, or None: with fewer images than the 2048 feature dimensions the covariance
    is singular and the figure is comparable with nothing published; --fid-patches or --fid-few-images."""
    if patches or asked or images >= metrics.FID_FEATURES:
        return None
    return (f"{images} images, fewer than the {metrics.FID_FEATURES} dimensions of the Inception features that "
            f"whole-image FID needs; pass --fid-patches (FID/256 of HiFiC and MS-ILLM) or --fid-few-images")


def write_report(args, images, store):
    """Rank 0, once every row is in: per checkpoint and caption mode, the means and set metrics over all images
    (in the images' order, whichever process coded them), the Pillow baselines, BD-rate, results.*, rd.png."""
    unreadable = {name: why for name, why in store.unreadable.items() if name in images}
    images = [name for name in images if name not in unreadable]
    order = {name: i for i, name in enumerate(images)}
    groups = {}
    for row in store.rows():
        if row["image"] in order:                          # a resumed run may no longer hold an image
            groups.setdefault((row["checkpoint"], row["captions"]), []).append(row)
    report, curves_by_label = {"images": args.images, "checkpoints": {}, "unreadable": unreadable}, {}
    if unreadable:                                      # each was named when it was found; results.json says why
        print(f"skipped {len(unreadable)} unreadable image(s): {', '.join(unreadable)}")
    for path in args.checkpoint:
        model, _ = checkpoints.load_checkpoint(path)
        entry = {"config": dataclasses.asdict(model.config), "complexity": metrics.complexity(model)}
        for run in ("given", "empty", "shuffled"):
            rows = sorted(groups.get((path, run), []), key=lambda r: order[r["image"]])
            if rows:
                entry[run] = {"mean": summarize(rows, store), "per_image": [
                    {k: v for k, v in r.items() if k not in ("checkpoint", "captions", "features")} for r in rows]}
        if "empty" in entry or "shuffled" in entry:
            entry["verdict"] = verdict(entry)
        report["checkpoints"][path] = entry
        label = curve_label(entry)
        mean = entry["given"]["mean"]
        curves_by_label.setdefault(label, []).append((mean["bpp"], mean["psnr"]))
        print_entry(path, entry)

    pillows = [c.strip().upper() for c in args.baselines.split(",") if c.strip()]
    report["baselines"] = baseline_curves(args.images, images, pillows, store)
    report["bd"] = bjontegaard(curves_by_label, report["baselines"])
    for line in comparison_lines(curves_by_label, report["bd"]):
        print(line)
    not_kodak = kodak_mismatch(args.images, images)
    if not_kodak:
        print(f"BD-rate against VTM and BPG as published: not computed, these are not Kodak's 24 photos ({not_kodak})")
    else:
        anchors = {name: [{"bpp": b, "psnr": p} for b, p in curve] for name, curve in PUBLISHED_ANCHORS.items()}
        report["bd_published"] = bjontegaard(curves_by_label, anchors)
        for line in comparison_lines(curves_by_label, report["bd_published"]):
            print(line)
    for pillow, curve in report["baselines"].items():
        encode, decode = (np.mean([c[k] for c in curve]) for k in ("encode_s", "decode_s"))
        print(f"{pillow} (Pillow), mean over images and qualities: encode {encode:.4f} s, decode {decode:.4f} s "
              f"per image (ours: encode_s / decode_s above)")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
    write_csv(report, os.path.join(args.out, "results.csv"))
    for label in curves_by_label:
        write_compressai_json(report, label, os.path.join(args.out, f"compressai-{slug(label)}.json"))
    plot(curves_by_label, report["baselines"], os.path.join(args.out, "rd.png"), args.reference)
    print(f"wrote {args.out}/results.json, results.csv, rd.png")


def summarize(rows, store):
    """Means of the per-image metrics, and the set metrics (CMMD, FID) from the rows' stored features."""
    keys = [k for k in rows[0] if isinstance(rows[0][k], float)]
    mean = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    stored = rows[0]["features"]["sizes"]
    if len(rows) < 2 or not stored:
        return mean
    features = [store.features(r) for r in rows]                                # read once for all metrics
    if "clip_x" in stored:
        mean["cmmd"] = metrics.cmmd(*(torch.from_numpy(np.stack([f[f"clip_{side}"] for f in features]))
                                      for side in ("x", "x_hat")))
    for protocol in PROTOCOLS:
        if f"{protocol}_x" in stored:            # each image's features, one or (patches) several rows of 2048
            x, x_hat = (np.concatenate([f[f"{protocol}_{side}"].reshape(-1, metrics.FID_FEATURES) for f in features])
                        for side in ("x", "x_hat"))
            if len(x) >= 2:
                mean.update(fid=metrics.fid(x, x_hat), **metrics.kid(x, x_hat),
                            fid_protocol=f"{PROTOCOLS[protocol]}, {len(x)} from {len(rows)} images")
    return mean


def print_entry(path, entry):
    c = entry["complexity"]
    print(f"{path}: {c['params'] / 1e6:.2f} M parameters ({c['adapter_params'] / 1e6:.2f} M text adapter), "
          f"{c['macs_per_pixel'] / 1e3:.1f} kMAC/pixel")
    print("  " + f"{'captions':10s}" + "".join(f"{k:>16s}" for k in METRIC_KEYS))
    for run in ("given", "empty", "shuffled"):
        if run in entry:
            mean = entry[run]["mean"]
            print("  " + f"{run:10s}" + "".join(f"{mean[k]:16.4f}" if k in mean else f"{'-':>16s}"
                                              for k in METRIC_KEYS))
    protocol = entry.get("given", {}).get("mean", {}).get("fid_protocol")
    if protocol:
        size = entry["given"]["mean"]["kid_subset_size"]
        print(f"  FID and KID (torch-fidelity, TF-Inception pool3; KID subset size {size}, {metrics.KID_SUBSETS} "
              f"subsets, std over them) on {protocol}")
    if "verdict" in entry:
        print("  verdict: " + entry["verdict"]["sentence"])


# The caption ablation's verdict: per image, the given caption's figure minus the other mode's (bpp as a
# percentage of the other mode's bpp), then a mean with its 95% t interval over the images (the differences are
# paired: the same image, coded twice). Student's t rather than a bootstrap: a handful of images (Kodak's 24) is
# where a bootstrap's interval is too narrow, and t is the textbook interval a reader can recompute.
VERDICT_METRICS = (("bpp", "bpp", "%", 2), ("psnr", "PSNR", " dB", 3), ("lpips_standard", "LPIPS", "", 4),
                   ("clip_score", "CLIP score", "", 3))


def paired_interval(differences, confidence=0.95):
    """Mean of paired differences and its two-sided t interval (n - 1 degrees of freedom); None bounds for n < 2."""
    from scipy import stats
    d = np.asarray(differences, dtype=np.float64)
    mean = float(d.mean())
    if len(d) < 2:
        return {"mean": mean, "low": None, "high": None, "excludes_zero": None, "images": len(d)}
    half = float(stats.t.ppf((1 + confidence) / 2, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
    low, high = mean - half, mean + half
    return {"mean": mean, "low": low, "high": high, "excludes_zero": bool(low > 0 or high < 0), "images": len(d)}


def verdict(entry):
    """Given caption minus empty and minus shuffled, per metric (VERDICT_METRICS), paired over the images both
    modes coded; and the sentence the summary prints."""
    given = {r["image"]: r for r in entry["given"]["per_image"]}
    result, clauses = {}, []
    for other in ("empty", "shuffled"):
        rows = [(given[r["image"]], r) for r in entry.get(other, {}).get("per_image", []) if r["image"] in given]
        if not rows:
            continue
        result[f"given_minus_{other}"] = comparison = {}
        parts = []
        for key, label, unit, digits in VERDICT_METRICS:
            if key not in rows[0][0]:
                continue
            d = [100 * (g[key] / o[key] - 1) if key == "bpp" else g[key] - o[key] for g, o in rows]
            comparison[key if key != "bpp" else "bpp_percent"] = c = paired_interval(d)
            text = f"{label} {c['mean']:+.{digits}f}{unit}"
            if c["low"] is not None:
                text += (f" [{c['low']:+.{digits}f}, {c['high']:+.{digits}f}]"
                         f" ({'excludes' if c['excludes_zero'] else 'includes'} 0)")
            parts.append(text)
        caption = "an empty caption" if other == "empty" else "another image's caption (shuffled)"
        clauses.append(f"against {caption}: " + ", ".join(parts))
    images = len(entry["given"]["per_image"])
    result["sentence"] = (f"encoding with the image's own caption changes, over {images} images (mean of the paired "
                          f"differences with its 95% t interval; CLIP score always against the image's own caption), "
                          + "; ".join(clauses) + ".")
    return result


def baseline_curves(folder, images, pillows, store):
    """For each Pillow codec, one row per quality setting: bpp, PSNR, MS-SSIM, and encode / decode wall time in
    this process (as ours is timed), each the mean over the images. Each image's sweep is stored as it finishes
    (a resumed run does not sweep it again)."""
    from tqdm import tqdm
    missing = {pillow: baselines.baseline_missing(pillow) for pillow in pillows}
    available = [pillow for pillow in pillows if missing[pillow] is None]
    for pillow in pillows:
        if missing[pillow]:
            print(f"note: {missing[pillow]}; skipped")
    done = store.baselines()
    todo = [(p, name) for p in available for name in images if (p, name) not in done]
    if todo:
        print(f"baselines: {', '.join(available)} swept over their qualities on {len(images)} images "
              f"(--baselines '' skips them)")
    for pillow, name in tqdm(todo, desc="baselines", unit="image", disable=not todo):
        x = as_rgb(read_image(os.path.join(folder, name)))
        sweep = [[q, bpp, float(metrics.psnr(decoded, x)), float(metrics.ms_ssim(decoded, x)), encode, decode]
                 for q, bpp, decoded, encode, decode in baselines.pillow_sweep(x, pillow)]
        done[pillow, name] = {"codec": pillow, "image": name, "sweep": sweep}
        store.add_baseline(done[pillow, name])
    curves = {}
    for pillow in available:
        per_quality = {}
        for name in images:
            for q, *values in done[pillow, name]["sweep"]:
                per_quality.setdefault(q, []).append(values)
        curves[pillow] = [{"quality": q, **dict(zip(BASELINE_KEYS, map(float, np.mean(v, axis=0))))}
                          for q, v in per_quality.items()]                     # in the sweep's order
    return curves


def bjontegaard(curves_by_label, baselines):
    """BD-rate and BD-PSNR of our curves against each Pillow codec (4+ rate points), else the baseline's PSNR
    at our bpp."""
    report = {}
    for label, points in curves_by_label.items():
        for pillow, curve in baselines.items():
            anchor = [(c["bpp"], c["psnr"]) for c in curve]
            if len(points) >= 4:
                report[f"{label} vs {pillow}"] = {"bd_rate_percent": metrics.bd_rate(anchor, sorted(points)),
                                                  "bd_psnr_db": metrics.bd_psnr(anchor, sorted(points))}
            else:
                report[f"{label} vs {pillow}"] = {
                    "psnr_of_baseline_at_our_bpp": [metrics.psnr_at_bpp(anchor, b) for b, _ in sorted(points)]}
    return report


def comparison_lines(curves_by_label, bd):
    """bjontegaard()'s figures as a person reads them: BD-rate and BD-PSNR with their sign spelled out, or each of
    our rate points against the baseline's PSNR at that bpp."""
    lines = []
    for name, value in bd.items():
        label, pillow = name.split(" vs ")
        if "bd_rate_percent" in value:
            rate, gain = value["bd_rate_percent"], value["bd_psnr_db"]
            lines.append(f"{name}: BD-rate {rate:+.1f}% ({abs(rate):.1f}% {'fewer' if rate < 0 else 'more'} bits for "
                         f"the same PSNR), BD-PSNR {gain:+.2f} dB ({'higher' if gain > 0 else 'lower'} PSNR at the "
                         f"same rate)")
            continue
        for (bpp, ours), theirs in zip(sorted(curves_by_label[label]), value["psnr_of_baseline_at_our_bpp"]):
            if theirs is None:
                lines.append(f"{pillow} at {bpp:.3f} bpp: outside its quality range ({label} {ours:.2f} dB)")
            else:
                lines.append(f"{pillow} at {bpp:.3f} bpp: {theirs:.2f} dB ({label} {ours:.2f} dB: "
                             f"{ours - theirs:+.2f} dB)")
    return lines


def plot(results, curves, png, reference):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, ax = plt.subplots(figsize=(7, 5))
    for label, points in results.items():
        bpp, quality = zip(*sorted(points))
        ax.plot(bpp, quality, "o-", linewidth=2, label=label)
    for pillow, curve in curves.items():
        ax.plot([c["bpp"] for c in curve], [c["psnr"] for c in curve], "--", label=f"{pillow} (Pillow)")
    for label, points in (REFERENCE.items() if reference else []):
        ax.plot(*zip(*points), ":x", label=label)
    ax.set_xlabel("bits per pixel (real file size)"), ax.set_ylabel("PSNR (dB, RGB)")
    ax.grid(alpha=0.3), ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(png, dpi=120)
    plt.close(figure)


KODAK = {f"kodim{i:02d}.png" for i in range(1, 25)}


def kodak_mismatch(folder, images):
    """Why these images are not the 24 Kodak photos (by name, and each 768x512 either way), or None."""
    from PIL import Image
    if set(images) != KODAK:
        return f"{len(images)} images, not kodim01.png ... kodim24.png"
    for name in sorted(images):
        with Image.open(os.path.join(folder, name)) as image:
            if sorted(image.size) != [512, 768]:
                return f"{name} is {image.size[0]}x{image.size[1]}, not 768x512"
    return None


def curve_label(entry):
    """Our checkpoints form one curve per kind: with the text adapter, or without."""
    return "TACO (ours)" if entry["config"]["text_adapter"] else "hyperprior (ours)"


def slug(label):
    return re.sub("[^a-z0-9]+", "-", label.lower()).strip("-")


def write_compressai_json(report, label, path):
    """One curve in CompressAI's results layout (name, description, results: bpp, psnr-rgb, ms-ssim-rgb, ...), so
    CompressAI's own plotting script draws it beside its published files."""
    entries = sorted([(entry["given"]["mean"], path) for path, entry in report["checkpoints"].items()
                      if curve_label(entry) == label], key=lambda e: e[0]["bpp"])
    keys = {"bpp": "bpp", "psnr-rgb": "psnr", "ms-ssim-rgb": "ms_ssim", "lpips": "lpips_standard",
            "encoding_time": "encode_s", "decoding_time": "decode_s"}
    results = {name: [mean[key] for mean, _ in entries] for name, key in keys.items()
               if all(key in mean for mean, _ in entries)}
    layout = {"name": label, "description": f"{label} on {report['images']}: real files, means over the images; "
                                            f"checkpoints " + ", ".join(p for _, p in entries), "results": results}
    with open(path, "w") as f:
        json.dump(layout, f, indent=2)


def write_csv(report, path):
    """One row per image and caption run of every checkpoint, then one per quality of every Pillow codec
    (means over the images, in the 'image' column 'mean of N')."""
    import csv
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["checkpoint", "captions", "image", *METRIC_KEYS])
        for ckpt, entry in report["checkpoints"].items():
            for run in ("given", "empty", "shuffled"):
                for row in entry.get(run, {}).get("per_image", []):
                    writer.writerow([ckpt, run, row["image"]] + [row.get(k, "") for k in METRIC_KEYS])
        images = len(next(iter(report["checkpoints"].values()))["given"]["per_image"]) if report["checkpoints"] else 0
        for pillow, curve in report["baselines"].items():
            for c in curve:
                writer.writerow([f"{pillow} (Pillow)", f"quality {c['quality']}", f"mean of {images}"]
                                + [c.get(k, "") for k in METRIC_KEYS])
