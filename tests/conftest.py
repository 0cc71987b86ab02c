"""Shared test setup: the suite is offline by construction, runs from the repository root, and skips the tests
marked gpu on machines without CUDA. Fixtures shared by several files live here; plain helpers in helpers.py.

Offline by construction: tests/netguard/sitecustomize.py runs in this process and, through PYTHONPATH, in every
Python process a test starts. It refuses lookups of and connections to other hosts (loopback stays open) and
logs each attempt; a test that made one fails, named, with the host. The project's own probe
(clip_text.reachable) answers False under TACO_OFFLINE=1, torch.hub's downloader refuses at once, and the
Hugging Face hub reads only its cache: code that would download takes its "unavailable" path."""
import importlib.util
import json
import os
import sys
import tempfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
GUARD = os.path.join(HERE, "netguard")
NETWORK_LOG = os.path.join(tempfile.mkdtemp(prefix="taco-tests-"), "network-attempts.log")
os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TACO_OFFLINE="1",
                  TACO_NETWORK_LOG=NETWORK_LOG,
                  PYTHONPATH=os.pathsep.join([GUARD] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
open(NETWORK_LOG, "w").close()
_spec = importlib.util.spec_from_file_location("taco_netguard", os.path.join(GUARD, "sitecustomize.py"))
_spec.loader.exec_module(importlib.util.module_from_spec(_spec))     # this process: guarded before torch loads
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from helpers import TINY, TINY_CLIP, natural_image, tiny_model  # noqa: E402
from PIL import Image  # noqa: E402

import taco  # noqa: E402
from machinery import checkpoints, clip_text, images  # noqa: E402  (importable: the repository root is on the path)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


_checked = [0]          # bytes of the attempts log already read: attempts in a fixture's setup count for its test


def network_attempts():
    with open(NETWORK_LOG, "rb") as log:
        log.seek(_checked[0])
        new = log.read()
    _checked[0] += len(new)
    return new.decode(errors="replace").splitlines()


@pytest.fixture(autouse=True)
def no_network(request):
    """Fails the test that tried to reach another host, in this process or in one it started."""
    network_attempts()
    yield
    attempts = network_attempts()
    if attempts:
        pytest.fail(f"{request.node.nodeid} tried to reach the network {len(attempts)} time(s): "
                    + "; ".join(attempts[:3]), pytrace=False)


@pytest.fixture(scope="session")
def encoder():
    """The tiny random CLIP text tower (seeded: the same in every process)."""
    return clip_text.TextEncoder(TINY_CLIP, "random")


@pytest.fixture(scope="session")
def weights_folder(tmp_path_factory):
    """Three small real photos, a caption file and a tiny checkpoint, built once for the whole session; tests only
    read it."""
    import skimage.data
    root = tmp_path_factory.mktemp("eval")
    (root / "images").mkdir()
    photos = {"coffee.png": skimage.data.coffee()[::4, ::4], "cat.png": skimage.data.chelsea()[::3, ::3],
              "rocket.png": skimage.data.rocket()[::4, ::4]}
    for name, array in photos.items():
        Image.fromarray(np.ascontiguousarray(array)).save(root / "images" / name)
    (root / "captions.json").write_text(json.dumps({"coffee.png": "a cup of coffee", "cat.png": ["a cat", "x"],
                                                    "rocket": "a rocket"}))
    torch.manual_seed(0)
    model = taco.TACO(taco.TacoConfig(**TINY)).attach_text_encoder()
    for injector in (model.g_a.inject_quarter, model.g_a.inject_eighth):
        injector.gamma.data.normal_()
    checkpoints.save_checkpoint(str(root / "tiny.pt"), model.eval().update())
    return root


@pytest.fixture(scope="session")
def alexnet_weights(tmp_path_factory):
    """A random-weight AlexNet file in torchvision's layout, the local weights file eval.py takes as
    --alexnet-weights: its `features` (what LPIPS reads; the classifier's 58 M weights would make it 233 MB)."""
    import torchvision
    path = tmp_path_factory.mktemp("alexnet") / "alexnet.pth"
    features = torchvision.models.alexnet(weights=None).features.state_dict()
    torch.save({f"features.{k}": v for k, v in features.items()}, path)
    return str(path)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """train.py's flags for a folder of six small training photos (64 x 80, crops of 64: three steps of two an
    epoch) and a held-out one (64 x 64), captioned; no data-loader processes, stand-ins allowed. For runs whose
    claim is not about the demo's photos: the same loop and real-bitstream validation, on fewer pixels."""
    root = tmp_path_factory.mktemp("small-data")
    captions = {}
    for part, count, size in (("train", 6, (64, 80)), ("val", 1, (64, 64))):
        (root / part).mkdir()
        captions[part] = {}
        for i in range(count):
            name = f"{part}-{i}.png"
            images.write_image(natural_image(*size, seed=10 * len(part) + i), str(root / part / name))
            captions[part][name] = f"photo number {i} of the {part} set"
        (root / f"{part}.json").write_text(json.dumps(captions[part]))
    return ["--data", "folder", "--root", str(root / "train"), "--captions", str(root / "train.json"),
            "--val-root", str(root / "val"), "--val-captions", str(root / "val.json"), "--workers", "0",
            "--allow-missing-weights"]


@pytest.fixture
def no_curves(monkeypatch):
    """train.py's runs without drawing curves.png (a second of matplotlib at the end of every run), for tests
    whose claim is not the figure; the demo's and torchrun's tests draw it."""
    from machinery import training
    monkeypatch.setattr(training, "plot_log", lambda log_path, png_path: None)


@pytest.fixture(scope="session")
def tiny_hyperprior(encoder):
    """helpers.tiny_model(encoder) -- the hyperprior, seed 0, gammas drawn -- built once: for tests that only read
    it (none may change its weights, or its integer networks)."""
    return tiny_model(encoder)


@pytest.fixture(scope="session")
def tiny_elic(encoder):
    """helpers.tiny_model of the ELIC backbone, built and converted to integer networks once: for tests that
    only read it (none may change its weights)."""
    from helpers import TINY_ELIC
    return tiny_model(encoder, config=TINY_ELIC)
