"""Claims about captioner.py: the decoding loop is greedy / beam search over CoCa's own next-token logits, ends,
respects its limits and is deterministic; `auto` captions reach compress, eval.py and train.py, and without the
weights the command line ends in one error line with nothing written. A tiny random CoCa stands in, given to
open_clip as a model folder (tests/tiny_coca)."""
import contextlib
import itertools
import json
import os
import threading

import pytest
import torch
from helpers import TINY, natural_image, tiny_model
from PIL import Image

import codec
import eval as evaluation
import train
from machinery import captioner, checkpoints, images, training

TINY_COCA = "local-dir:" + os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_coca")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Weights for the tiny CoCa, saved as a local weights file: open_clip's initialisation leaves the text
    decoder's output projection at zero (every token equally likely), so it is drawn at random here."""
    torch.manual_seed(0)
    model = captioner.clip_text.load_clip(TINY_COCA, "random")
    torch.nn.init.normal_(model.text_decoder.text_projection, std=1.0)
    path = str(tmp_path_factory.mktemp("coca") / "open_clip_pytorch_model.bin")
    torch.save(model.state_dict(), path)
    return path


def photo(seed=0):
    return (natural_image(80, 120, seed=seed) * 255).round().byte()


def encoded(c, pixels):
    image = c.transform(Image.fromarray(pixels[0].permute(1, 2, 0).numpy()))[None]
    return c.model._encode_image(image)


class Uncached:
    """CoCa's own forward over the whole prefix of every row: the reference the cached decoder must match, and the
    decoder of a wrapped text decoder (these tests' restricted vocabularies), whose blocks the cache cannot read."""

    def __init__(self, model, latent, embeddings):
        self.model, self.latent, self.embeddings = model, latent, embeddings

    def logits(self, tokens, owner):
        return self.model(None, tokens, image_latent=self.latent[owner], image_embs=self.embeddings[owner],
                          output_labels=False)["logits"][:, -1]                 # (rows, vocabulary)

    def reorder(self, rows):
        pass


@contextlib.contextmanager
def uncached(latent):
    """The beam search decodes with Uncached instead of the cached decoder."""
    saved = captioner.CachedDecoder
    captioner.CachedDecoder = lambda model, embeddings: Uncached(model, latent, embeddings)
    try:
        yield
    finally:
        captioner.CachedDecoder = saved


@torch.no_grad()
def log_probabilities(c, latent, embeddings, tokens):
    """Teacher forcing, one forward over the whole sequence: log p of every token after the start."""
    tokens = torch.tensor([tokens])
    logits = c.model(None, tokens, image_latent=latent, image_embs=embeddings, output_labels=False)["logits"]
    return torch.log_softmax(logits[0, :-1].float(), -1).gather(1, tokens[0, 1:, None])[:, 0]


class Only(torch.nn.Module):
    """CoCa's text decoder with every token but `allowed` made impossible: a vocabulary small enough to search
    exhaustively."""

    def __init__(self, decoder, allowed):
        super().__init__()
        self.decoder, self.allowed = decoder, allowed

    def forward(self, image_embs, token_embs):
        logits = self.decoder(image_embs, token_embs)
        mask = torch.full((logits.shape[-1],), -1e9)
        mask[self.allowed] = 0
        return logits + mask


def test_greedy_decoding_takes_the_most_probable_token_at_every_step(weights):
    c = captioner.Captioner(TINY_COCA, weights, beams=1, max_tokens=12, min_tokens=3)
    latent, embeddings = encoded(c, photo())
    tokens = [c.start]
    while len(tokens) < 12:                                           # an independent greedy loop
        with torch.no_grad():
            logits = c.model(None, torch.tensor([tokens]), image_latent=latent, image_embs=embeddings,
                             output_labels=False)["logits"][0, -1]
        if len(tokens) < 3:                                           # the start token counts
            logits[c.end] = -float("inf")
        tokens.append(int(logits.argmax()))
        if tokens[-1] == c.end:
            break
    expected = [t for t in tokens[1:] if t != c.end]
    assert c.beam_search_many(embeddings)[0] == expected


def test_beam_search_finds_the_best_caption_of_a_small_vocabulary_exhaustively(weights):
    c = captioner.Captioner(TINY_COCA, weights, beams=16, max_tokens=4, min_tokens=1)
    words = c.tokenizer.encode("cat dog")                              # two tokens
    c.model.text_decoder = Only(c.model.text_decoder, words + [c.end])
    latent, embeddings = encoded(c, photo(3))
    best, best_score = None, -float("inf")
    for length in range(4):                                            # 0 to 3 words, then the end token
        for middle in itertools.product(words, repeat=length):
            score = float(log_probabilities(c, latent, embeddings, [c.start, *middle, c.end]).mean())
            if score > best_score:
                best, best_score = list(middle), score
    with uncached(latent):
        assert c.beam_search_many(embeddings)[0] == best


def test_the_loop_ends_at_the_end_token_and_within_the_length_limit(weights):
    c = captioner.Captioner(TINY_COCA, weights, beams=3, max_tokens=7, min_tokens=4)
    latent, embeddings = encoded(c, photo())
    assert len(c.beam_search_many(embeddings)[0]) <= 6                        # 7 tokens at most, the end included
    boost = torch.zeros(49408)
    boost[c.end] = 50.0

    class EndSoon(torch.nn.Module):
        def __init__(self, decoder):
            super().__init__()
            self.decoder = decoder

        def forward(self, image_embs, token_embs):
            return self.decoder(image_embs, token_embs) + boost
    c.model.text_decoder = EndSoon(c.model.text_decoder)
    with uncached(latent):
        assert len(c.beam_search_many(embeddings)[0]) == 3                    # the earliest the minimum allows


def test_the_same_photo_always_gets_the_same_caption(weights):
    first = captioner.Captioner(TINY_COCA, weights, max_tokens=10)
    again = captioner.Captioner(TINY_COCA, weights, max_tokens=10)
    caption = first(photo())
    assert isinstance(caption, str) and caption == first(photo()) == again(photo())
    assert caption == again(photo().float() / 255)                     # 8-bit or float pixels: the same photo


def test_compress_with_an_auto_caption_prints_it_and_decodes_without_it(tmp_path, capsys, weights):
    model = tiny_model()
    checkpoints.save_checkpoint(str(tmp_path / "tiny.pt"), model)
    Image.fromarray(photo()[0].permute(1, 2, 0).numpy()).save(tmp_path / "photo.png")
    args = ["compress", str(tmp_path / "photo.png"), "--checkpoint", str(tmp_path / "tiny.pt"), "--caption", "auto",
            "--captioner", TINY_COCA, "--captioner-pretrained", weights]
    assert codec.main(args) == 0
    printed = capsys.readouterr().out
    caption = captioner.Captioner(TINY_COCA, weights)(images.read_pixels(str(tmp_path / "photo.png")))
    assert f"caption: {caption}\n" in printed
    data = (tmp_path / "photo.taco").read_bytes()
    assert data == model.compress(images.read_pixels(str(tmp_path / "photo.png")), caption)
    assert codec.main(["decompress", str(tmp_path / "photo.taco"), "--checkpoint", str(tmp_path / "tiny.pt")]) == 0


def test_without_the_captioners_weights_one_error_line_and_nothing_written(tmp_path, capsys):
    checkpoints.save_checkpoint(str(tmp_path / "tiny.pt"), tiny_model())
    Image.fromarray(photo()[0].permute(1, 2, 0).numpy()).save(tmp_path / "photo.png")
    before = sorted(os.listdir(tmp_path))
    status = codec.main(["compress", str(tmp_path / "photo.png"), "--checkpoint", str(tmp_path / "tiny.pt"),
                         "--caption", "auto"])
    errors = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(errors) == 1 and errors[0].startswith("error: could not load the captioner")
    assert "--captioner-pretrained" in errors[0]
    assert sorted(os.listdir(tmp_path)) == before


def test_eval_captions_each_image_once_and_reuses_the_captions(tmp_path, monkeypatch, weights):
    import taco
    (tmp_path / "images").mkdir()
    for seed in range(3):
        Image.fromarray(photo(seed)[0].permute(1, 2, 0).numpy()).save(tmp_path / "images" / f"{seed}.png")
    torch.manual_seed(0)
    checkpoints.save_checkpoint(str(tmp_path / "tiny.pt"), taco.TACO(taco.TacoConfig(**TINY)).eval().update())
    args = ["--checkpoint", str(tmp_path / "tiny.pt"), "--images", str(tmp_path / "images"), "--captions", "auto",
            "--captioner", TINY_COCA, "--captioner-pretrained", weights, "--baselines", "", "--out",
            str(tmp_path / "out")]
    evaluation.main(args)
    written = json.loads((tmp_path / "out" / "captions-auto.json").read_text())
    c = captioner.Captioner(TINY_COCA, weights)
    assert written == {f"{s}.png": c(images.read_pixels(str(tmp_path / "images" / f"{s}.png"))) for s in range(3)}
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = report["checkpoints"][str(tmp_path / "tiny.pt")]["given"]["per_image"]
    assert {r["image"]: r["caption"] for r in rows} == written

    def no_captioner(*args, **kwargs):
        raise AssertionError("captioned again")
    monkeypatch.setattr(captioner, "Captioner", no_captioner)
    evaluation.main(args + ["--force"])                                 # the captions are reused
    with pytest.raises(SystemExit, match="--captioner"):
        evaluation.main(args[:-6] + ["--captioner-pretrained", "other.bin", "--resume", "--baselines", "",
                                     "--out", str(tmp_path / "out")])


def test_training_on_a_folder_without_captions_captions_it_once(tmp_path, weights):
    from test_train import TINY_RUN
    (tmp_path / "photos").mkdir()
    for seed in range(2):
        Image.fromarray(photo(seed)[0].permute(1, 2, 0).numpy()).save(tmp_path / "photos" / f"{seed}.png")
    args = TINY_RUN + ["--data", "folder", "--root", str(tmp_path / "photos"), "--captions", "auto", "--captioner",
                       TINY_COCA, "--captioner-pretrained", weights, "--steps", "1", "--workers", "0",
                       "--val-every", "100", "--k-p", "0", "--k-j", "0", "--out", str(tmp_path / "run")]
    train.train(train.parse_args(args))
    lines = [json.loads(line) for line in (tmp_path / "run" / "captions-auto-0.jsonl").read_text().splitlines()]
    assert sorted(line["image"] for line in lines) == ["0.png", "1.png"]
    assert all(line["captioner"] == TINY_COCA and line["pretrained"] == weights for line in lines)
    pairs, _ = training.training_data(train.parse_args(args))             # each image with its whole caption
    assert sorted((os.path.basename(p), c) for p, c in pairs) == sorted((l["image"], [l["caption"]]) for l in lines)


def test_a_caption_log_cut_off_mid_line_is_continued(tmp_path, weights):
    (tmp_path / "photos").mkdir()
    for seed in range(2):
        Image.fromarray(photo(seed)[0].permute(1, 2, 0).numpy()).save(tmp_path / "photos" / f"{seed}.png")
    (tmp_path / "run").mkdir()
    log = tmp_path / "run" / "captions-auto.jsonl"                      # the name train.py's logs once had
    first = json.dumps({"image": "0.png", "caption": "a kept caption", "captioner": TINY_COCA, "pretrained": weights})
    log.write_text(first + "\n" + '{"image": "1.png", "capt')                 # killed while writing the second
    table = captioner.caption_images(str(tmp_path / "photos"), ["0.png", "1.png"], images.read_pixels,
                                     str(tmp_path / "run"), TINY_COCA, weights)
    c = captioner.Captioner(TINY_COCA, weights)
    assert table == {"0.png": "a kept caption", "1.png": c(images.read_pixels(str(tmp_path / "photos" / "1.png")))}
    assert captioner.read_logs(str(tmp_path / "run" / "captions-auto-0.jsonl"), TINY_COCA, weights) == \
        {"1.png": table["1.png"]}                                        # only the missing one captioned


def test_each_rank_captions_every_world_th_image_and_all_read_the_whole_table(tmp_path, weights, monkeypatch):
    (tmp_path / "photos").mkdir()
    names = [f"{seed}.png" for seed in range(3)]
    for seed, name in enumerate(names):
        Image.fromarray(photo(seed)[0].permute(1, 2, 0).numpy()).save(tmp_path / "photos" / name)
    monkeypatch.setattr(captioner.devices, "barrier", threading.Barrier(2).wait)   # two ranks, as threads
    out, tables = str(tmp_path / "run"), {}

    def rank(r):
        tables[r] = captioner.caption_images(str(tmp_path / "photos"), names, images.read_pixels, out, TINY_COCA,
                                             weights, rank=r, world=2)
    ranks = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for thread in ranks:
        thread.start()
    for thread in ranks:
        thread.join()
    assert tables[0] == tables[1] and sorted(tables[0]) == names
    assert list(captioner.read_logs(out + "/captions-auto-1.jsonl", TINY_COCA, weights)) == ["1.png"]
    assert sorted(captioner.read_logs(out + "/captions-auto-0.jsonl", TINY_COCA, weights)) == ["0.png", "2.png"]


def decode_both_ways(c, latent, embeddings):
    """The beam search's tokens with CoCa's cached decoder and with its own uncached forward."""
    cached = c.beam_search_many(embeddings)
    with uncached(latent):
        return cached, c.beam_search_many(embeddings)


@pytest.mark.parametrize("beams", [1, 6], ids=["greedy", "beam search"])
def test_the_cached_decoder_gives_the_uncached_loops_tokens_on_several_photos(weights, beams):
    c = captioner.Captioner(TINY_COCA, weights, beams=beams, max_tokens=20)
    assert captioner.CachedDecoder.fits(c.model)
    for seed in range(4):
        latent, embeddings = encoded(c, photo(seed))
        cached, uncached = decode_both_ways(c, latent, embeddings)
        assert cached == uncached and len(cached[0]) > 0


def test_an_open_clip_laid_out_unlike_the_one_the_cache_reads_is_refused_in_one_line(weights, monkeypatch):
    monkeypatch.setattr(captioner.CachedDecoder, "fits", staticmethod(lambda model: False))
    with pytest.raises(ValueError, match="install open_clip_torch 3.3"):
        captioner.Captioner(TINY_COCA, weights)


def test_cached_scores_agree_with_the_whole_prefix_forward_at_every_position(weights):
    """Along one sequence (padding-id tokens included, which CoCa's text tower masks as keys), and after the rows
    were reordered as beams are."""
    c = captioner.Captioner(TINY_COCA, weights)
    latent, embeddings = encoded(c, photo(1))
    latent, embeddings = latent.expand(3, -1), embeddings.expand(3, -1, -1)
    g = torch.Generator().manual_seed(0)
    tokens = torch.cat([torch.full((3, 1), c.start), torch.randint(1, 49000, (3, 11), generator=g)], dim=1)
    tokens[1, 4] = tokens[2, 7] = c.model.text.pad_id
    cached, reference = captioner.CachedDecoder(c.model, embeddings), Uncached(c.model, latent, embeddings)
    for length in range(1, 13):
        rows = [2, 0, 1] if length == 6 else [0, 1, 2]                 # a reordering midway
        if length == 6:
            cached.reorder(rows)
            tokens, latent, embeddings = tokens[rows], latent[rows], embeddings[rows]
            reference = Uncached(c.model, latent, embeddings)
        a = torch.log_softmax(cached.logits(tokens[:, :length], [0, 1, 2]), -1)
        b = torch.log_softmax(reference.logits(tokens[:, :length], [0, 1, 2]), -1)
        assert torch.allclose(a, b, atol=1e-5), length


def test_the_cached_decoder_agrees_with_ties_and_with_an_early_end(weights):
    c = captioner.Captioner(TINY_COCA, weights, beams=4, max_tokens=12, min_tokens=3)
    projection = c.model.text_decoder.text_projection
    with torch.no_grad():
        for a, b in [(320, 321), (1000, 1001), (2000, 2001)]:          # pairs of tokens with equal logits
            projection[:, b] = projection[:, a]
    latent, embeddings = encoded(c, photo(2))
    cached, uncached = decode_both_ways(c, latent, embeddings)
    assert cached == uncached
    with torch.no_grad():                                               # the end token wins as early as allowed:
        c.model.text_decoder.ln_final.bias.fill_(1.0)                  # features near +1 everywhere, and the end
        projection[:, c.end] = 10.0                                     # token's logit their sum times 10
    cached, uncached = decode_both_ways(c, latent, embeddings)
    assert cached == uncached and len(cached[0]) == 2


def test_caption_images_batches_within_its_memory_budget_logs_every_caption_and_batches_change_nothing(tmp_path,
                                                                                                      weights):
    (tmp_path / "photos").mkdir()
    names = [f"{seed}.png" for seed in range(5)]
    for seed, name in enumerate(names):
        Image.fromarray(photo(seed)[0].permute(1, 2, 0).numpy()).save(tmp_path / "photos" / name)
    per_photo = captioner.Captioner(TINY_COCA, weights).bytes_per_photo()
    tables = {}
    for batch in (1, 2, 5):
        out = str(tmp_path / f"run-{batch}")
        tables[batch] = captioner.caption_images(str(tmp_path / "photos"), names, images.read_pixels, out,
                                                 TINY_COCA, weights, memory=batch * per_photo)
        assert captioner.read_logs(out + "/captions-auto-0.jsonl", TINY_COCA, weights) == tables[batch]
    assert tables[1] == tables[2] == tables[5] and len(set(tables[1].values())) > 1   # side by side = one by one
