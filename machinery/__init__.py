"""The machinery beside the core: what makes the paper's codec real software, each module one job.

    bands.py       a network over a large image in bands of rows, with exact halos (the geometry and the runner)
    banded.py      TACO's networks run that way: g_a with the adapter's global attention, h_a, h_s by rows, g_s
    integer.py     exact integer networks for what chooses the coding tables (Balle et al. 2019)
    tables.py      the coding tables computed from correctly rounded arithmetic: the same integers everywhere
    devices.py     where work runs: deterministic GPU settings, devices without float64, torchrun's ranks
    container.py   the .taco file: header, model fingerprint, checks of the decoder's decisions
    checkpoints.py checkpoints: ours, the reference TACO's released files
    elic.py        the paper's exact model on the ELIC backbone
    images.py      image files in and out (8 and 16 bits, gray, alpha)
    clip_text.py   the CLIP text tower from open_clip, with offline handling
    captioner.py   captions for photos without one (CoCa)
    metrics.py     PSNR, MS-SSIM, LPIPS, CLIP preprocessing, BD-rate, CMMD, FID
    baselines.py   the classical codecs on the same images: JPEG, WebP, AVIF, HEVC intra, JPEG XL
    training.py    what a training run needs beyond the loop: towers, data, validation on real files, curves
    results.py     evaluation at scale: rows written as they finish, resumable, sharded
    report.py      evaluation's summary: means, set metrics, baselines, results.json/csv, rd.png
    explain.py     explain.png: where the bits go and what the caption changed
    files.py       files a crash cannot leave half-written; the settings a resumed run must share

The core (taco.py, entropy.py, rangecoder.py, train.py, eval.py) calls these in one line each; nothing here
imports train.py or eval.py (bench.py, at the top level, measures them all).
"""
