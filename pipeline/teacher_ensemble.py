"""The teacher as the cache sees it: the generalist plus its specialists, combined per sample.

Hinton et al. (2015, section 5.4) combine a generalist with the specialists whose class subsets meet
its top-n classes (`specialists.combine`). This module loads those checkpoints from a run directory
and turns a batch of inputs into the two things a soft-target cache stores per sample: the
generalist's raw logits and the ensemble's log-probabilities. It also computes the fingerprints that
say which teacher produced a cache (`pipeline.cache.teacher_fingerprints`) from the checkpoints'
`model.json` alone, so deciding what is stale never loads weights.

Only the specialists a batch needs run, and only on the rows that need them: with top-1 and disjoint
subsets each sample activates at most one specialist, so the ensemble costs about two forward passes
per sample instead of 1 + M. Plain torch, no Ray (the Ray Data jobs are `pipeline.stages.targets` and
`pipeline.inference`). The same class scores the ensemble on test (`pipeline.inference`, used by the
specialists stage), so the reported ensemble error and the cached targets come from one code path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np

from pipeline import storage
from pipeline.cache import teacher_fingerprints
from pipeline.errors import UserError
from pipeline.layout import META_FILE, read_json_required, read_subsets, spec_dirname

# Run-directory names come from `pipeline.layout`, read here without importing the cluster and
# specialists stages (which import torch): planning a regeneration (and finding that nothing
# changed) needs only JSON, never the weights.


def read_meta(dir_uri: str) -> dict:
    """A checkpoint's model.json (its format is checked when the weights are loaded)."""
    uri = storage.join(dir_uri, META_FILE)
    meta = read_json_required(uri, "no checkpoint here; run the stage that writes it first (or fix the path)",
                      "the stage that wrote it")
    if not isinstance(meta, dict) or not {"sha256", "num_classes", "num_outputs"} <= set(meta):
        raise UserError(f"{uri}: not a checkpoint description (sha256, num_classes, num_outputs); re-run its stage")
    return meta


@dataclass
class TeacherSpec:
    """Where the teacher's checkpoints are and what they are, from their model.json files."""

    generalist_uri: str
    generalist_meta: dict
    specialist_uris: list[str]
    specialist_metas: list[dict]
    top_n: int = 1
    method: str = "fixed_point"
    iters: int = 50

    @property
    def num_classes(self) -> int:
        return int(self.generalist_meta["num_classes"])

    @property
    def subsets(self) -> list[list[int]]:
        return [[int(c) for c in m["extra"]["subset"]] for m in self.specialist_metas]

    @property
    def corrections(self) -> list[float]:
        return [float(m["extra"].get("dustbin_correction", 0.0)) for m in self.specialist_metas]

    def fingerprints(self) -> dict[str, str]:
        specs = [{"sha256": m["sha256"], "subset": s, "dustbin_correction": c}
                 for m, s, c in zip(self.specialist_metas, self.subsets, self.corrections)]
        return teacher_fingerprints(self.generalist_meta["sha256"], specs, self.top_n, self.method, self.iters,
                                    self.num_classes)

    def to_json(self) -> dict:
        return {"generalist_uri": self.generalist_uri, "specialist_uris": list(self.specialist_uris),
                "top_n": self.top_n, "method": self.method, "iters": self.iters,
                "fingerprints": self.fingerprints()}


def resolve_teacher(generalist_uri: str, specialist_uris: Sequence[str], top_n: int = 1,
                    method: str = "fixed_point", iters: int = 50,
                    expected_subsets: Optional[Sequence[Sequence[int]]] = None) -> TeacherSpec:
    """Read the checkpoints' metadata (not their weights) and check they fit together.

    expected_subsets: the cluster stage's subsets; a specialist trained for another subset means the
    specialists stage is out of date (UserError).
    """
    g_meta = read_meta(generalist_uri)
    c = int(g_meta["num_classes"])
    if int(g_meta["num_outputs"]) != c:
        raise UserError(f"{generalist_uri}: has {g_meta['num_outputs']} outputs for {c} classes; it is not a generalist")
    metas = []
    for i, uri in enumerate(specialist_uris):
        meta = read_meta(uri)
        subset = (meta.get("extra") or {}).get("subset")
        if not isinstance(subset, list) or not subset:
            raise UserError(f"{uri}/model.json: extra.subset is missing; re-run `distill stage specialists CONFIG`")
        if int(meta["num_outputs"]) != len(subset) + 1 or int(meta["num_classes"]) != c:
            raise UserError(f"{uri}/model.json: {meta['num_outputs']} outputs for a subset of {len(subset)} classes "
                            f"(+1 dustbin) of {c}; re-run `distill stage specialists CONFIG`")
        if expected_subsets is not None and [int(x) for x in subset] != [int(x) for x in expected_subsets[i]]:
            raise UserError(f"{uri}: trained for subset {subset} but the cluster stage now says "
                            f"{list(expected_subsets[i])}; re-run `distill stage specialists CONFIG`")
        metas.append(meta)
    return TeacherSpec(generalist_uri, g_meta, list(specialist_uris), metas, int(top_n), str(method), int(iters))


def resolve_from_config(cfg) -> TeacherSpec:
    """The teacher of a run: `teacher/` and `specialists/spec_{m:03d}/` for each cluster subset."""
    teacher_uri = cfg.stage_uri("teacher")
    if not storage.exists(storage.join(teacher_uri, META_FILE)):
        raise UserError(f"{teacher_uri}: no generalist checkpoint; run `distill stage teacher CONFIG` first")
    subsets = read_subsets(cfg.stage_uri("cluster"))
    spec_root = cfg.stage_uri("specialists")
    uris = [storage.join(spec_root, spec_dirname(m)) for m in range(len(subsets))]
    for u in uris:
        if not storage.exists(storage.join(u, META_FILE)):
            raise UserError(f"{u}: specialist checkpoint missing; run `distill stage specialists CONFIG` first")
    sc = cfg.specialists
    return resolve_teacher(teacher_uri, uris, sc.top_n, sc.combine_method, sc.combine_iters, subsets)


class EnsembleOutputs(NamedTuple):
    """One batch through the teacher, on its device: generalist logits (B, C) float32, ensemble
    log-probabilities (B, C) float32, which specialists are active (B, M) bool, and each
    specialist's raw logits (B, |S^m| + 1) float32 (zero on rows where it did not run)."""

    generalist: "torch.Tensor"
    log_q: "torch.Tensor"
    active: Optional["torch.Tensor"]
    specialists: list


def autocast_dtype(precision: str, device: Any):
    """The autocast dtype for `precision` ("auto", "bf16", "fp32") on `device`, or None (fp32).
    bf16 only on CUDA: CPU autocast is slower than fp32 for these models."""
    import torch

    if str(precision) in ("auto", "bf16") and torch.device(device).type == "cuda":
        return torch.bfloat16
    return None


def model_inputs(x: Any, device: Any) -> "torch.Tensor":
    """A batch as the models take it, on `device`: uint8 stays uint8 across the copy (a quarter of
    the bytes of float32) and is scaled there (`pipeline.models.prepare_inputs`)."""
    import warnings

    import torch

    from pipeline.models import prepare_inputs

    if isinstance(x, np.ndarray):
        with warnings.catch_warnings():  # Ray Data hands read-only arrays; nothing writes to them
            warnings.simplefilter("ignore", UserWarning)
            x = torch.as_tensor(x)
    elif not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x))
    device = torch.device(device)
    if x.device != device:
        x = x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x.to(device)
    return prepare_inputs(x)


class TeacherEnsemble:
    """Generalist + specialists, in eval mode on one device; call it on input batches.

    `ensemble(x)` -> (generalist logits, ensemble log-probabilities), both (B, C) float32 tensors on
    the CPU; x is any batch `prepare_inputs` accepts (uint8 images, float vectors). `outputs(x)` is
    the same pass with everything left on the device (the targets stage's top-k, evaluation).
    `precision` ("auto", "bf16", "fp32"): bf16 autocast of the forward passes on CUDA (auto/bf16);
    the combination always runs in float64/float32.
    """

    def __init__(self, spec: TeacherSpec, device: Any = "cpu", precision: str = "fp32"):
        import torch

        from pipeline.models import load_checkpoint
        from specialists.combine import SubsetIndex

        self.spec = spec
        self.device = torch.device(device)
        self.autocast = autocast_dtype(precision, self.device)
        self.generalist, g_meta = load_checkpoint(spec.generalist_uri, map_location=self.device)
        if g_meta["sha256"] != spec.generalist_meta["sha256"]:
            raise UserError(f"{spec.generalist_uri}: the checkpoint changed while targets were being planned; rerun regen")
        self.specialists = []
        for uri, meta in zip(spec.specialist_uris, spec.specialist_metas):
            model, m = load_checkpoint(uri, map_location=self.device)
            if m["sha256"] != meta["sha256"]:
                raise UserError(f"{uri}: the checkpoint changed while targets were being planned; rerun regen")
            self.specialists.append(model)
        self.num_classes = spec.num_classes
        self.corrections = spec.corrections
        self.sidx = SubsetIndex(spec.subsets, self.num_classes, self.device) if spec.subsets else None

    def _forward(self, model, x):
        import torch

        if self.autocast is None:
            return model(x).float()
        with torch.autocast(self.device.type, dtype=self.autocast):
            return model(x).float()

    def outputs(self, x: Any, all_specialists: bool = False) -> EnsembleOutputs:
        """The teacher on one batch, results on the device. By default a specialist runs only on
        the rows it is active for (combine never reads the others); `all_specialists` runs every
        specialist on every row, for evaluations that score the specialists on their own."""
        import torch

        from specialists.combine import active_mask, combine

        with torch.no_grad():
            xt = model_inputs(x, self.device)
            g = self._forward(self.generalist, xt)
            if self.sidx is None:
                return EnsembleOutputs(g, torch.log_softmax(g, dim=1), None, [])
            # Only the ranking matters and log_softmax keeps each row's order (ties included), so
            # the logits rank the classes: no (B, C) float64 log-softmax per batch.
            active = active_mask(g, self.sidx, self.spec.top_n)
            spec_logits = []
            for m, model in enumerate(self.specialists):
                if all_specialists:
                    spec_logits.append(self._forward(model, xt))
                    continue
                z = torch.zeros(g.shape[0], int(self.sidx.sizes[m]) + 1, dtype=torch.float32, device=self.device)
                rows = active[:, m].nonzero().squeeze(1)
                if rows.numel():
                    # Inactive rows are never read by combine: run the specialist only where needed.
                    z[rows] = self._forward(model, xt if rows.numel() == g.shape[0] else xt[rows])
                spec_logits.append(z)
        # Outside no_grad: the "gradient" method optimises q with autograd.
        log_q = combine(g, spec_logits, self.sidx, top_n=self.spec.top_n, method=self.spec.method,
                        iters=self.spec.iters, dustbin_corrections=self.corrections, active=active)
        return EnsembleOutputs(g, log_q.detach().float(), active, spec_logits)

    def __call__(self, x: Any) -> tuple["torch.Tensor", "torch.Tensor"]:
        out = self.outputs(x)
        return out.generalist.cpu(), out.log_q.cpu()

    def predict(self, x: Any, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """(generalist logits, ensemble log-probs) as float32 numpy (N, C), in batches."""
        gs, es = [], []
        for start in range(0, len(x), batch_size):
            g, e = self(x[start:start + batch_size])
            gs.append(g.numpy())
            es.append(e.numpy())
        if not gs:
            return np.zeros((0, self.num_classes), np.float32), np.zeros((0, self.num_classes), np.float32)
        return np.concatenate(gs), np.concatenate(es)
