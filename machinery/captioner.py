"""Captions for photos that come without one: open_clip's CoCa (Yu et al. 2022, "CoCa: Contrastive Captioners
are Image-Text Foundation Models"), decoded by a loop written here.

TACO's encoder reads a caption and the decoder never does, so the caption costs nothing in the file: a good
automatic caption is free. The paper captioned Kodak and CLIC with OFA; the default here is CoCa ViT-L/14
fine-tuned on MS-COCO, whose captions read like the COCO captions TACO trains on.

open_clip's own `CoCa.generate()` needs the transformers package (and open_clip 3.3 fails to import it under
transformers 5). The decoding is short enough to write out: CoCa's forward gives the next token's logits given
the image and the tokens so far (`model(image, tokens, output_labels=False)["logits"]`), and a beam search keeps
the `beams` most probable continuations, scoring finished captions by their mean log-probability per token.
Deterministic: no sampling, ties broken by position, so a photo always gets the same caption.
"""
import torch
import torch.nn.functional as F

from machinery import clip_text

DEFAULT_MODEL, DEFAULT_PRETRAINED = "coca_ViT-L-14", "mscoco_finetuned_laion2b_s13b_b90k"


class Captioner:
    """Captioner(name, pretrained)(image) -> caption. `pretrained` is an open_clip tag, a local weights file or
    "random"; `name` may be "local-dir:<folder>" (an open_clip model folder)."""

    def __init__(self, name=DEFAULT_MODEL, pretrained=DEFAULT_PRETRAINED, device="cpu", beams=6, max_tokens=30,
                 min_tokens=5):
        import open_clip
        from open_clip.transform import PreprocessCfg, image_transform_v2
        self.name, self.pretrained = name, pretrained
        self.model = clip_text.load_clip(name, pretrained, "the captioner", "--captioner-pretrained").eval().to(device)
        if not hasattr(self.model, "text_decoder"):
            raise ValueError(f"{name} is not a captioner (an open_clip CoCa model, e.g. {DEFAULT_MODEL})")
        self.tokenizer = open_clip.get_tokenizer(name)
        self.transform = image_transform_v2(PreprocessCfg(**self.model.visual.preprocess_cfg), is_train=False)
        self.device, self.beams = device, beams
        self.max_tokens = min(max_tokens, self.tokenizer.context_length - 1)   # the start token takes one
        self.min_tokens = min(min_tokens, self.max_tokens)
        self.start, self.end = self.tokenizer.sot_token_id, self.tokenizer.eot_token_id

    @torch.no_grad()
    def __call__(self, pixels):
        """pixels (1, C, H, W): uint8 / uint16 integers or floats in [0, 1] (as images.read_pixels gives them)."""
        from PIL import Image
        x = pixels[0, :3]
        if x.dtype != torch.uint8:                       # 16-bit or float: to 8 bits, as a photo viewer shows it
            x = (x.float() / (65535 if x.dtype == torch.uint16 else 1)).clamp(0, 1).mul(255).round().byte()
        photo = Image.fromarray(x.permute(1, 2, 0).squeeze(-1).numpy()).convert("RGB")
        image = self.transform(photo)[None].to(self.device)                        # (1, 3, S, S), as open_clip
        latent, embeddings = self.model._encode_image(image)
        return self.text(self.beam_search(latent, embeddings))

    def next_token_scores(self, latent, embeddings, tokens):
        """Log-probabilities of the next token after each row of `tokens` (B, L) -> (B, vocabulary)."""
        B = len(tokens)
        logits = self.model(None, tokens, image_latent=latent.expand(B, -1),
                            image_embs=embeddings.expand(B, -1, -1), output_labels=False)["logits"][:, -1]
        scores = F.log_softmax(logits.float(), dim=-1)
        if tokens.shape[1] < self.min_tokens:             # too short to end (the start token counts, as in open_clip)
            scores[:, self.end] = -float("inf")
        return scores

    @torch.no_grad()
    def beam_search(self, latent, embeddings):
        """-> the best caption's tokens (without start and end). Each step scores every one-token extension of
        every live beam and walks the best 2 x beams of them: an end token among the first `beams` finishes that
        caption (scored by its mean log-probability per token), any other extension lives on, until `beams` live
        again. Stops when `beams` captions are finished or at max_tokens, where every beam must end."""
        live = torch.full((1, 1), self.start, dtype=torch.long, device=self.device)    # (beams, length)
        totals = torch.zeros(1, device=self.device)
        finished = []
        while len(finished) < self.beams:
            scores = totals[:, None] + self.next_token_scores(latent, embeddings, live)   # (beams, vocabulary)
            if live.shape[1] == self.max_tokens:                                # out of room: end every beam
                ends = scores[:, self.end]
                finished += [(float(t) / live.shape[1], live[r, 1:].tolist()) for r, t in enumerate(ends)]
                break
            best, where = scores.flatten().topk(min(2 * self.beams, scores.numel()))
            keep = []
            for rank, (total, index) in enumerate(zip(best.tolist(), where.tolist())):
                row, token = divmod(index, scores.shape[1])
                if token == self.end:
                    if rank < self.beams:
                        finished.append((total / live.shape[1], live[row, 1:].tolist()))  # per token, end included
                elif len(keep) < self.beams:
                    keep.append((row, token, total))
            rows, tokens, kept = zip(*keep)
            live = torch.cat([live[list(rows)], torch.tensor(tokens, device=self.device)[:, None]], dim=1)
            totals = torch.tensor(kept, device=self.device)
        return max(finished, key=lambda f: f[0])[1]

    def text(self, tokens):
        return self.tokenizer.decode(tokens).replace("<end_of_text>", "").replace("<start_of_text>", "").strip()


# ----------------------------------------------------------------------------------------------------------
# The command lines' `auto` caption: options, and captions for many images that survive an interruption.
# ----------------------------------------------------------------------------------------------------------
def add_arguments(parser):
    parser.add_argument("--captioner", default=DEFAULT_MODEL, help="for captions 'auto': the open_clip CoCa model "
                        "that writes them (or local-dir:<folder>, an open_clip model folder)")
    parser.add_argument("--captioner-pretrained", default=DEFAULT_PRETRAINED, help="its weights: an open_clip "
                        "tag, a local weights file, or 'random' (a stand-in whose captions mean nothing)")


def read_logs(pattern, name, pretrained):
    """{image: caption} from the caption logs (JSON lines) whose paths match the glob `pattern`, only those written
    by this captioner and these weights; a line an interrupted run left unfinished is skipped."""
    import glob
    import json
    table = {}
    for path in sorted(glob.glob(pattern)):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if row.get("captioner") == name and row.get("pretrained") == pretrained:
                    table[row["image"]] = row["caption"]
    return table


def caption_images(folder, names, read, log, logs, name, pretrained, device="cpu", share=None,
                   barrier=lambda: None):
    """{image: caption} for the images `names` of `folder` (read(path) -> pixels), each captioned once: captions in
    the logs matching the glob `logs` (by this captioner and weights) are reused; this process captions the
    missing ones among `share` (default: all), appending each to the JSON-lines file `log` as soon as it is
    written, so that a long job killed midway starts again where it stopped; barrier() waits for the other
    processes (torchrun) to finish their shares."""
    import json
    import os

    from tqdm import tqdm
    known = read_logs(logs, name, pretrained)
    todo = [n for n in (names if share is None else share) if n not in known]
    if todo:
        captioner = Captioner(name, pretrained, device)        # without its weights: an error, nothing written
        os.makedirs(os.path.dirname(os.path.abspath(log)), exist_ok=True)
        with open(log, "a", encoding="utf-8") as f:
            if f.tell() and not ends_a_line(log):
                f.write("\n")                                   # close a line an interrupted run left unfinished
            for image in tqdm(todo, desc=f"captions ({name})", delay=2):
                caption = captioner(read(os.path.join(folder, image)))
                f.write(json.dumps({"image": image, "caption": caption, "captioner": name,
                                    "pretrained": pretrained}) + "\n")
                f.flush()
    barrier()
    table = read_logs(logs, name, pretrained)
    return {n: table[n] for n in names}


def ends_a_line(path):
    with open(path, "rb") as f:
        f.seek(-1, 2)
        return f.read(1) == b"\n"
