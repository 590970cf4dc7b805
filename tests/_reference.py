"""Plain PyTorch references the tests compare the pipeline against: a hand-written training loop and
a whole-array top-1 error, written independently of `pipeline.training` (the code under test)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.models import prepare_inputs


def plain_error(model: torch.nn.Module, x: Any, y: Any, batch_size: int = 1024) -> dict:
    """{"test_error", "test_errors", "n"} of `model` on in-memory (x, y), eval mode, no grad."""
    y = torch.as_tensor(np.asarray(y)).long().flatten()
    was = model.training
    model.eval()
    preds = []
    with torch.no_grad():
        for s in range(0, len(x), batch_size):
            preds.append(model(prepare_inputs(torch.as_tensor(np.asarray(x[s:s + batch_size])))).argmax(-1))
    model.train(was)
    errors = int((torch.cat(preds) != y).sum())
    return {"test_error": errors / len(y), "test_errors": errors, "n": len(y)}


def plain_fit(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int, batch_size: int = 128,
              lr: float = 2e-3, seed: int = 0) -> torch.nn.Module:
    """Adam + cosine, cross-entropy, a seeded permutation per epoch: the loop a user would write."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * -(-len(x) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    model.train()
    for ep in range(epochs):
        order = np.random.default_rng([seed, ep]).permutation(len(x))
        for s in range(0, len(x), batch_size):
            idx = order[s:s + batch_size]
            xb = prepare_inputs(torch.from_numpy(np.ascontiguousarray(x[idx])))
            loss = F.cross_entropy(model(xb), torch.from_numpy(np.asarray(y[idx])).long())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model
