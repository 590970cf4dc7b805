"""What the production KD loss costs per training step, as a ratio to a hard-label step.

For each student size (the quickstart's 128-unit MLP on 64 features and 12 classes, and the
Fashion-MNIST student, a 256-unit MLP on 28 x 28 images and 10 classes; model, batch size, lr, T and
alpha read from their configs), one in-memory PyTorch loop per arm, the same model initialisation
and the same minibatch order; a step is: gather the batch, forward, loss, zero_grad, backward, Adam
step:

  hard       F.cross_entropy on the labels: the reference;
  kd         `pipeline.losses.kd_loss` against the batch's float16 cached teacher logits (the
             targets at T prepared per batch, on the device), with labels;
  kd_chunk   production: the student's KD loss (`make_loss("cached")`) on minibatches of targets
             prepared once per streamed chunk (`prepare_chunk`, here once for the data);
  composite  the textbook composition autograd differentiates (log_softmax at T, kl_div,
             cross_entropy): what the loss cost before it was fused.

Arms are interleaved round by round (`--rounds`) and the median of the per-round ratios reported,
by this thread's CPU time (robust to other processes' load) and by wall time. Target: kd_chunk /
hard <= 1.05.

    .venv/bin/python bench/bench_kd_loss.py --out bench/results_kd_loss.json
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pipeline import models  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.losses import PREPARED, kd_loss, make_loss  # noqa: E402

from _common import emit  # noqa: E402  (bench/ is on sys.path when run as a script)

# config -> (input shape, number of classes) of its dataset
SIZES = {"quickstart": ((64,), 12), "fashion_mnist": ((1, 28, 28), 10)}


def composite(z, t, y, T, alpha):
    log_p = F.log_softmax(t.float() / T, -1)
    soft = F.kl_div(F.log_softmax(z / T, -1), log_p, reduction="batchmean", log_target=True)
    return alpha * T * T * soft + (1 - alpha) * F.cross_entropy(z, y)


def run_arm(arm: str, model_spec: dict, shape, classes: int, data: dict, bs: int, lr: float, T: float,
            alpha: float, steps: int) -> tuple[float, float]:
    torch.manual_seed(0)
    model = models.build_model(model_spec, shape, classes)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x, y, t = data["x"], data["y"], data["t"]
    loss_fn = make_loss("cached", T, alpha, classes)
    kd = loss_fn.prepare_chunk({"y": y, "teacher": t})[PREPARED] if arm == "kd_chunk" else None
    n = len(x)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    model.train()
    w0, c0 = time.perf_counter(), time.thread_time()
    for s in range(steps):
        i = perm[(s * bs) % (n - bs):(s * bs) % (n - bs) + bs]
        out = model(x[i])
        if arm == "hard":
            loss = F.cross_entropy(out, y[i])
        elif arm == "kd":
            loss = kd_loss(out, t[i], y[i], T, alpha)
        elif arm == "kd_chunk":
            loss = loss_fn(out, {PREPARED: kd[i]})
        else:
            loss = composite(out, t[i], y[i], T, alpha)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - w0, time.thread_time() - c0


def bench_config(name: str, rounds: int, steps: int) -> dict:
    cfg = load_config(os.path.join(ROOT, "configs", f"{name}.yaml"))
    shape, classes = SIZES[name]
    st = cfg.student
    spec = st.model.model_dump() if hasattr(st.model, "model_dump") else dict(st.model)
    spec = {k: v for k, v in spec.items() if v is not None}
    bs, lr, T, alpha = int(st.batch_size), float(st.lr), float(st.T), float(st.alpha)
    g = torch.Generator().manual_seed(0)
    n = max(8 * bs, 4096)
    data = {"x": torch.randn(n, *shape, generator=g), "y": torch.randint(0, classes, (n,), generator=g),
            "t": (torch.randn(n, classes, generator=g) * 3).half()}
    params = sum(p.numel() for p in models.build_model(spec, shape, classes).parameters())
    arms = ("hard", "kd", "kd_chunk", "composite")
    for arm in arms:  # warm-up
        run_arm(arm, spec, shape, classes, data, bs, lr, T, alpha, 20)
    wall = {a: [] for a in arms}
    cpu = {a: [] for a in arms}
    for _ in range(rounds):
        for arm in arms:
            w, c = run_arm(arm, spec, shape, classes, data, bs, lr, T, alpha, steps)
            wall[arm].append(w)
            cpu[arm].append(c)

    def ratio(d, a):
        return round(statistics.median([x / h for x, h in zip(d[a], d["hard"])]), 3)

    return {
        "model": {k: spec[k] for k in ("arch", "hidden") if k in spec}, "params": params, "batch_size": bs, "T": T, "alpha": alpha, "classes": classes,
        "steps_per_round": steps, "rounds": rounds,
        "step_us_thread_cpu": {a: round(statistics.median(cpu[a]) / steps * 1e6, 1) for a in arms},
        "ratio_kd_to_hard_thread_cpu": ratio(cpu, "kd"), "ratio_kd_to_hard_wall": ratio(wall, "kd"),
        "ratio_kd_chunk_to_hard_thread_cpu": ratio(cpu, "kd_chunk"),
        "ratio_kd_chunk_to_hard_wall": ratio(wall, "kd_chunk"),
        "ratio_composite_to_hard_thread_cpu": ratio(cpu, "composite"),
        "ratio_composite_to_hard_wall": ratio(wall, "composite"),
        "target_ratio": 1.05,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=300, help="steps per arm per round")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: as one Ray Train worker / Tune trial)")
    ap.add_argument("--quick", action="store_true", help="3 rounds of 100 steps")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 3, 100
    torch.set_num_threads(args.threads)
    result = {"threads": args.threads, "load_avg_start": [round(v, 2) for v in os.getloadavg()]}
    for name in SIZES:
        result[name] = bench_config(name, args.rounds, args.steps)
    result["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    return emit(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
