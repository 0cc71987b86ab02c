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

That forward re-reads the whole prefix of every beam at every step. `CachedDecoder` computes each position once,
as serving stacks do: the keys and values of every causal self-attention layer (text tower and multimodal
decoder) grow by one position per step and are reordered with the beams, the cross-attention keys and values of
the image are computed once, and only the new position is projected to the vocabulary. Many photos are decoded
side by side, each with its own beams.
"""
import torch
import torch.nn.functional as F

from machinery import clip_text, devices, files
from machinery.images import to_pixels, to_unit

OPEN_CLIP_LAYOUT = "3.3"        # the open_clip whose CoCa blocks CachedDecoder reads (open_clip.transformer)
CAPTION_MEMORY = 1 << 30        # bytes that the photos decoded side by side may hold (caption_images)

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
        self.tokenizer = clip_text.tokenizer(name)
        self.transform = image_transform_v2(PreprocessCfg(**self.model.visual.preprocess_cfg), is_train=False)
        self.device, self.beams = device, beams
        self.max_tokens = min(max_tokens, self.tokenizer.context_length - 1)   # the start token takes one
        self.min_tokens = min(min_tokens, self.max_tokens)
        self.start, self.end = self.tokenizer.sot_token_id, self.tokenizer.eot_token_id
        if not CachedDecoder.fits(self.model):
            raise ValueError(f"open_clip {open_clip.__version__}'s CoCa is laid out unlike open_clip "
                             f"{OPEN_CLIP_LAYOUT}'s, which the captioner reads: install open_clip_torch "
                             f"{OPEN_CLIP_LAYOUT} (requirements.txt)")

    @torch.no_grad()
    def __call__(self, pixels):
        """pixels (1, C, H, W): uint8 / uint16 integers or floats in [0, 1] (as images.read_pixels gives them)."""
        return self.caption_many([pixels])[0]

    @torch.no_grad()
    def caption_many(self, photos):
        """A list of photos (each as __call__ takes it) -> their captions, decoded side by side."""
        image = torch.cat([self.preprocess(pixels) for pixels in photos]).to(self.device)   # (n, 3, S, S)
        _, embeddings = self.model._encode_image(image)                        # (n, positions, width)
        return [self.text(tokens) for tokens in self.beam_search_many(embeddings)]

    def bytes_per_photo(self):
        """About what one more photo decoded side by side holds: the image tower's activations (positions x
        width x ~16 values at once), the cross-attention keys and values of every decoder layer, the self-attention
        caches of every layer for each beam at max_tokens, and each beam's scores over the vocabulary."""
        m = self.model
        positions, width = m.visual.positional_embedding.shape
        text_width, vocabulary = m.text.transformer.width, m.text_decoder.text_projection.shape[1]
        layers = len(m.text.transformer.resblocks) + len(m.text_decoder.resblocks)
        values = (16 * positions * width + 2 * len(m.text_decoder.cross_attn) * positions * text_width
                  + 2 * layers * self.max_tokens * text_width * self.beams + 4 * self.beams * vocabulary)
        return 4 * values

    def preprocess(self, pixels):
        from PIL import Image
        x = pixels[0, :3]
        if x.dtype != torch.uint8:                       # 16-bit or float: to 8 bits, as a photo viewer shows it
            x = to_pixels(to_unit(x), False, torch.uint8)
        photo = Image.fromarray(x.permute(1, 2, 0).squeeze(-1).numpy()).convert("RGB")
        return self.transform(photo)[None]                                     # (1, 3, S, S), as open_clip

    def next_token_scores(self, decoder, tokens, owner):
        """Log-probabilities of the next token after each row of `tokens` (B, L) -> (B, vocabulary)."""
        scores = F.log_softmax(decoder.logits(tokens, owner).float(), dim=-1)
        if tokens.shape[1] < self.min_tokens:             # too short to end (the start token counts, as in open_clip)
            scores[:, self.end] = -float("inf")
        return scores

    @torch.no_grad()
    def beam_search_many(self, embeddings):
        """-> the best caption's tokens (without start and end) of each image. Each step scores every one-token
        extension of every live beam of an image and walks its best 2 x beams: an end token among the first
        `beams` finishes that caption (scored by its mean log-probability per token), any other extension lives
        on, until `beams` live again. An image is done when `beams` of its captions are finished, or at
        max_tokens, where every beam must end. The images' live beams are rows of one batch."""
        n = len(embeddings)
        decoder = CachedDecoder(self.model, embeddings)                         # next-token logits
        live = torch.full((n, 1), self.start, dtype=torch.long, device=self.device)   # (rows, length)
        owner, totals = list(range(n)), torch.zeros(n, device=self.device)             # each row's image, score
        finished = [[] for _ in range(n)]
        while owner:
            scores = totals[:, None] + self.next_token_scores(decoder, live, owner)   # (rows, vocabulary)
            rows, tokens, kept, owners = [], [], [], []
            for image, own in runs(owner):                                      # each live image, in order
                mine = list(range(own.start, own.stop))
                step = self.step(scores[own], live[own], finished[image])
                if step is not None:
                    rows += [mine[r] for r in step[0]]
                    tokens += step[1]
                    kept += step[2]
                    owners += [image] * len(step[0])
            if not rows:
                break
            decoder.reorder(rows)
            live = torch.cat([live[rows], torch.tensor(tokens, device=self.device)[:, None]], dim=1)
            owner, totals = owners, torch.tensor(kept, device=self.device)
        return [max(f, key=lambda f: f[0])[1] for f in finished]

    def step(self, scores, live, finished):
        """One image's step: adds its finished captions to `finished`; -> (rows, tokens, totals) of the beams that
        live on, or None when the image is done."""
        if live.shape[1] == self.max_tokens:                                    # out of room: end every beam
            finished += [(float(t) / live.shape[1], live[r, 1:].tolist()) for r, t in enumerate(scores[:, self.end])]
            return None
        best, where = scores.flatten().topk(min(2 * self.beams, scores.numel()))
        keep = []
        for rank, (total, index) in enumerate(zip(best.tolist(), where.tolist())):
            row, token = divmod(index, scores.shape[1])
            if token == self.end:
                if rank < self.beams:
                    finished.append((total / live.shape[1], live[row, 1:].tolist()))  # per token, end included
            elif len(keep) < self.beams:
                keep.append((row, token, total))
        return None if len(finished) >= self.beams else tuple(map(list, zip(*keep)))

    def text(self, tokens):
        return self.tokenizer.decode(tokens).replace("<end_of_text>", "").replace("<start_of_text>", "").strip()


def runs(owner):
    """[(image, slice of rows)] of the runs of equal images in `owner` (the beam search keeps each image's rows
    together)."""
    out, start = [], 0
    for r in range(1, len(owner) + 1):
        if r == len(owner) or owner[r] != owner[start]:
            out.append((owner[start], slice(start, r)))
            start = r
    return out


class CachedDecoder:
    """CoCa's text tower and multimodal decoder, one new position per call, reading open_clip's own modules and
    weights (the one place that reaches into its blocks: open_clip.transformer's ResidualAttentionBlock, whose
    forward is x + ls_1(attn(ln_1(x))), then x + ls_2(mlp(ln_2(x))), with ln_1_kv on cross-attention inputs).

    Both towers are causal, so a position's features never change once computed: each self-attention layer keeps
    the keys and values of the positions so far, (rows, heads, length, d), and the new position attends to them
    and to itself. The text tower masks padding keys as open_clip does (its CoCa marks key j valid by token j,
    or by token j - 1 when correct_cls_mask is off, as in the released weights); the CLS token it appends last is
    never attended to by the token positions, so it is left out."""

    def __init__(self, model, embeddings):
        self.text, self.decoder = model.text, model.text_decoder
        self.blocks = list(self.text.transformer.resblocks) + list(self.decoder.resblocks)
        self.cache = [None] * len(self.blocks)
        self.cross = [self.keys_values(block, block.ln_1_kv(embeddings)) for block in self.decoder.cross_attn]

    @staticmethod
    def fits(model):
        from open_clip.transformer import MultimodalTransformer, ResidualAttentionBlock, TextTransformer, Transformer
        text, decoder = getattr(model, "text", None), getattr(model, "text_decoder", None)
        return (type(text) is TextTransformer and type(text.transformer) is Transformer and
                type(decoder) is MultimodalTransformer and text.cls_emb is not None and
                text.transformer.batch_first and decoder.batch_first and
                all(type(b) is ResidualAttentionBlock for b in [*text.transformer.resblocks, *decoder.resblocks,
                                                                 *decoder.cross_attn]))

    @staticmethod
    def heads(block, t):
        B, L, D = t.shape
        return t.view(B, L, block.attn.num_heads, -1).transpose(1, 2)            # (B, heads, L, d)

    def keys_values(self, block, x):
        _, w_k, w_v = block.attn.in_proj_weight.chunk(3)
        _, b_k, b_v = block.attn.in_proj_bias.chunk(3)
        return self.heads(block, F.linear(x, w_k, b_k)), self.heads(block, F.linear(x, w_v, b_v))

    def attend(self, block, x, keys, values, mask=None):
        """x + ls_1(attention of ln_1(x) over keys / values), then the block's MLP: x (rows, 1, D)."""
        w_q, b_q = block.attn.in_proj_weight.chunk(3)[0], block.attn.in_proj_bias.chunk(3)[0]
        q = self.heads(block, F.linear(block.ln_1(x), w_q, b_q))                 # (rows, heads, 1, d)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)    # (rows, heads, 1, d)
        x = x + block.ls_1(block.attn.out_proj(out.transpose(1, 2).flatten(2)))
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    def self_attend(self, i, x, mask=None):
        """Block i on the new position x (rows, 1, D), its keys and values appended to the cache."""
        block = self.blocks[i]
        k, v = self.keys_values(block, block.ln_1(x))
        if self.cache[i] is not None:
            k, v = torch.cat([self.cache[i][0], k], dim=2), torch.cat([self.cache[i][1], v], dim=2)
        self.cache[i] = k, v
        return self.attend(block, x, k, v, mask)

    def logits(self, tokens, owner):
        """tokens (rows, L): the rows' tokens so far, the cache holding positions < L - 1 -> (rows, vocabulary)."""
        text, position = self.text, tokens.shape[1] - 1
        x = text.token_embedding(tokens[:, -1:]).to(text.transformer.get_cast_dtype())
        x = x + text.positional_embedding[position].to(x.dtype)                  # (rows, 1, D)
        valid = tokens != text.pad_id
        if not text.correct_cls_mask:                    # open_clip's legacy mask: key j valid by token j - 1
            valid = torch.cat([torch.ones_like(valid[:, :1]), valid[:, :-1]], dim=1)
        mask = None if valid.all() else valid[:, None, None, :]                  # (rows, 1, 1, L) of keys
        layers = len(text.transformer.resblocks)
        for i in range(layers):
            x = self.self_attend(i, x, mask)
        groups = runs(owner)                                                    # each image's rows, contiguous
        for i, block in enumerate(self.decoder.cross_attn):                     # x: the token's features
            x = self.self_attend(layers + i, x)
            x = torch.cat([self.cross_attend(block, x[rows], *(kv[image:image + 1] for kv in self.cross[i]))
                           for image, rows in groups])
        return (self.decoder.ln_final(x) @ self.decoder.text_projection)[:, 0]   # (rows, vocabulary)

    def cross_attend(self, block, x, keys, values):
        """One image's rows x (rows, 1, D) attending to its keys / values (1, heads, T, d): the rows become the
        queries of one attention, so the image's keys and values are read once, not copied per beam."""
        return self.attend(block, x.transpose(0, 1), keys, values).transpose(0, 1)

    def reorder(self, rows):
        """The beams that live on, by row index (a row may be kept twice, or dropped)."""
        index = torch.tensor(rows, device=self.cache[0][0].device)
        self.cache = [(k[index], v[index]) for k, v in self.cache]


# ----------------------------------------------------------------------------------------------------------
# The command lines' `auto` caption: options, and captions for many images that survive an interruption.
# ----------------------------------------------------------------------------------------------------------
def add_arguments(parser):
    parser.add_argument("--captioner", default=DEFAULT_MODEL, help="for captions 'auto': the open_clip CoCa model "
                        "that writes them (or local-dir:<folder>, an open_clip model folder)")
    parser.add_argument("--captioner-pretrained", default=DEFAULT_PRETRAINED, help="its weights: an open_clip "
                        "tag, a local weights file, or 'random' (a stand-in whose captions mean nothing)")


def auto_caption(args, pixels):
    """A command line's caption 'auto' for one photo: written by --captioner with --captioner-pretrained, printed."""
    caption = Captioner(args.captioner, args.captioner_pretrained, args.device)(pixels)
    print(f"caption: {caption}")
    return caption


def read_logs(pattern, name, pretrained):
    """{image: caption} from the caption logs (JSON lines, files.read_jsonl) whose paths match the glob `pattern`,
    only those written by this captioner and these weights."""
    import glob
    table = {}
    for path in sorted(glob.glob(pattern)):
        for row in files.read_jsonl(path):
            if row.get("captioner") == name and row.get("pretrained") == pretrained:
                table[row["image"]] = row["caption"]
    return table


def caption_images(folder, names, read, out, name, pretrained, device="cpu", rank=0, world=1,
                   memory=CAPTION_MEMORY):
    """{image: caption} for the images `names` of `folder` (read(path) -> pixels), each captioned once, the
    same table in every rank: captions in the logs of `out` by this captioner and weights are reused; this rank
    captions its share of the missing ones (every world-th image), as many side by side as fit in about `memory`
    bytes, appending each to its log out/captions-auto-<rank>.jsonl as soon as its batch is written, so that a
    long job killed midway starts again where it stopped; then it waits for the other ranks' shares."""
    import glob
    import json
    import os

    from tqdm import tqdm
    logs = os.path.join(glob.escape(out), "captions-auto*.jsonl")
    known = read_logs(logs, name, pretrained)
    todo = [n for n in names[rank::world] if n not in known]
    if todo:
        captioner = Captioner(name, pretrained, device)        # without its weights: an error, nothing written
        log = os.path.join(out, f"captions-auto-{rank}.jsonl")
        os.makedirs(out, exist_ok=True)
        files.cut_unfinished_line(log)                          # what an interrupted run left unfinished
        with open(log, "a", encoding="utf-8") as f:
            batch = max(1, min(len(todo), memory // captioner.bytes_per_photo()))
            bar = tqdm(total=len(todo), desc=f"captions ({name})", delay=2)
            for start in range(0, len(todo), batch):
                chunk = todo[start:start + batch]
                captions = captioner.caption_many([read(os.path.join(folder, image)) for image in chunk])
                for image, caption in zip(chunk, captions):
                    f.write(json.dumps({"image": image, "caption": caption, "captioner": name,
                                        "pretrained": pretrained}) + "\n")
                f.flush()
                bar.update(len(chunk))
            bar.close()
    devices.barrier()
    table = read_logs(logs, name, pretrained)
    return {n: table[n] for n in names}
