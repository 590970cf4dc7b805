"""One short check of everything `distill` runs per worker, on one GPU (or the CPU), without Ray.

For a GPU machine that has torch and torchvision but no Ray and no network (the pipeline's launchers
are Ray; what runs inside each worker is plain torch, and that is what this checks):

  models        every architecture builds, runs forward/backward on the device (channels_last for
                conv nets on CUDA), and `replace_head` keeps it on the device
  train core    steps/s of `pipeline.training.train_step` with bf16 autocast on and off (same model,
                same batches; uint8 inputs converted on the device)
  resume        TrainState save -> a fresh process-like rebuild -> load, on the device: every
                optimizer-state tensor on its parameter's device, and a step after resume works
  augment       decode + random-resized crop + flip of JPEGs (`pipeline.transforms`), reproducible
                per (seed, key, epoch), different across epochs, off for evaluation
  kd loss       `pipeline.losses.kd_loss` value and gradient on the device, against float64 on CPU
  combine       `specialists.combine.combine` on the device against the CPU answer, and its time
                against one log_softmax pass over the same batch

Prints one JSON object (also to --out); exit 1 if any check fails. Typical: under 3 minutes.

    python scripts/gpu_check.py [--device cuda] [--out gpu_check.json] [--quick]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def check_models(device, quick):
    from pipeline import models, training

    specs = [({"arch": "mlp", "hidden": [64]}, (1, 28, 28)), ({"arch": "cnn", "channels": [16, 32]}, (1, 28, 28)),
             ({"arch": "resnet", "depth": 8}, (3, 32, 32)), ({"arch": "wrn", "depth": 10, "widen_factor": 1}, (3, 32, 32)),
             ({"arch": "resnet18"}, (3, 64, 64)), ({"arch": "vit", "num_layers": 2, "hidden_dim": 64, "num_heads": 2,
                                                    "mlp_dim": 128, "patch_size": 16}, (3, 64, 64))]
    if not quick:
        specs.append(({"arch": "resnet50"}, (3, 64, 64)))
    out = {}
    for spec, shape in specs:
        m = training.setup_device(models.build_model(spec, shape, 10), device)
        x = torch.randint(0, 256, (4, *shape), dtype=torch.uint8, device=device)
        z = m(models.prepare_inputs(x))
        z.sum().backward()
        models.replace_head(m, 4)
        assert all(p.device.type == torch.device(device).type for p in m.parameters()), "replace_head left the device"
        out[spec["arch"]] = {"ok": True, "params": models.count_params(m), "out": list(z.shape)}
    return out


def _bench_core(device, precision, steps, spec, shape, bs):
    from pipeline import models, training

    torch.manual_seed(0)
    model = models.build_model(spec, shape, 10)
    tcfg = {"epochs": 1, "batch_size": bs, "lr": 1e-3, "optimizer": "adamw", "schedule": "cosine",
            "precision": precision}
    state = training.TrainState(model, tcfg, steps, 1, device)
    amp = training.autocast_dtype(precision, device)
    x = torch.randint(0, 256, (bs, *shape), dtype=torch.uint8, device=device)
    y = torch.randint(0, 10, (bs,), device=device)
    loss_fn = lambda out, b: torch.nn.functional.cross_entropy(out, b["y"])  # noqa: E731
    for _ in range(3):
        training.train_step(state.model, {"x": x, "y": y}, state, loss_fn, amp_dtype=amp)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = training.train_step(state.model, {"x": x, "y": y}, state, loss_fn, amp_dtype=amp)
    _sync(device)
    dt = time.perf_counter() - t0
    return {"steps_per_s": round(steps / dt, 2), "samples_per_s": round(steps * bs / dt, 1),
            "loss": float(loss), "autocast": str(amp)}


def check_core(device, quick):
    cuda = torch.device(device).type == "cuda"
    spec, shape, bs = ({"arch": "resnet18"}, (3, 128, 128), 128) if cuda else ({"arch": "cnn", "channels": [16, 32]}, (1, 28, 28), 64)
    steps = 10 if quick else 30
    fp32 = _bench_core(device, "fp32", steps, spec, shape, bs)
    bf16 = _bench_core(device, "bf16" if cuda else "fp32", steps, spec, shape, bs)
    return {"model": spec["arch"], "input": list(shape), "batch": bs, "fp32": fp32, "bf16": bf16,
            "bf16_speedup": round(bf16["samples_per_s"] / fp32["samples_per_s"], 2)}


def check_resume(device):
    from pipeline import models, training

    spec, shape = {"arch": "cnn", "channels": [8, 16]}, (1, 28, 28)
    tcfg = {"epochs": 2, "batch_size": 16, "lr": 1e-3, "optimizer": "adam", "schedule": "cosine"}
    torch.manual_seed(0)
    state = training.TrainState(models.build_model(spec, shape, 10), tcfg, 4, 2, device)
    x = torch.randint(0, 256, (16, *shape), dtype=torch.uint8, device=device)
    y = torch.randint(0, 10, (16,), device=device)
    loss_fn = lambda out, b: torch.nn.functional.cross_entropy(out, b["y"])  # noqa: E731
    for _ in range(2):
        training.train_step(state.model, {"x": x, "y": y}, state, loss_fn)
    state.meta.update(epoch=0, step=0)
    with tempfile.TemporaryDirectory() as d:
        state.save(d, spec, shape, 10)
        # "kill": a fresh model and state, as a restarted worker builds them
        fresh = training.TrainState(models.build_model(spec, shape, 10), tcfg, 4, 2, device)
        fresh.load(d)
    on_device = fresh.optimizer_devices_ok()
    n_state = sum(1 for st in fresh.optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor))
    training.train_step(fresh.model, {"x": x, "y": y}, fresh, loss_fn)  # crashed here before the fix
    return {"optimizer_state_tensors": n_state, "all_on_param_device": on_device,
            "param_device": str(next(fresh.model.parameters()).device), "step_after_resume": True,
            "ok": on_device and n_state > 0}


def check_augment():
    from PIL import Image

    from pipeline import transforms

    rng = np.random.default_rng(0)
    blobs = []
    for i in range(8):
        h, w = 32 + 2 * i, 48 - i
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
        blobs.append(buf.getvalue())
    manifest = {"encoding": "image", "input_shape": [3, 32, 32], "image_format": "jpeg"}
    cfg = {"size": [24, 24], "random_resized_crop": [0.5, 1.0], "hflip": True}
    batch = {"image": np.array(blobs, dtype=object), "key": np.array([f"k{i}" for i in range(8)]), "y": np.arange(8)}
    train = transforms.make_batch_transform(cfg, manifest, True, 0)
    ev = transforms.make_batch_transform(cfg, manifest, False, 0)
    a, b, c = train(dict(batch), 0)["x"], train(dict(batch), 0)["x"], train(dict(batch), 1)["x"]
    e1, e2 = ev(dict(batch), 0)["x"], ev(dict(batch), 5)["x"]
    return {"shape": list(a.shape), "reproducible": bool((a == b).all()), "differs_between_epochs": bool((a != c).any()),
            "eval_deterministic": bool((e1 == e2).all()),
            "ok": bool((a == b).all() and (a != c).any() and (e1 == e2).all() and a.shape[1:] == (3, 24, 24))}


def check_kd(device):
    from pipeline.losses import kd_loss

    torch.manual_seed(0)
    z = torch.randn(256, 100, dtype=torch.float64)
    t = torch.randn(256, 100, dtype=torch.float64)
    y = torch.randint(0, 100, (256,))
    zc = z.clone().requires_grad_()
    ref = kd_loss(zc, t, y, 4.0, 0.9)
    ref.backward()
    zd = z.float().to(device).requires_grad_()
    got = kd_loss(zd, t.half().to(device), y.to(device), 4.0, 0.9)
    got.backward()
    err = abs(float(got.detach()) - float(ref.detach()))
    gerr = float((zd.grad.double().cpu() - zc.grad).abs().max())
    return {"loss": float(got.detach()), "abs_err_vs_cpu_float64": err, "grad_max_err": gerr, "ok": err < 1e-2 and gerr < 1e-3}


def check_combine(device, quick):
    from specialists.combine import combine

    torch.manual_seed(0)
    C, M, S, B = (2000, 8, 100, 256) if quick else (15000, 61, 300, 512)
    perm = torch.randperm(C)
    subsets = [perm[m * S:(m + 1) * S].tolist() for m in range(M)]
    g = torch.randn(B, C) * 3
    spec = [torch.randn(B, S + 1) for _ in range(M)]
    cpu = combine(g, spec, subsets, top_n=1)
    gd, sd = g.to(device), [s.to(device) for s in spec]
    for _ in range(2):
        out = combine(gd, sd, subsets, top_n=1)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(5):
        out = combine(gd, sd, subsets, top_n=1)
    _sync(device)
    t_comb = (time.perf_counter() - t0) / 5
    t0 = time.perf_counter()
    for _ in range(5):
        torch.log_softmax(gd, 1).exp()
    _sync(device)
    t_soft = (time.perf_counter() - t0) / 5
    err = float((out.double().cpu() - cpu.double()).abs().max())
    return {"C": C, "specialists": M, "batch": B, "max_abs_err_vs_cpu": err,
            "ratio_to_softmax_pass": round(t_comb / max(t_soft, 1e-9), 2), "ok": err < 1e-3}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="smaller sizes (the CPU test uses this)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    result = {"device": args.device, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    checks = {"models": lambda: check_models(args.device, args.quick), "core": lambda: check_core(args.device, args.quick),
              "resume": lambda: check_resume(args.device), "augment": check_augment,
              "kd_loss": lambda: check_kd(args.device), "combine": lambda: check_combine(args.device, args.quick)}
    failed = []
    for name, fn in checks.items():
        t0 = time.perf_counter()
        try:
            result[name] = fn()
            if isinstance(result[name], dict) and result[name].get("ok") is False:
                failed.append(name)
        except Exception as e:  # report every check, then fail
            result[name] = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
            failed.append(name)
        result.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 2)
    result["failed"] = failed
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
