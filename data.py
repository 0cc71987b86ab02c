"""Data: training and held-out images with their captions, as lists of (image source, [captions]).

    demo       scikit-image's colour photographs, with captions written here (nothing to download)
    coco       MS-COCO captions as downloaded: <root>/train2014 + annotations/captions_train2014.json
               (--coco-split for another)
    folder     a folder of images + a JSON {file: caption(s)} or JSONL caption file

A training sample is a random crop and a caption of one item; the randomness is a function of a seed alone,
so a resumed run sees exactly the samples the interrupted one would have seen.
"""
import functools
import json
import math
import os
import random
import sys

import torch
from torch.utils.data import Dataset

from machinery import images

DEMO_PHOTOS = {   # scikit-image's color photographs, each with a caption written here
    "astronaut": "an astronaut in a white spacesuit posing in front of an American flag",
    "rocket": "a rocket standing on a launch pad under a blue sky",
    "hubble_deep_field": "a deep field of distant galaxies scattered across black space",
    "stereo_motorcycle": "a red and silver motorcycle parked in a room in front of a wall",
    "retina": "a photograph of the back of a human eye with the retina and its blood vessels",
    "immunohistochemistry": "a microscope image of tissue stained brown and blue",
}
DEMO_HELD_OUT = {"coffee": "a cup of coffee on a saucer with a spoon on a table",
                 "chelsea": "an orange tabby cat looking to the side"}


def demo_items(names):
    return [(f"skimage:{name}", [caption]) for name, caption in names.items()]


@functools.lru_cache(maxsize=None)
def skimage_photo(name):
    import skimage.data
    image = getattr(skimage.data, name)()
    return image[0] if isinstance(image, tuple) else image                      # stereo pair: the left view


def coco_items(root, crop, split="train2014"):
    """MS-COCO captions as downloaded: <root>/<split> + annotations/captions_<split>.json. The split is asked for,
    never guessed: train2017 holds most of val2014, the images the COCO-30k evaluation draws from."""
    annotations = os.path.join(root, "annotations", f"captions_{split}.json")
    if not os.path.isfile(annotations):
        raise SystemExit(f"error: no annotations/captions_{split}.json under {root} (--coco-split names the split)")
    with open(annotations) as f:
        meta = json.load(f)
    captions = coco_captions(meta)                                              # {file name: captions}
    images = [im["file_name"] for im in meta["images"] if min(im["width"], im["height"]) >= crop]
    print(f"COCO {split}: {len(images)} of {len(meta['images'])} images have both sides >= {crop}")
    return [(os.path.join(root, split, name), captions[name]) for name in images if name in captions]


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def image_files(folder):
    """The image files of a folder, sorted."""
    if not os.path.isdir(folder):
        raise SystemExit(f"error: image folder not found: {folder}")
    return sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))


def folder_items(root, captions, crop):
    """Images of `root` with their captions (a caption file, or a table {file: [captions]}), each decoded once here,
    when the folder is listed: images without a caption, unreadable or smaller than the crop are skipped and
    counted, and so are captions that name no file."""
    from PIL import Image
    from tqdm import tqdm
    if not os.path.isdir(root):
        raise SystemExit(f"error: image folder not found: {root}")
    table = captions if isinstance(captions, dict) else read_captions(captions)
    items, unreadable = [], []
    skipped = {"without a caption": sum(name not in table for name in image_files(root)), "unreadable": 0,
               f"smaller than {crop}": 0, "captions naming no file": 0}
    for name, caps in tqdm(sorted(table.items()), desc=f"checking {root}", unit="image", delay=2, leave=False):
        path = os.path.join(root, name)
        if not os.path.isfile(path):
            skipped["captions naming no file"] += 1
            continue
        try:
            with Image.open(path) as image:
                image.load()                         # a truncated file fails here, once, not at every draw
                size = image.size
        except (OSError, SyntaxError) as error:
            skipped["unreadable"] += 1
            unreadable.append(f"{name} ({error})")
            continue
        if min(size) < crop:
            skipped[f"smaller than {crop}"] += 1
            continue
        items.append((path, caps))
    print(f"{root}: {len(items)} images" + "".join(f", {n} {why} (skipped)" for why, n in skipped.items() if n)
          + (f"; unreadable: {', '.join(unreadable[:3])}{', ...' if len(unreadable) > 3 else ''}" if unreadable
             else ""))
    if not items:
        raise SystemExit(f"error: no usable images in {root}")
    return items


def load_pixels(source):
    """An image path or "skimage:<name>" -> (1 or 3, H, W) as stored (uint8, uint16 or float)."""
    if source.startswith("skimage:"):
        photo = torch.from_numpy(skimage_photo(source[len("skimage:"):]))                  # (H, W) or (H, W, C)
        return photo[None] if photo.ndim == 2 else photo[:, :, :3].permute(2, 0, 1)        # (1 or 3, H, W)
    return images.read_pixels(source)[0]


def load_rgb(source):
    """An image path or "skimage:<name>" -> (3, H, W) float tensor in [0, 1]."""
    return to_rgb(load_pixels(source))


def to_rgb(pixels):
    """(1 or 3, H, W) as stored -> (3, H, W) floats in [0, 1]."""
    image = images.to_unit(pixels)
    return image.expand(3, *image.shape[-2:])


class CropDataset(Dataset):
    """dataset[(index, seed)] -> a random crop (mirrored left to right half of the time, with `flip`) and
    caption; the randomness is a function of the seed alone, so a resumed run sees exactly the samples the
    interrupted one would have seen."""

    def __init__(self, items, crop, flip=False):
        self.items, self.crop, self.flip = items, crop, flip

    def __getitem__(self, key):
        index, seed = key
        rng = random.Random(seed)
        for attempt in range(len(self.items)):              # an image that fails to decode: take the next
            source, captions = self.items[(index + attempt) % len(self.items)]
            try:
                pixels = load_pixels(source)
                break
            except OSError as error:
                print(f"warning: skipping unreadable {source}: {error}", file=sys.stderr)
        _, H, W = pixels.shape
        top, left = rng.randrange(H - self.crop + 1), rng.randrange(W - self.crop + 1)
        crop = pixels[:, top:top + self.crop, left:left + self.crop]           # cut before it becomes floats
        caption = rng.choice(captions)
        if self.flip and rng.random() < 0.5:                  # a mirrored photo: as natural, and new to the model
            crop = crop.flip(-1)
        return to_rgb(crop), caption


def steps_per_epoch(n_items, per_step):
    return max(n_items // per_step, 1)


def batches(n_items, batch_size, rank, world, seed, start_step):
    """Endless batches of (index, sample seed), each rank its own share; epoch e uses permutation(seed, e)."""
    per_step = batch_size * world
    step = start_step
    while True:
        epoch, offset = divmod(step, steps_per_epoch(n_items, per_step))
        order = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        order = order.repeat(math.ceil(per_step / n_items))             # tiny sets: reuse images in a step
        chunk = order[offset * per_step:(offset + 1) * per_step][rank::world]
        yield [(int(i), hash((seed, step, rank, j)) & 0x7FFFFFFF) for j, i in enumerate(chunk)]
        step += 1


def collate(samples):
    images, captions = zip(*samples)
    return torch.stack(images), list(captions)


def caption_pairs(items):
    """One training item per (image, caption) pair, as the reference's dataset: an epoch on COCO is a pass over
    its ~5 captions per image, so --epochs 50 and the lr drops at epochs 45 and 48 mean what they meant there."""
    return [(source, [caption]) for source, captions in items for caption in captions]


def read_captions(path):
    """JSON {file: caption or [captions]}, JSONL lines {"file": ..., "caption" or "captions": ...}, or a COCO
    caption annotation file (captions_val2014.json: {"images": [...], "annotations": [...]})."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: caption file not found: {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if path.endswith(".jsonl"):
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            table = {r["file"]: r.get("captions", r.get("caption")) for r in rows}
        else:
            table = json.loads(text)
            if isinstance(table, dict) and "annotations" in table and "images" in table:
                table = coco_captions(table)
    except (ValueError, KeyError, TypeError) as error:
        raise SystemExit(f"error: {path} is not a caption file ({error})")
    return {k: [v] if isinstance(v, str) else list(v) for k, v in table.items()}


def coco_captions(meta):
    """COCO's annotation layout -> {file name: its captions, by increasing annotation id}: where one caption is
    wanted, the first -- the one with the lowest id -- a choice that does not depend on the file's order."""
    names = {image["id"]: image["file_name"] for image in meta["images"]}
    table = {}
    for annotation in sorted(meta["annotations"], key=lambda a: a["id"]):
        table.setdefault(names[annotation["image_id"]], []).append(annotation["caption"].strip())
    return table


# Evaluation's image lists and captions (eval.py)
def list_images(folder, image_list=None):
    """Every image in `folder`, sorted; or those `image_list` names, in its order: a JSON list (such as the
    reference's materials/mscoco_30k_list.json) or one name per line."""
    names = image_files(folder)
    if image_list is not None:
        names = read_image_list(folder, image_list)
    if not names:
        raise SystemExit(f"error: no images in {folder}")
    return names


def read_image_list(folder, path):
    if not os.path.isfile(path):
        raise SystemExit(f"error: image list not found: {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        names = json.loads(text)
    except ValueError:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise SystemExit(f"error: {path} is not a list of image names (a JSON list, or one per line)")
    names = list(dict.fromkeys(names))                                      # each image once, in list order
    missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise SystemExit(f"error: {len(missing)} image(s) of {path} are not in {folder}, e.g. {missing[0]}")
    return names


def captions_for(names, path, allow_missing, choice="first"):
    """{image name: the caption the encoder reads}: of a list, the first, or the `choice` "last"."""
    if not path:
        if allow_missing:
            return {n: "" for n in names}
        raise SystemExit("error: --captions is required (or --allow-missing-captions to code with empty ones)")
    table = {k: v[0 if choice == "first" else -1] if v else "" for k, v in read_captions(path).items()}
    missing = [n for n in names if n not in table and os.path.splitext(n)[0] not in table]
    if missing and not allow_missing:
        raise SystemExit(f"error: no caption for {len(missing)} image(s), e.g. {missing[0]} "
                         f"(--allow-missing-captions codes them with an empty caption)")
    return {n: table.get(n, table.get(os.path.splitext(n)[0], "")) for n in names}
