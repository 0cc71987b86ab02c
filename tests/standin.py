"""A stand-in accelerator for CPU-only machines: tensors "on" it live on the CPU but report device cuda, and
every rule a real GPU enforces is enforced -- no mixing with CPU tensors in one op (0-dim CPU tensors and
index tensors excepted, as CUDA allows), no .numpy(), and .cpu() / .to("cpu") return a CPU copy.
Code that is device-correct runs unchanged under it; code that mixes devices fails here as it would on a GPU.

    with StandInGPU() as gpu:
        model.to(gpu.device)
        ...

StandInGPU(float64=False) also refuses float64 on the device, as Apple's MPS does.
"""
import weakref

import torch
from torch.overrides import TorchFunctionMode

CPU = torch.device("cpu")
INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}
BOOKKEEPING = {"_parse_to", "_has_compatible_shallow_copy_type"}   # nn.Module.to's own checks, no arithmetic


class DeviceMismatch(RuntimeError):
    pass


def tensors_in(value, found=None):
    """The tensors in `value` and in the lists, tuples and dicts it nests (what torch's pytree would visit, in
    a fraction of its time: this runs for every torch call under the stand-in)."""
    found = [] if found is None else found
    if isinstance(value, torch.Tensor):
        found.append(value)
    elif isinstance(value, (list, tuple)):
        for item in value:
            tensors_in(item, found)
    elif isinstance(value, dict):
        for item in value.values():
            tensors_in(item, found)
    return found


class StandInGPU(TorchFunctionMode):
    device = torch.device("cuda", 0)

    def __init__(self, float64=True):
        super().__init__()
        self.refs = {}                            # id -> weak reference of the tensors "on the GPU"
        self.float64 = float64

    def is_gpu(self, value):
        ref = self.refs.get(id(value))
        return ref is not None and ref() is value

    def mark(self, t, on_gpu=True):
        if not on_gpu:
            self.refs.pop(id(t), None)
        elif isinstance(t, torch.Tensor):
            self.refs[id(t)] = weakref.ref(t, lambda _, key=id(t): self.refs.pop(key, None))

    def gpu_copy(self, t, clone=True):
        t = t.clone() if clone else t
        self.mark(t)
        return t

    def _wants_gpu(self, value):
        if isinstance(value, str):
            value = torch.device(value) if value.startswith(("cuda", "cpu")) else None
        return isinstance(value, torch.device) and value.type == "cuda"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = self.dispatch(func, args, kwargs)
        if not self.float64 and any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 and self.is_gpu(t)
                                    for t in tensors_in(result)):
            raise TypeError("Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't support "
                            "float64. Please use float32 instead.")
        return result

    def dispatch(self, func, args, kwargs):
        kwargs = dict(kwargs or {})
        owner, name = getattr(func, "__self__", None), getattr(func, "__name__", "")
        if owner is torch.Tensor.device and name == "__get__":
            return self.device if self.is_gpu(args[0]) else CPU
        if owner is torch.Tensor.is_cuda and name == "__get__":
            return self.is_gpu(args[0])
        if owner is torch.Tensor.data and name == "__set__":            # nn.Module.to: param.data = moved
            func(*args, **kwargs)
            self.mark(args[0], self.is_gpu(args[1]))
            return None
        if name in BOOKKEEPING:
            return func(*args, **kwargs)
        if func is torch.Tensor.numpy and self.is_gpu(args[0]):
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the "
                            "tensor to host memory first.")
        if func is torch.Tensor.cpu:
            return args[0].clone() if self.is_gpu(args[0]) else args[0]
        if func is torch.Tensor.cuda:
            return args[0] if self.is_gpu(args[0]) else self.gpu_copy(args[0])
        # device arguments: cuda -> run on the CPU and mark the result; cpu from a gpu tensor -> copy
        wants_gpu = False
        if any(isinstance(v, (str, torch.device)) for v in (*args, *kwargs.values())):
            wants_gpu = any(self._wants_gpu(v) for v in (*args, *kwargs.values()))
            as_device = lambda a: torch.device(a) if isinstance(a, str) and a.startswith(("cpu", "cuda")) else a
            args = tuple(CPU if self._wants_gpu(a) else as_device(a) for a in args)
            kwargs = {k: CPU if self._wants_gpu(v) else as_device(v) for k, v in kwargs.items()}
        if func is torch.Tensor.to:                                      # device, dtype, or another tensor
            source, rest = args[0], list(args[1:]) + list(kwargs.values())
            like = [a for a in rest if isinstance(a, torch.Tensor)]
            if like:
                to_gpu, moved = self.is_gpu(like[0]), func(source, like[0].dtype)
            else:
                to_cpu = any(isinstance(a, torch.device) and a.type == "cpu" for a in rest) and not wants_gpu
                to_gpu, moved = wants_gpu or (self.is_gpu(source) and not to_cpu), func(*args, **kwargs)
            if to_gpu:
                return moved if moved is source and self.is_gpu(source) else self.gpu_copy(moved, moved is source)
            return moved.clone() if moved is source and self.is_gpu(source) else moved
        if func is torch.Tensor.__deepcopy__ or func is torch.Tensor.copy_:  # memo; copies cross devices
            checked = ()
        elif func in INDEXING:
            checked = args[2:3]                                          # CPU index tensors are allowed
        else:
            checked = args + tuple(kwargs.values())
        tensors = tensors_in(checked)
        if func in INDEXING or func in (torch.Tensor.__deepcopy__, torch.Tensor.copy_):
            tensors.append(args[0])
        gpu = [t for t in tensors if self.is_gpu(t)]
        cpu = [t for t in tensors if not self.is_gpu(t) and t.dim() > 0]
        if gpu and cpu:
            raise DeviceMismatch(f"{name or func}: expected all tensors to be on the same device, but found at "
                                 f"least two devices, cuda:0 and cpu!")
        result = func(*args, **kwargs)
        if gpu or wants_gpu:
            for t in tensors_in(result):
                self.mark(t)
        return result
