"""Stage `cluster`: which classes each specialist covers (Hinton et al. 2015, section 5.3).

The generalist predicts on the held-out val split on Ray workers (`pipeline.inference`: an actor
pool streams the split, each batch returns the sums n, sum p and sum p p^T of its predicted
probabilities, which the driver adds up, float64); the covariance of the predictions follows from
those sums and its columns are clustered with on-line k-means (`cluster_classes`). No labels are used
for the clustering itself; they only score the generalist and, on synthetic data, the clusters
against the true confusable groups (adjusted Rand index).

Writes under `cluster/`:
    specialists.json  {"subsets": [[class, ...], ...], "class_names": [[name, ...], ...], "num_classes": C}
    covariance.png    the covariance, classes reordered by cluster, each cluster outlined
    metrics.json      subset sizes, coverage, generalist val error, ARI (when the data has groups)

The driver holds the C x C sums, never the predictions. `inference:` sets the replicas (GPUs on a
cluster); `cluster.batch_size` the rows per model call.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from pipeline import storage
from pipeline.config import Config, section_fingerprint
from pipeline.errors import UserError
from pipeline import layout
from pipeline.layout import METRICS_FILE, SUBSETS_FILE, marker_fingerprint

NEEDS_RAY = True
PLOT_FILE = "covariance.png"
# Above this many classes the heatmap shows block averages: a C x C image at JFT's 15,000 classes
# would be 225 M pixels nobody can read.
MAX_PLOT_CLASSES = 600
MAX_TICK_LABELS = 40


def fingerprint(cfg: Config) -> str:
    # batch_size only sets how many val samples go through the generalist at once: same subsets.
    # `normalize` joins the fingerprint only when set, so runs made before it existed stay up to date.
    exclude = {"batch_size"} | ({"normalize"} if cfg.cluster.normalize == "correlation" else set())
    return section_fingerprint("cluster-v1", cfg.cluster.model_dump(exclude=exclude),
                               marker_fingerprint(cfg, "teacher"))


def read_subsets(cfg: Config) -> list[list[int]]:
    """The subsets the cluster stage wrote; UserError if it has not run."""
    return layout.read_subsets(cfg.stage_uri("cluster"))


def generalist_meta(cfg: Config) -> dict:
    """The teacher stage's model.json (the weights are loaded by the inference workers), with a
    clear error if it is missing."""
    from pipeline.models import read_checkpoint_meta

    uri = cfg.stage_uri("teacher")
    if not storage.exists(storage.join(uri, "model.json")):
        raise UserError(f"{uri}: no generalist checkpoint (model.json); run `distill stage teacher CONFIG` first")
    return read_checkpoint_meta(uri)


def run(cfg: Config) -> dict:
    from pipeline.data.shards import read_manifest
    from pipeline.log import log
    from specialists.clustering import adjusted_rand, cluster_classes

    cc = cfg.cluster
    meta = generalist_meta(cfg)
    data_uri = cfg.stage_uri("data")
    manifest = read_manifest(data_uri)
    num_classes = int(meta["num_classes"])
    if int(manifest["num_classes"]) != num_classes:
        raise UserError(f"{cfg.stage_uri('teacher')}: the generalist has {num_classes} classes but the dataset "
                        f"at {data_uri} has {manifest['num_classes']}; re-run the teacher stage")
    if cc.num_specialists > num_classes:
        raise UserError(f"cluster.num_specialists: {cc.num_specialists} exceeds the number of classes "
                        f"({num_classes}); use at most {num_classes}")
    if cc.subset_size is not None and cc.subset_size >= num_classes:
        raise UserError(f"cluster.subset_size: {cc.subset_size} leaves no class for the dustbin "
                        f"(the data has {num_classes} classes); use at most {num_classes - 1}")
    class_names = list(manifest.get("class_names") or [str(c) for c in range(num_classes)])

    from pipeline import datasets, inference

    val_rows = datasets.num_samples(datasets.split_items(data_uri, "val", manifest, verify=False))
    if val_rows == 0:
        raise UserError(f"{data_uri}: the val split is empty; the clustering needs held-out predictions "
                        "(raise data.val_fraction and re-ingest)")
    log(f"cluster: generalist predictions on {val_rows} val samples, {num_classes} classes (Ray workers)")
    stats = inference.generalist_statistics(cfg.stage_uri("teacher"), data_uri, "val",
                                            **{**inference.options(cfg), "batch_size": cc.batch_size},
                                            transform=inference.eval_transform(cfg, manifest))
    cov = stats["covariance"]
    # Unlabelled val: the clustering needs no labels, only the error report does.
    labelled = stats["n"] == stats["rows"]
    errors = stats["errors"]

    subsets = cluster_classes(cov, cc.num_specialists, subset_size=cc.subset_size, min_size=cc.min_size,
                              max_size=cc.max_size, seed=cc.seed, normalize=cc.normalize,
                              self_similarity=cc.self_similarity)
    if not subsets:
        raise UserError(f"cluster: every one of the {cc.num_specialists} clusters has fewer than cluster.min_size="
                        f"{cc.min_size} classes, so no specialist would be trained; lower cluster.min_size or "
                        "cluster.num_specialists")
    too_big = [s for s in subsets if len(s) >= num_classes]
    if too_big:
        raise UserError(f"cluster: a subset holds all {num_classes} classes, leaving nothing for its dustbin; "
                        "raise cluster.num_specialists or set cluster.max_size below the number of classes")
    names = [[class_names[c] for c in s] for s in subsets]
    for m, s in enumerate(names):
        log(f"cluster: specialist {m}: {', '.join(map(str, s))}")

    out = cfg.stage_uri("cluster")
    covered = sorted({c for s in subsets for c in s})
    metrics = {
        "num_specialists": len(subsets),
        "num_clusters": cc.num_specialists,
        "subset_sizes": [len(s) for s in subsets],
        "classes_covered": len(covered),
        "coverage": len(covered) / num_classes,
        "val_samples": int(stats["rows"]),
        "val_error": errors / stats["rows"] if labelled else None,
        "val_errors": errors if labelled else None,
    }
    groups = manifest.get("class_groups")
    if groups is not None:
        labels = group_labels(groups, num_classes)
        metrics["ari"] = adjusted_rand(subsets, labels, num_classes)
        metrics["true_groups"] = _groups_as_subsets(labels)
        log(f"cluster: adjusted Rand index vs the data's class_groups: {metrics['ari']:.3f}")
    with storage.atomic_local_target(storage.join(out, PLOT_FILE)) as tmp:
        plot_covariance(cov, subsets, class_names, tmp)
    storage.write_json_atomic(storage.join(out, METRICS_FILE), metrics)
    storage.write_json_atomic(storage.join(out, SUBSETS_FILE),
                              {"subsets": subsets, "class_names": names, "num_classes": num_classes})
    result = {"num_specialists": len(subsets), "subset_sizes": metrics["subset_sizes"]}
    if "ari" in metrics:
        result["ari"] = metrics["ari"]
    return result


def group_labels(groups: Sequence, num_classes: int) -> np.ndarray:
    """(C,) group id per class from the manifest's `class_groups`: a list of groups (lists of
    classes) or already one id per class. A class in no group gets an id of its own."""
    if len(groups) and isinstance(groups[0], (list, tuple)):
        labels = np.full(num_classes, -1, dtype=np.int64)
        for g, members in enumerate(groups):
            labels[np.asarray(members, dtype=np.int64)] = g
        free = np.flatnonzero(labels < 0)
        labels[free] = len(groups) + np.arange(len(free))
        return labels
    return np.asarray(groups, dtype=np.int64)


def _groups_as_subsets(groups: Sequence[int]) -> list[list[int]]:
    out: dict[int, list[int]] = {}
    for c, g in enumerate(groups):
        out.setdefault(int(g), []).append(c)
    return [out[g] for g in sorted(out)]


def cluster_order(subsets: Sequence[Sequence[int]], num_classes: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Class order for the heatmap (each subset's classes together, uncovered classes last) and the
    [start, stop) block of each subset in that order. A class in several subsets (overlapping
    `subset_size` mode) is placed with the first; later subsets then outline only their new classes."""
    order: list[int] = []
    seen: set[int] = set()
    blocks = []
    for s in subsets:
        start = len(order)
        for c in s:
            if c not in seen:
                seen.add(c)
                order.append(c)
        if len(order) > start:
            blocks.append((start, len(order)))
    order += [c for c in range(num_classes) if c not in seen]
    return np.asarray(order), blocks


def _block_mean(a: np.ndarray, factor: int) -> np.ndarray:
    n = a.shape[0]
    m = -(-n // factor)
    pad = m * factor - n
    a = np.pad(a, ((0, pad), (0, pad)), constant_values=np.nan)
    return np.nanmean(a.reshape(m, factor, m, factor), axis=(1, 3))


def plot_covariance(cov: np.ndarray, subsets: Sequence[Sequence[int]], class_names: Optional[Sequence[str]],
                    path: str) -> None:
    """Heatmap of `cov` with classes grouped by subset and each subset's block outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.patches import Rectangle

    C = cov.shape[0]
    order, blocks = cluster_order(subsets, C)
    shown = np.asarray(cov)[np.ix_(order, order)].astype(np.float64)
    factor = max(1, -(-C // MAX_PLOT_CLASSES))
    if factor > 1:
        shown = _block_mean(shown, factor)
    # The diagonal (variances) dwarfs the co-prediction structure; scale colours to the off-diagonal.
    off = shown[~np.eye(shown.shape[0], dtype=bool)]
    vmax = float(np.abs(off).max()) if off.size and np.abs(off).max() > 0 else float(np.abs(shown).max() or 1.0)
    size = min(12.0, 4.0 + 0.25 * min(C, 32))
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    im = ax.imshow(np.clip(shown, -vmax, vmax), cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -vmax, vmax),
                   interpolation="nearest")
    for start, stop in blocks:
        ax.add_patch(Rectangle((start / factor - 0.5, start / factor - 0.5), (stop - start) / factor,
                               (stop - start) / factor, fill=False, edgecolor="black", linewidth=2))
    if C <= MAX_TICK_LABELS:
        labels = [str(class_names[c]) if class_names else str(c) for c in order]
        ax.set_xticks(range(C), labels, rotation=90, fontsize=8)
        ax.set_yticks(range(C), labels, fontsize=8)
    else:
        ax.set_xlabel("classes, grouped by specialist" + (f" ({factor}x{factor} block means)" if factor > 1 else ""))
    ax.set_title(f"Covariance of the generalist's predictions on val: {len(blocks)} specialist subsets outlined")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="covariance (clipped to off-diagonal range)")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
