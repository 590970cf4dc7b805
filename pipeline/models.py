"""The networks every stage trains, and the checkpoint files that hand them from stage to stage.

Teacher (generalist), specialists and student are all built here from a small spec dict (the YAML
`model:` section), so a checkpoint only needs that spec plus the weights to be rebuilt anywhere.
Families: the paper's `mlp`, a small `cnn`, the CIFAR `resnet` (6n+2) and `wrn`, and torchvision's
ImageNet nets `resnet18`, `resnet50` and a small `vit` (VisionTransformer), which can start from a
local state-dict file (`weights: PATH`; nothing is ever downloaded).
Every model is `body` (inputs -> features) followed by one `nn.Linear` called `head`: the
specialists of Hinton et al. (2015, section 5.2) are the generalist with the head swapped for one
over "my classes + dustbin" (`replace_head`).

Plain torch, no Ray: the Ray Train / Tune launchers in `pipeline/` wrap these models, they never
change them. Inputs go through `prepare_inputs` (uint8 -> centred float) in training and inference
alike, so no stage can feed a model differently scaled data.

Checkpoint layout (one directory, local path or s3:// URI):
    model.pt    torch state_dict (tensors only; loaded with `weights_only=True`, never pickle)
    model.json  spec, input_shape, num_classes, num_outputs, params, extra, sha256 of model.pt
`model.json` is written last, so its presence means the checkpoint is complete.
"""
from __future__ import annotations

import io
import math
import pickle
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline import storage
from pipeline.errors import UserError

ARCHS = ("mlp", "cnn", "resnet", "wrn", "resnet18", "resnet50", "vit")
TORCHVISION_ARCHS = ("resnet18", "resnet50", "vit")
CHECKPOINT_FORMAT = 1
WEIGHTS_FILE = "model.pt"
META_FILE = "model.json"

# Defaults per architecture; `resolve_spec` fills these in so model.json records the full model.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": {"hidden": [256, 256], "dropout": 0.0, "input_dropout": 0.0},
    "cnn": {"channels": [32, 64], "hidden": [128], "dropout": 0.0},
    "resnet": {"depth": 20, "width": 16},
    "wrn": {"depth": 16, "widen_factor": 4, "dropout": 0.0},
    # torchvision's ResNets; stem "cifar" swaps the 7x7/2 conv + max-pool for one 3x3/1 conv
    # (for 32-64 px inputs), "imagenet" keeps them (224 px).
    "resnet18": {"stem": "imagenet", "weights": None},
    "resnet50": {"stem": "imagenet", "weights": None},
    # ViT-S/16 dimensions (22 M parameters at 224 px); input must be square, a multiple of patch_size.
    "vit": {"patch_size": 16, "num_layers": 12, "num_heads": 6, "hidden_dim": 384, "mlp_dim": 1536,
            "dropout": 0.0, "weights": None},
}
_ALL_KEYS = {"arch"} | {k for d in _DEFAULTS.values() for k in d}


# --------------------------------------------------------------------------------------------------
# Spec handling


def resolve_spec(spec: Optional[dict]) -> dict[str, Any]:
    """Validate a model spec and return it with defaults filled in (only the keys its arch uses).

    Keys that belong to another architecture (the config schema shares one section for all of them)
    are dropped; keys no architecture knows raise `UserError`.
    """
    spec = dict(spec or {})
    unknown = sorted(set(spec) - _ALL_KEYS)
    if unknown:
        raise UserError(
            f"model.{unknown[0]}: not a model option; valid options are {', '.join(sorted(_ALL_KEYS))}"
        )
    arch = spec.get("arch", "mlp")
    if arch not in _DEFAULTS:
        raise UserError(f"model.arch: {arch!r} is not a known architecture; choose one of {', '.join(ARCHS)}")
    out: dict[str, Any] = {"arch": arch}
    for key, default in _DEFAULTS[arch].items():
        value = spec.get(key)
        if value is None:
            value = list(default) if isinstance(default, list) else default
        out[key] = value

    for key in ("hidden", "channels"):
        if key in out:
            v = out[key]
            if not isinstance(v, (list, tuple)) or not all(_is_int(h) and h > 0 for h in v):
                raise UserError(f"model.{key}: {v!r} must be a list of positive integers, e.g. [256, 256]")
            out[key] = [int(h) for h in v]
    if arch == "cnn" and not out["channels"]:
        raise UserError("model.channels: a cnn needs at least one conv layer, e.g. [32, 64]")
    for key in ("dropout", "input_dropout"):
        if key in out and not (isinstance(out[key], (int, float)) and 0.0 <= out[key] < 1.0):
            raise UserError(f"model.{key}: {out[key]!r} must be a number in [0, 1)")
    for key in ("width", "widen_factor"):
        if key in out and not (_is_int(out[key]) and out[key] > 0):
            raise UserError(f"model.{key}: {out[key]!r} must be a positive integer")
    if arch == "resnet":
        d = out["depth"]
        if not (_is_int(d) and d >= 8 and (d - 2) % 6 == 0):
            raise UserError(
                f"model.depth: {d!r} is not valid for resnet; use 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110)"
            )
    if arch == "wrn":
        d = out["depth"]
        if not (_is_int(d) and d >= 10 and (d - 4) % 6 == 0):
            raise UserError(f"model.depth: {d!r} is not valid for wrn; use 6n+4 with n >= 1 (10, 16, 22, 28, 40)")
    if "stem" in out and out["stem"] not in ("imagenet", "cifar"):
        raise UserError(f"model.stem: {out['stem']!r} must be 'imagenet' (7x7/2 conv + max-pool, 224 px) or "
                        "'cifar' (one 3x3/1 conv, 32-64 px)")
    for key in ("patch_size", "num_layers", "num_heads", "hidden_dim", "mlp_dim"):
        if key in out and not (_is_int(out[key]) and out[key] > 0):
            raise UserError(f"model.{key}: {out[key]!r} must be a positive integer")
    if arch == "vit" and out["hidden_dim"] % out["num_heads"]:
        raise UserError(f"model.hidden_dim: {out['hidden_dim']} must be a multiple of model.num_heads "
                        f"({out['num_heads']})")
    if "weights" in out and out["weights"] is not None and not (isinstance(out["weights"], str) and out["weights"]):
        raise UserError(f"model.weights: {out['weights']!r} must be the path of a state-dict file")
    return out


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


# --------------------------------------------------------------------------------------------------
# Architectures


class Classifier(nn.Module):
    """`body` maps inputs to a (B, F) feature matrix; `head` (nn.Linear F -> C) maps it to logits."""

    def __init__(self, body: nn.Module, head: nn.Linear):
        super().__init__()
        self.body = body
        self.head = head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, *input_shape) float -> (B, F) penultimate features."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, *input_shape) float -> (B, num_outputs) logits."""
        return self.head(self.body(x))


def _mlp(spec: dict, input_shape: tuple[int, ...], num_classes: int) -> Classifier:
    # The paper's MNIST nets: 784-1200-1200-10 (teacher, dropout) and 784-800-800-10 (student).
    layers: list[nn.Module] = [nn.Flatten()]
    if spec["input_dropout"] > 0:
        layers.append(nn.Dropout(spec["input_dropout"]))
    width = int(math.prod(input_shape))
    for h in spec["hidden"]:
        layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
        if spec["dropout"] > 0:
            layers.append(nn.Dropout(spec["dropout"]))
        width = h
    return Classifier(nn.Sequential(*layers), nn.Linear(width, num_classes))


def _cnn(spec: dict, input_shape: tuple[int, ...], num_classes: int) -> Classifier:
    c, h, w = input_shape
    layers: list[nn.Module] = []
    for out_c in spec["channels"]:
        layers += [nn.Conv2d(c, out_c, 3, padding=1, bias=False), nn.BatchNorm2d(out_c), nn.ReLU(inplace=True)]
        # Small inputs (8x8 digits) cannot be halved forever; stop pooling at 1 pixel.
        if h >= 2 and w >= 2:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        c = out_c
    layers.append(nn.Flatten())
    width = c * h * w
    for hid in spec["hidden"]:
        layers += [nn.Linear(width, hid), nn.ReLU(inplace=True)]
        if spec["dropout"] > 0:
            layers.append(nn.Dropout(spec["dropout"]))
        width = hid
    return Classifier(nn.Sequential(*layers), nn.Linear(width, num_classes))


class _BasicBlock(nn.Module):
    """Post-activation residual block of the CIFAR ResNets (He et al. 2016), 1x1-conv shortcut."""

    def __init__(self, in_c: int, out_c: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_c, out_c, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_c)
        self.conv2 = nn.Conv2d(out_c, out_c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_c)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_c != out_c:
            self.shortcut = nn.Sequential(nn.Conv2d(in_c, out_c, 1, stride, bias=False), nn.BatchNorm2d(out_c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


def _resnet(spec: dict, input_shape: tuple[int, ...], num_classes: int) -> Classifier:
    n = (spec["depth"] - 2) // 6
    w = spec["width"]
    layers: list[nn.Module] = [
        nn.Conv2d(input_shape[0], w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)
    ]
    in_c = w
    for stage, out_c in enumerate((w, 2 * w, 4 * w)):
        for i in range(n):
            layers.append(_BasicBlock(in_c, out_c, 2 if (stage > 0 and i == 0) else 1))
            in_c = out_c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return Classifier(nn.Sequential(*layers), nn.Linear(in_c, num_classes))


class _WideBlock(nn.Module):
    """Pre-activation wide residual block (Zagoruyko & Komodakis 2016) with dropout between convs."""

    def __init__(self, in_c: int, out_c: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_c)
        self.conv1 = nn.Conv2d(in_c, out_c, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_c)
        self.conv2 = nn.Conv2d(out_c, out_c, 3, 1, 1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut: Optional[nn.Module] = None
        if stride != 1 or in_c != out_c:
            self.shortcut = nn.Conv2d(in_c, out_c, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        # The projection shortcut sees the pre-activated input, as in the reference WRN code.
        skip = x if self.shortcut is None else self.shortcut(o)
        o = self.conv1(o)
        o = self.conv2(self.dropout(F.relu(self.bn2(o))))
        return o + skip


def _wrn(spec: dict, input_shape: tuple[int, ...], num_classes: int) -> Classifier:
    n = (spec["depth"] - 4) // 6
    k = spec["widen_factor"]
    widths = (16 * k, 32 * k, 64 * k)
    layers: list[nn.Module] = [nn.Conv2d(input_shape[0], 16, 3, 1, 1, bias=False)]
    in_c = 16
    for stage, out_c in enumerate(widths):
        for i in range(n):
            layers.append(_WideBlock(in_c, out_c, 2 if (stage > 0 and i == 0) else 1, spec["dropout"]))
            in_c = out_c
    layers += [nn.BatchNorm2d(in_c), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return Classifier(nn.Sequential(*layers), nn.Linear(in_c, num_classes))


def _torchvision_resnet(spec: dict, input_shape: tuple[int, ...], num_classes: int) -> Classifier:
    from torchvision.models import resnet18, resnet50

    net = {"resnet18": resnet18, "resnet50": resnet50}[spec["arch"]](weights=None)
    c = input_shape[0]
    if spec["stem"] == "cifar":
        net.conv1 = nn.Conv2d(c, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    elif c != 3:
        net.conv1 = nn.Conv2d(c, 64, 7, 2, 3, bias=False)
    width = net.fc.in_features
    net.fc = nn.Identity()
    return Classifier(net, nn.Linear(width, num_classes))


def _vit(spec: dict, input_shape: tuple[int, ...], num_classes: int) -> Classifier:
    from torchvision.models import VisionTransformer

    c, h, w = input_shape
    p = spec["patch_size"]
    if h != w or h % p:
        raise UserError(f"model.arch 'vit' needs square inputs whose side is a multiple of model.patch_size ({p}); "
                        f"the data are {h}x{w}: set the stage's augment.size (e.g. [{max(p, h - h % p)}]) or patch_size")
    net = VisionTransformer(image_size=h, patch_size=p, num_layers=spec["num_layers"], num_heads=spec["num_heads"],
                            hidden_dim=spec["hidden_dim"], mlp_dim=spec["mlp_dim"], dropout=spec["dropout"],
                            num_classes=num_classes)
    if c != 3:
        net.conv_proj = nn.Conv2d(c, spec["hidden_dim"], p, p)
        nn.init.trunc_normal_(net.conv_proj.weight, std=math.sqrt(1 / (c * p * p)))
        nn.init.zeros_(net.conv_proj.bias)
    net.heads = nn.Identity()  # forward() then returns the class token's features
    return Classifier(net, nn.Linear(spec["hidden_dim"], num_classes))


_BUILDERS = {"mlp": _mlp, "cnn": _cnn, "resnet": _resnet, "wrn": _wrn,
             "resnet18": _torchvision_resnet, "resnet50": _torchvision_resnet, "vit": _vit}
# Where each torchvision family keeps its classifier in torchvision's own state dicts.
_TV_HEAD = {"resnet18": "fc", "resnet50": "fc", "vit": "heads.head"}
_TV_STEM = {"resnet18": "conv1.weight", "resnet50": "conv1.weight", "vit": "conv_proj.weight"}


def load_pretrained(model: Classifier, spec: dict, num_classes: int) -> None:
    """Start `model` from the local state-dict file `spec["weights"]` (in place; no download).

    Accepted: torchvision's own files for the architecture (e.g. resnet18's `resnet18-*.pth`; its
    classifier is used only when it has `num_classes` outputs), or a `model.pt` of this project
    (keys `body.*`, `head.*`), optionally wrapped as {"state_dict": ...} or {"model": ...}. A
    3-channel stem is summed over its input channels for greyscale data. Loaded with
    `weights_only=True`; any other mismatch is a UserError naming the file and the keys.
    """
    path = spec["weights"]
    where = f"model.weights {path}"
    try:
        data = storage.read_bytes(path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise UserError(f"{where}: file not found; give the path of a local state-dict file (.pt/.pth) "
                        "for this architecture (nothing is downloaded), or remove model.weights") from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise UserError(f"{where}: not a plain tensor state dict, refusing to load it ({e})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and set(state) == {wrapper} and isinstance(state[wrapper], dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{where}: not a state dict (a mapping of parameter names to tensors)")
    arch = spec["arch"]
    if any(k.startswith("body.") for k in state):
        body = {k[5:]: v for k, v in state.items() if k.startswith("body.")}
        head = {k[5:]: v for k, v in state.items() if k.startswith("head.")}
    else:
        prefix = _TV_HEAD.get(arch, "head") + "."
        body = {k: v for k, v in state.items() if not k.startswith(prefix)}
        head = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    stem = _TV_STEM.get(arch)
    target = model.body.state_dict()
    if stem and stem in body and stem in target and body[stem].shape != target[stem].shape:
        w = body[stem]
        if w.dim() == 4 and w.shape[1] == 3 and target[stem].shape[1] == 1 and w.shape[2:] == target[stem].shape[2:]:
            body[stem] = w.sum(dim=1, keepdim=True)
    missing = sorted(set(target) - set(body))
    unexpected = sorted(set(body) - set(target))
    wrong = sorted(k for k in set(body) & set(target) if body[k].shape != target[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} of another shape (e.g. {k}: file {tuple(body[k].shape)}, "
                         f"model {tuple(target[k].shape)})")
        raise UserError(f"{where}: does not fit model.arch {arch!r} with this spec and input: "
                        f"{'; '.join(parts)} parameter(s). Use a checkpoint of the same architecture and "
                        "settings (stem, patch_size, widths), or remove model.weights")
    model.body.load_state_dict(body)
    if head and head.get("weight") is not None and tuple(head["weight"].shape) == tuple(model.head.weight.shape):
        model.head.load_state_dict(head)


def build_model(spec: Optional[dict], input_shape: Sequence[int], num_classes: int) -> Classifier:
    """Build a freshly initialised model (no pretrained weights are ever downloaded).

    spec: the `model:` config section (see `resolve_spec` for keys and defaults); `weights: PATH`
        (resnet18/resnet50/vit) starts from a local state-dict file (`load_pretrained`).
    input_shape: per-sample shape, (C, H, W) for images or (D,) for vectors; mlp flattens anything,
        the others need (C, H, W) (for encoded images: `pipeline.transforms.output_shape`).
    Returns a `Classifier` mapping (B, *input_shape) float32 -> (B, num_classes) logits, with the
    final layer at `model.head`.
    """
    spec = resolve_spec(spec)
    input_shape = tuple(int(s) for s in input_shape)
    if not input_shape or any(s <= 0 for s in input_shape):
        raise UserError(f"dataset input_shape {input_shape} must be non-empty with positive sizes")
    if not (_is_int(num_classes) and num_classes >= 1):
        raise UserError(f"num_classes must be a positive integer, got {num_classes!r}")
    if spec["arch"] != "mlp" and len(input_shape) != 3:
        raise UserError(
            f"model.arch: {spec['arch']!r} needs image inputs of shape (C, H, W) but the data has shape "
            f"{input_shape}; use arch 'mlp' or store the inputs as (C, H, W)"
        )
    model = _BUILDERS[spec["arch"]](spec, input_shape, int(num_classes))
    if spec["arch"] not in ("vit",):  # torchvision's ViT keeps its own (truncated-normal) init
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    if spec.get("weights"):
        load_pretrained(model, spec, int(num_classes))
    return model


def count_params(model: nn.Module) -> int:
    """Number of trainable and frozen parameters (buffers such as BatchNorm statistics excluded)."""
    return sum(p.numel() for p in unwrap_model(model).parameters())


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model inside DistributedDataParallel (Ray's `prepare_model`) or `torch.compile`."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel) or type(model).__name__ == "DataParallel":
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


# --------------------------------------------------------------------------------------------------
# Inputs


def prepare_inputs(x) -> torch.Tensor:
    """Any batch as the models expect it: a float32 tensor, same shape.

    uint8 (raw pixels) -> x/255 centred as (x - 0.5) / 0.5, i.e. in [-1, 1]. Floats are taken as already
    prepared and only cast to float32. numpy arrays and torch tensors both work; a float32 tensor is
    returned as is (no copy), so calling this twice is harmless.
    """
    if isinstance(x, np.ndarray):
        if x.dtype == np.uint8:
            if not x.flags.writeable:  # torch.from_numpy warns on read-only (e.g. mmap) arrays
                return torch.from_numpy(x.astype(np.float32)).mul_(2.0 / 255.0).sub_(1.0)
            return torch.from_numpy(x).to(torch.float32).mul_(2.0 / 255.0).sub_(1.0)
        if not x.flags.writeable or x.dtype != np.float32:
            x = np.array(x, dtype=np.float32)
        return torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x))
    if x.dtype == torch.uint8:
        return x.to(torch.float32).mul_(2.0 / 255.0).sub_(1.0)
    return x if x.dtype == torch.float32 else x.to(torch.float32)


def jitter(x: torch.Tensor, pixels: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Translate each image of a batch by its own random (dy, dx), each in [-pixels, pixels].

    x: (B, C, H, W) or (B, H, W) prepared float images; other ranks (vectors) are returned unchanged.
    The border the shift exposes is filled by repeating the edge pixels (replicate padding): zero padding
    would paint a grey frame onto [-1, 1]-centred images whose background is -1.
    Vectorised: one pad and two gathers for the whole batch. `generator` (CPU) makes offsets reproducible.
    """
    if pixels <= 0 or x.dim() not in (3, 4):
        return x
    squeeze = x.dim() == 3
    if squeeze:
        x = x.unsqueeze(1)
    b, c, h, w = x.shape
    p = int(pixels)
    padded = F.pad(x, (p, p, p, p), mode="replicate")
    off = torch.randint(0, 2 * p + 1, (2, b), generator=generator).to(x.device)
    # Crop each padded image at its own offset: gather its H rows, then its W columns (2x faster on
    # CPU than one 4-D advanced index).
    rows = off[0][:, None] + torch.arange(h, device=x.device)  # (B, H) rows of the padded image
    cols = off[1][:, None] + torch.arange(w, device=x.device)  # (B, W)
    out = padded.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * p))
    out = out.gather(3, cols[:, None, None, :].expand(b, c, h, w))
    return out.squeeze(1) if squeeze else out


# --------------------------------------------------------------------------------------------------
# Weight constraint and heads


@torch.no_grad()
def apply_max_norm(model: nn.Module, max_norm: Optional[float], include_head: bool = False) -> None:
    """Rescale each hidden unit's incoming weight vector (a row of a Linear weight) to L2 norm <= max_norm.

    The constraint of Hinton et al.'s dropout nets (their MNIST teacher): call it after every
    optimizer step. The output layer is left free by default because its rows are class scores, not
    hidden units. Conv filters are not constrained (the conv nets use BatchNorm instead).
    """
    if not max_norm:
        return
    inner = unwrap_model(model)
    head = getattr(inner, "head", None)
    for m in inner.modules():
        if isinstance(m, nn.Linear) and (include_head or m is not head):
            m.weight.renorm_(2, 0, float(max_norm))


@torch.no_grad()
def replace_head(model: nn.Module, num_outputs: int, init_rows: Optional[torch.Tensor] = None) -> nn.Module:
    """Swap `model.head` for a Linear with `num_outputs` outputs (in place; the model is returned).

    Without `init_rows` the new head is freshly initialised. With `init_rows` (LongTensor of old class
    indices, the specialist's subset S), output j < len(S) starts as a copy of old row S[j], and, when
    num_outputs == len(S) + 1, the last output is the dustbin ("any class not in S"). The dustbin row
    starts as the mean of the old rows *not* in S, with log(C - |S|) added to its bias: its logit is then
    mean_{c not in S} z_c + log(C - |S|), which is the generalist's log-probability mass of "something
    else" (log sum exp z_c over c not in S) when those logits are equal and a lower bound on it otherwise
    (Jensen). The specialist therefore starts from the generalist's own view of its task (section 5.2:
    "initialized with the weights of the generalist") instead of from an arbitrary dustbin.
    """
    inner = unwrap_model(model)
    old: nn.Linear = inner.head
    new = nn.Linear(old.in_features, int(num_outputs), bias=old.bias is not None).to(
        device=old.weight.device, dtype=old.weight.dtype
    )
    if init_rows is not None:
        rows = torch.as_tensor(init_rows, dtype=torch.long).flatten().to(old.weight.device)
        k = rows.numel()
        if k == 0 or k > num_outputs or num_outputs > k + 1:
            raise ValueError(f"replace_head: {k} init_rows need num_outputs of {k} or {k + 1} (dustbin), got {num_outputs}")
        if rows.min() < 0 or rows.max() >= old.out_features or rows.unique().numel() != k:
            raise ValueError(f"replace_head: init_rows must be distinct class indices in [0, {old.out_features})")
        new.weight[:k] = old.weight[rows]
        if new.bias is not None:
            new.bias[:k] = old.bias[rows]
        if num_outputs == k + 1:
            others = torch.ones(old.out_features, dtype=torch.bool, device=rows.device)
            others[rows] = False
            n_other = int(others.sum())
            # With no class outside S the dustbin has nothing to stand for; keep its fresh init.
            if n_other > 0:
                new.weight[k] = old.weight[others].mean(0)
                if new.bias is not None:
                    new.bias[k] = old.bias[others].mean() + math.log(n_other)
    inner.head = new
    return model


# --------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(
    dir_uri: str,
    model: nn.Module,
    spec: Optional[dict],
    input_shape: Sequence[int],
    num_classes: int,
    extra: Optional[dict] = None,
    state: Optional[dict] = None,
) -> dict:
    """Write `model.pt` then `model.json` under `dir_uri` (local or s3://), each atomically.

    `num_classes` is the dataset's class count (what `build_model` is called with); the head's actual
    width is recorded as `num_outputs` so a specialist (|S| + 1 outputs) is rebuilt correctly.
    `extra` is free-form JSON (e.g. the specialist's class subset, metrics). `state`: weights to
    write instead of the model's own (a state_dict of the same architecture, e.g. an earlier
    epoch's). Returns the metadata.
    """
    inner = unwrap_model(model)
    src = inner.state_dict() if state is None else state
    state = {k: v.detach().cpu() for k, v in src.items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    meta = {
        "format": CHECKPOINT_FORMAT,
        "spec": resolve_spec(spec),
        "input_shape": [int(s) for s in input_shape],
        "num_classes": int(num_classes),
        "num_outputs": int(inner.head.out_features),
        "params": count_params(inner),
        "sha256": storage.sha256_bytes(data),
        "extra": extra or {},
    }
    storage.write_bytes_atomic(storage.join(dir_uri, WEIGHTS_FILE), data)
    storage.write_json_atomic(storage.join(dir_uri, META_FILE), meta)
    return meta


def read_checkpoint_meta(dir_uri: str) -> dict:
    """The `model.json` of a checkpoint directory; UserError if there is no complete checkpoint."""
    meta_uri = storage.join(dir_uri, META_FILE)
    if not storage.exists(meta_uri):
        raise UserError(f"{meta_uri}: no checkpoint here; run the stage that writes it first (or fix the path)")
    meta = storage.read_json(meta_uri)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{meta_uri}: checkpoint format {meta.get('format')!r} is not {CHECKPOINT_FORMAT}; re-run its stage")
    return meta


def load_checkpoint(dir_uri: str, map_location: Any = "cpu") -> tuple[Classifier, dict]:
    """Rebuild the model saved by `save_checkpoint`; returns (model in eval mode, metadata).

    The weights are checked against the recorded sha256 and unpickled with `weights_only=True`, so a
    damaged or tampered `model.pt` raises UserError instead of loading garbage or running code.
    """
    meta = read_checkpoint_meta(dir_uri)
    weights_uri = storage.join(dir_uri, WEIGHTS_FILE)
    try:
        data = storage.read_bytes(weights_uri)
    except FileNotFoundError:
        raise UserError(f"{weights_uri}: missing although {META_FILE} exists; re-run the stage that wrote it") from None
    if storage.sha256_bytes(data) != meta["sha256"]:
        raise UserError(f"{weights_uri}: sha256 does not match {META_FILE} (damaged file); re-run the stage that wrote it")
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as e:
        raise UserError(f"{weights_uri}: not a plain tensor state_dict, refusing to load it ({e})") from None
    # The starting weights a spec names are irrelevant here (and may not exist on this machine).
    model = build_model(dict(meta["spec"], weights=None), meta["input_shape"], meta["num_classes"])
    if meta["num_outputs"] != meta["num_classes"]:
        replace_head(model, meta["num_outputs"])
    model.load_state_dict(state)
    model.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu")
    model.eval()
    return model, meta


def checkpoint_fingerprint(dir_uri: str) -> str:
    """sha256 of the checkpoint's weights as recorded in model.json (cheap: reads only the JSON)."""
    return read_checkpoint_meta(dir_uri)["sha256"]
