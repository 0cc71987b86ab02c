"""Where work runs. Transforms run on the model's device; the latents and the integer networks need exact
float64, which some devices lack; a GPU is held to deterministic float settings while coding; under torchrun
every process is one rank of a group (train.py and eval.py)."""
import contextlib
import datetime
import os

import torch
import torch.distributed as dist


@contextlib.contextmanager
def deterministic_gpu():
    """Coding runs in plain fp32 with deterministic cuDNN algorithms (as the reference): cuDNN may otherwise
    pick another convolution algorithm from call to call, and TF32 (which training may enable) rounds
    matmul inputs to 10 mantissa bits, so the encoder's and the decoder's float paths would drift further."""
    flags = (torch.backends.cudnn, "deterministic", True), (torch.backends.cudnn, "allow_tf32", False), \
        (torch.backends.cuda.matmul, "allow_tf32", False)
    saved = [getattr(owner, name) for owner, name, _ in flags]
    for owner, name, value in flags:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for (owner, name, _), value in zip(flags, saved):
            setattr(owner, name, value)


def check_device(name):
    """The --device a user typed -> torch.device, or one ValueError that names it: a misspelling lists the
    choices, a device this machine lacks says so."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {name!r}: cpu, cuda, cuda:N (the N-th GPU) or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device on this machine (--device cpu runs on the CPU)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"numbered from 0")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: no MPS device on this machine (--device cpu runs on the CPU)")
    return device


def has_float64(device):
    """False on devices without float64 (Apple's MPS refuses to create it)."""
    try:
        torch.zeros(1, dtype=torch.float64, device=device)
        return True
    except (TypeError, RuntimeError):
        return False


def latent_device(model):
    """Where the latents and the integer networks live: the model's device, or the CPU on a device without
    float64 (Apple's MPS), since the integer arithmetic needs float64's exact integers."""
    device = next(model.parameters()).device
    return device if has_float64(device) else torch.device("cpu")


def join_ranks(device):
    """-> rank, world size, device. Under torchrun (WORLD_SIZE, RANK, LOCAL_RANK set) each process joins the
    group -- NCCL on GPUs, gloo on CPUs, waiting up to a week, since ranks wait for the slowest at the captions
    and at the end -- and takes the GPU of its local rank; a plain run is a world of one on `device`."""
    device = torch.device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(days=7))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def barrier():
    """Wait for every other rank (nothing to wait for in a world of one)."""
    if dist.is_initialized():
        dist.barrier()
