"""A virtual accelerator on the CPU: where would this code mix host and device memory, or wait for the device?

Code meant for a GPU can be read for device mistakes on a machine without one. DeviceAudit is a
TorchFunctionMode that sees every torch call and keeps one bit per tensor, "on the accelerator" or "host":

  * accelerator: the model's parameters and buffers, anything created with an explicit device= or moved with
    .to(device) / .cuda(), and anything computed from an accelerator tensor;
  * host: every other tensor (torch.tensor(list), torch.zeros(n), torch.from_numpy, ...), and .cpu() results.

It records, by call site (the innermost frame of this repository):
  * mixing: an op whose inputs hold both an accelerator tensor and a host tensor of at least one dimension
    (a 0-dim host tensor is allowed: CUDA accepts CPU scalars). Explicit copies (.to, .copy_) are not mixing;
  * generators: a torch.Generator handed to an op on an accelerator tensor (a CPU generator cannot draw on
    CUDA tensors);
  * syncs: calls that make the host wait for the device: .item(), .tolist(), bool(), int(), float(),
    nonzero, .numpy(), .cpu(), and ops whose output size depends on the data (masked_select, unique, ...).
"""
import sys
from collections import Counter, defaultdict
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

REPO = Path(__file__).resolve().parent.parent
SYNCS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "__format__", "__array__", "nonzero",
         "argwhere", "numpy", "cpu", "masked_select", "unique", "unique_consecutive", "repeat_interleave"}
COPIES = {"to", "copy_", "cuda", "cpu", "numpy", "__get__", "__set__"}  # explicit transfers, attribute access


def call_site() -> str:
    """file:line (function) of the innermost frame in this repository, outside this file."""
    frame = sys._getframe(2)
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if path != Path(__file__) and REPO in path.parents and "site-packages" not in path.parts:
            return f"{path.relative_to(REPO)}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return "outside the repository"


class DeviceAudit(TorchFunctionMode):
    """with DeviceAudit(model) as audit: ...; then audit.mixing, audit.generators (site -> op names) and
    audit.syncs (site -> count)."""

    def __init__(self, *modules: torch.nn.Module):
        super().__init__()
        self.on_device = WeakIdKeyDictionary()
        for m in modules:
            for t in (*m.parameters(), *m.buffers()):
                self.on_device[t] = True
        self.mixing, self.generators = defaultdict(set), defaultdict(set)
        self.syncs = Counter()

    def __enter__(self):
        # The model's CPU-only shortcuts look at values (layers.host_checks_are_free): on this virtual
        # accelerator they must take the general path, as on a real one.
        import layers
        self._host_checks = layers.host_checks_are_free
        layers.host_checks_are_free = lambda t: False
        return super().__enter__()

    def __exit__(self, *exc):
        import layers
        layers.host_checks_are_free = self._host_checks
        return super().__exit__(*exc)

    def mark(self, tensor: torch.Tensor):
        """Treat tensor as accelerator memory (e.g. a batch a caller moved with .to(device))."""
        self.on_device[tensor] = True

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        device_in = [t for t in tensors if t in self.on_device]
        if device_in:
            if name not in COPIES and any(t not in self.on_device and t.dim() > 0 for t in tensors):
                self.mixing[call_site()].add(name)
            if any(isinstance(g, torch.Generator) for g in flat):
                self.generators[call_site()].add(name)
            if name in SYNCS and not (name == "repeat_interleave" and not isinstance(
                    args[1] if len(args) > 1 else kwargs.get("repeats"), torch.Tensor)):  # int repeats: no sync
                self.syncs[call_site()] += 1
        out = func(*args, **kwargs)
        if name in ("cpu", "numpy", "tolist", "item"):  # host from here on
            return out.view_as(out) if name == "cpu" and out is args[0] else out  # on the CPU, .cpu() is x itself

        moved = kwargs.get("device") is not None or (name in ("to", "cuda") and any(
            isinstance(a, (str, torch.device)) for a in (*args[1:], *kwargs.values())))
        if name == "to" and len(args) > 1 and isinstance(args[1], torch.Tensor):  # .to(other): follows other
            moved = args[1] in self.on_device
        if moved or device_in:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.on_device[t] = True
        return out

    def report(self) -> str:
        lines = [f"mixes host and device memory at {site}: {', '.join(sorted(ops))}" for site, ops in self.mixing.items()]
        lines += [f"a host generator on device tensors at {site}: {', '.join(sorted(ops))}"
                  for site, ops in self.generators.items()]
        return "\n".join(lines)

    def sync_count(self) -> int:
        return sum(self.syncs.values())
