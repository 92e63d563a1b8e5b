"""The torch side of SVF: the `SVFLinear` layer and the SVD factor cache.

Imported lazily by `raylib.methods.svf` (method modules must stay cheap to import).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger("raylib.svf")

FORWARD_MODES = ("auto", "rebuild", "factored")


def is_conv1d(module) -> bool:
    """transformers' Conv1D (GPT-2 family): a Linear whose weight is stored transposed, (in, out)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def linear_shape(module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear, a Conv1D or an SVFLinear."""
    if is_conv1d(module):
        return module.nf, module.nx
    return module.out_features, module.in_features


def linear_weight(module) -> torch.Tensor:
    """The weight as a Linear holds it, (out, in): y = x·Wᵀ + b (a Conv1D's weight transposed)."""
    return module.weight.t() if is_conv1d(module) else module.weight


class SVFLinear(nn.Module):
    """A Linear layer stored as W = U·diag(σ)·Vᵀ with one trainable scale vector z.

    A GPT-2 Conv1D is adapted the same way: its (in, out) weight is the transposed W, so it is
    decomposed as W and runs as a Linear; `conv1d=True` only makes `to_linear` give back a
    Conv1D, so a merged model keeps the layer type (and weight layout) its config loads.

    y = x·(U·diag(σ⊙z)·Vᵀ)ᵀ + b. The factors are plain tensor attributes (moved by
    `.to()` through `_apply`), not parameters or buffers: they are frozen, are not part of
    `state_dict()` (the expert is only z) and DDP does not broadcast them every step.

    `mode`: "rebuild" forms W' = (U·(σ⊙z))·Vᵀ once per forward call and runs one dense
    matmul; "factored" computes U·((σ⊙z)⊙(Vᵀx)) without forming W'. Without autograd
    (inference) "rebuild" keeps W' cached until z changes, so an adapted model runs at plain
    Linear speed; `set_z` invalidates the cache.
    """

    def __init__(self, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, bias: torch.Tensor | None,
                 mode: str = "rebuild", init_mean: float = 1.0, init_std: float = 0.0, conv1d: bool = False):
        super().__init__()
        self.U, self.S, self.Vh = U, S, Vh
        self.conv1d = conv1d
        self.out_features, self.in_features = U.shape[0], Vh.shape[1]
        z = torch.full_like(S, float(init_mean))
        if init_std > 0:
            z = z + init_std * torch.randn_like(S)
        self.z = nn.Parameter(z)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.mode = mode
        self._cache: tuple | None = None  # (dtype, z values, W')

    @property
    def rank(self) -> int:
        return self.S.numel()

    def _apply(self, fn, recurse=True):  # .to()/.cuda()/.half() also move the factors
        super()._apply(fn, recurse)
        self.U, self.S, self.Vh = fn(self.U), fn(self.S), fn(self.Vh)
        self._cache = None
        return self

    def scaled_u(self, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """U·diag(σ⊙z) in `dtype`, each element formed in σ⊙z's precision (fp32) and rounded
        once. Rounding σ⊙z itself to bf16 would lose every change of z below 2^-8 relative
        (measured: 10 steps at lr 1e-4 left the eval loss bit-identical); rounded per element,
        small changes of z still move W' (a fraction of its elements by one ulp each)."""
        return (self.U * (self.S * z)).to(dtype)

    def weight_from_z(self, z: torch.Tensor | None = None) -> torch.Tensor:
        z = self.z if z is None else z
        return self.scaled_u(z, self.U.dtype) @ self.Vh

    @property
    def weight(self) -> torch.Tensor:  # for code that reads `.weight` (dtype/device checks, merge)
        return self.weight_from_z().detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "factored":  # the scaling in fp32 per element too (see scaled_u)
            h = (F.linear(x, self.Vh.to(x.dtype)) * (self.S * self.z)).to(x.dtype)
            return F.linear(h, self.U.to(x.dtype), self.bias)
        if torch.is_grad_enabled() and self.z.requires_grad:
            w = self.scaled_u(self.z, x.dtype) @ self.Vh.to(x.dtype)
            return F.linear(x, w, self.bias)
        # cache valid while z holds the same values (compared by value, O(rank): DeepSpeed ZeRO-2
        # writes updated weights through `.data` of its flat buffers, which changes neither z's
        # version counter nor its data pointer)
        z = self.z.detach()
        if self._cache is None or self._cache[0] != x.dtype or not torch.equal(self._cache[1], z):
            with torch.no_grad():
                self._cache = (x.dtype, z.clone(), self.scaled_u(z, x.dtype) @ self.Vh.to(x.dtype))
        return F.linear(x, self._cache[2], self.bias)

    def to_linear(self) -> nn.Module:
        """A plain nn.Linear holding the merged weight U·diag(σ⊙z)·Vᵀ (a Conv1D holding its
        transpose when the adapted layer was one)."""
        if self.conv1d:
            from transformers.pytorch_utils import Conv1D

            lin = Conv1D(self.out_features, self.in_features).to(device=self.U.device, dtype=self.U.dtype)
            merged = self.weight_from_z().t()
        else:
            lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                            device=self.U.device, dtype=self.U.dtype)
            merged = self.weight_from_z()
        with torch.no_grad():
            lin.weight.copy_(merged)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        lin.requires_grad_(False)
        return lin

    def extra_repr(self) -> str:
        conv = ", conv1d" if self.conv1d else ""
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, mode={self.mode}{conv}"


# --------------------------------------------------------------------------- forward choice


def flops(out_f: int, in_f: int, tokens: int, rank: int | None = None) -> dict[str, int]:
    """Forward multiply-adds of the two strategies for one call on `tokens` rows."""
    r = rank or min(out_f, in_f)
    return {"rebuild": out_f * r * in_f + tokens * out_f * in_f, "factored": tokens * r * (out_f + in_f)}


def choose_mode(out_f: int, in_f: int, tokens: int) -> str:
    """The cheaper strategy for a shape, by forward multiply-adds (validated by jobs/bench/svf.py).

    Rebuilding costs r·m·n once plus a dense T·m·n matmul; factored costs T·r·(m+n). With
    r = min(m, n) the factored path wins only while T < r·m·n / (r·(m+n) − m·n), i.e. for
    few tokens per call (single-request decoding); training batches rebuild.
    """
    f = flops(out_f, in_f, tokens)
    return "factored" if f["factored"] < f["rebuild"] else "rebuild"


# --------------------------------------------------------------------------- SVD + cache


def model_identity(model, model_path: str | None) -> dict:
    """What identifies the base weights: config + weight-file fingerprints (local dir), else
    a content hash of the model's weights."""
    ident: dict = {"config": model.config.to_json_string(use_diff=False) if hasattr(model, "config") else ""}
    files = []
    if model_path and os.path.isdir(model_path):
        for name in sorted(os.listdir(model_path)):
            if name.endswith((".safetensors", ".bin", ".pt")):
                files.append(_file_fingerprint(os.path.join(model_path, name)))
    if files:
        ident["files"] = files
    else:
        h = hashlib.sha256()
        for name, p in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
        ident["content"] = h.hexdigest()
    return ident


def _file_fingerprint(path: str, chunk: int = 1 << 20) -> list:
    """name, size and a hash of the first and last MiB: stable across copies, cheap for 16 GB."""
    size = os.path.getsize(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(chunk))
        if size > 2 * chunk:
            f.seek(size - chunk)
            h.update(f.read(chunk))
        elif size > chunk:
            h.update(f.read())
    return [os.path.basename(path), size, h.hexdigest()]


def cache_root(cache_dir: str | None = None) -> str:
    return cache_dir or os.environ.get("RAYLIB_SVF_CACHE") or os.path.expanduser("~/.cache/raylib/svf")


def decompose(linears: dict[str, nn.Module], identity: dict, cache_dir: str | None = None) -> dict[str, tuple]:
    """SVD factors {name: (U, S, Vh)} for `linears`, from the disk cache when present.

    The cache key hashes the base model's identity and the targeted module names. A file
    lock makes concurrent workers/replicas on a shared filesystem compute it once: the
    first to take the lock decomposes and writes, the others wait and load the file.
    """
    from filelock import FileLock
    from safetensors.torch import load_file, save_file

    key_src = json.dumps({"identity": identity, "modules": sorted(linears), "version": 1}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:24]
    root = cache_root(cache_dir)
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, f"{key}.safetensors")
    with FileLock(path + ".lock"):
        if os.path.isfile(path):
            flat = load_file(path)
            log.info("svf: loaded SVD factors of %d matrices from %s", len(linears), path)
        else:
            flat = {}
            for name, lin in linears.items():
                w = linear_weight(lin).detach().to(torch.float32)
                U, S, Vh = torch.linalg.svd(w, full_matrices=False)
                flat[f"{name}.U"], flat[f"{name}.S"], flat[f"{name}.Vh"] = U.contiguous(), S.contiguous(), Vh.contiguous()
            tmp = path + ".tmp"
            save_file({k: v.cpu() for k, v in flat.items()}, tmp, metadata={"key": key_src[:60000]})
            os.replace(tmp, path)
            log.info("svf: decomposed %d matrices, cached at %s", len(linears), path)
    return {n: (flat[f"{n}.U"], flat[f"{n}.S"], flat[f"{n}.Vh"]) for n in linears}
