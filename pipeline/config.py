"""Typed experiment configuration: one YAML file per experiment, validated on load.

Each concern is one pydantic class with a description per field; the YAML mirrors them section by
section (`data`, `teacher`, `cluster`, `specialists`, `targets`, `student`, `tune`, `ray`,
`output_dir`). Dotted `KEY=VALUE` overrides from the command line are checked against the schema
before they are applied, and every problem (unknown key, wrong type, out-of-range value) is collected
and reported at once as a `UserError` naming the key, the value and the fix.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, ValidationError, model_validator

from pipeline.cache.formats import FORMAT_SETTINGS  # the one format list (parquet, webdataset) + "both"
from pipeline.errors import UserError

FORMATS = ("idx", "cifar", "npz", "folder", "digits", "synthetic")


def _absolute(path: Optional[str]) -> Optional[str]:
    """`path` made absolute when it is a non-empty local path; URIs and empty values unchanged.

    Ray Tune runs every trial in a working directory of its own, so a relative local path (the
    default `runs/...`) would name another folder inside a trial: local paths are resolved against
    the directory where the config is loaded."""
    if not path or "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


# A local path or URI; local paths are made absolute when the config is loaded (see `_absolute`).
PathOrURI = Annotated[str, AfterValidator(_absolute)]
# Integers only: pydantic's lax mode would take `true` as 1 and `2.0` as 2 (`teacher.epochs=true`).
Int = Annotated[int, Strict()]
Width = Annotated[int, Strict(), Field(ge=1)]
Temperature = Annotated[float, Field(gt=0)]
Weight = Annotated[float, Field(ge=0, le=1)]
Rate = Annotated[float, Field(gt=0)]


def run_only(*args: Any, **kw: Any) -> Any:
    """A config field that changes how a job runs (resources, checkpoint cadence, loader buffers),
    never what it computes: declared here, it is left out of every fingerprint (`fingerprint_dump`,
    `section_fingerprint`), so changing it never redoes a finished stage."""
    extra = dict(kw.pop("json_schema_extra", None) or {}, fingerprint=False)
    return Field(*args, json_schema_extra=extra, **kw)


def not_fingerprinted(model_cls: type) -> frozenset:
    """Names of `model_cls`'s fields declared with `run_only`."""
    return frozenset(n for n, f in model_cls.model_fields.items()
                     if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get("fingerprint") is False)


def fingerprint_dump(model: BaseModel) -> dict:
    """`model` as a dict without its `run_only` fields: the slice a stage fingerprints."""
    return model.model_dump(exclude=set(not_fingerprinted(type(model))))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticConfig(_Section):
    """Seeded data with real confusable structure (used by `format: synthetic`)."""

    num_classes: Int = Field(12, ge=2, description="Number of classes.")
    num_groups: Int = Field(4, ge=1, description="Classes are split into this many confusable groups.")
    train: Int = Field(6000, ge=10, description="Training samples (val is carved from these).")
    test: Int = Field(2000, ge=10, description="Test samples.")
    dim: Int = Field(64, ge=2, description="Input dimension (stored as a flat float vector).")
    difficulty: float = Field(
        1.0, gt=0, description="Within-group confusability: larger means group members overlap more."
    )
    seed: Int = Field(0, description="Seed of the generator; same seed, same bytes.")


class LoaderConfig(_Section):
    """How stages stream samples through Ray Data (docs/data.md, "Streaming"). Memory per process is
    about (prefetch_chunks + 2) x chunk_rows + shuffle_rows rows, whatever the dataset's size."""

    chunk_rows: Int = Field(4096, ge=1, description="Rows per Ray Data batch handed to a training worker; "
                            "minibatches are cut from it on the device (a Ray Data batch costs ~1.5 ms, a "
                            "small student's step less).")
    shuffle_rows: Int = Field(8192, ge=0, description="A training worker shuffles rows in windows of this "
                              "many, aligned to the epoch's start; shard order is also shuffled per pass and "
                              "rows within each read group.")
    group_rows: Int = Field(16384, ge=1, description="Small shards are read in groups of at least this many "
                            "rows per Ray Data task.")
    prefetch_chunks: Int = Field(2, ge=0, description="Chunks prefetched ahead of the training step.")
    read_cpus: float = Field(0.0, ge=0, description="Logical CPUs per read task; 0 lets reads run beside "
                             "training workers that hold every CPU (small machines); 1 on a cluster with CPU nodes.")
    read_concurrency: Int = Field(2, ge=1, description="Read tasks at once per dataset.")
    materialize_mb: Int = Field(64, ge=0, description="Evaluation splits up to this size are kept in Ray's "
                                "object store after the first pass instead of re-read every epoch.")


class DataConfig(_Section):
    source: PathOrURI = Field("", description="Path or URI of the raw data (unused by synthetic and digits).")
    format: Literal["idx", "cifar", "npz", "folder", "digits", "synthetic"] = Field(
        "synthetic", description="Raw data format, as in `distill data ingest --format`."
    )
    uri: Optional[PathOrURI] = Field(
        None, description="Where the dataset shards live; default `{output_dir}/data`. "
        "Point several runs at one ingested dataset to share it."
    )
    val_fraction: float = Field(
        0.1, gt=0, lt=0.9, description="Fraction of train carved out as val when the source has no val."
    )
    shard_size: Int = Field(5000, ge=1, description="Samples per WebDataset shard.")
    seed: Int = Field(0, description="Seed of the val split.")
    transfer_split: str = Field(
        "train", description="Split used as the distillation transfer set (may be unlabelled)."
    )
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    loader: "LoaderConfig" = run_only(default_factory=lambda: LoaderConfig())


class ModelConfig(_Section):
    """Which network to build; see `pipeline.models.build_model`."""

    arch: Literal["mlp", "cnn", "resnet", "wrn", "resnet18", "resnet50", "vit"] = Field(
        "mlp", description="Model family: the paper's mlp, a small cnn, CIFAR resnet (6n+2) / wrn, or "
        "torchvision's resnet18 / resnet50 / vit (ImageNet-style).")
    hidden: list[Width] = Field(default_factory=lambda: [256, 256], description="Hidden widths (mlp, cnn head).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on hidden layers.")
    input_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the inputs (mlp).")
    channels: list[Width] = Field(default_factory=lambda: [32, 64], description="Conv channels (cnn).")
    depth: Optional[Int] = Field(None, description="Depth (resnet: 6n+2, wrn: 6n+4).")
    width: Optional[Int] = Field(None, ge=1, description="Base channels (resnet).")
    widen_factor: Optional[Int] = Field(None, ge=1, description="Width multiplier k (wrn).")
    weights: Optional[PathOrURI] = Field(
        None, description="resnet18/resnet50/vit: start from this local state-dict file (torchvision's own "
        "file for the arch, or a model.pt of this project); nothing is ever downloaded.")
    stem: Optional[Literal["imagenet", "cifar"]] = Field(
        None, description="resnet18/resnet50: 'imagenet' (7x7/2 conv + max-pool, 224 px; default) or "
        "'cifar' (one 3x3/1 conv, for 32-64 px).")
    patch_size: Optional[Int] = Field(None, ge=1, description="vit: patch side (default 16).")
    num_layers: Optional[Int] = Field(None, ge=1, description="vit: transformer blocks (default 12).")
    num_heads: Optional[Int] = Field(None, ge=1, description="vit: attention heads (default 6).")
    hidden_dim: Optional[Int] = Field(None, ge=1, description="vit: token width (default 384).")
    mlp_dim: Optional[Int] = Field(None, ge=1, description="vit: MLP width (default 1536).")

    @model_validator(mode="after")
    def _check_arch(self) -> "ModelConfig":
        # The same rules as pipeline.models.resolve_spec (kept light: no torch import at config load),
        # so a model that cannot be built fails here, not inside a Ray Train worker.
        d = self.depth
        if self.arch == "resnet" and d is not None and not (d >= 8 and (d - 2) % 6 == 0):
            raise ValueError(f"model.depth: {d} is not valid for resnet; use 6n+2 with n >= 1 (8, 14, 20, 32, 56)")
        if self.arch == "wrn" and d is not None and not (d >= 10 and (d - 4) % 6 == 0):
            raise ValueError(f"model.depth: {d} is not valid for wrn; use 6n+4 with n >= 1 (10, 16, 22, 28, 40)")
        if self.arch == "cnn" and not self.channels:
            raise ValueError("model.channels: a cnn needs at least one conv layer, e.g. [32, 64]")
        return self

    def spec(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class AugmentConfig(_Section):
    """Decode and augmentation of image inputs (`pipeline.transforms`), per stage.

    Train view: random-resized crop (when `random_resized_crop` is set, else resize + centre
    crop) and horizontal flip; every other view (validation, test, clustering, targets,
    inference) resizes the shorter side to `resize` and centre-crops `size`, deterministically.
    Per-sample randomness is seeded from (seed, sample key, epoch). `mean`/`std` normalise on the
    device after the uint8 batch is copied there.
    """

    size: Optional[list[Int]] = Field(
        None, description="Output [H, W] (or [S] for square); unset: the dataset's nominal size (manifest input_shape)."
    )
    resize: Optional[Int] = Field(
        None, ge=1, description="Evaluation view: shorter side resized to this before the centre crop (e.g. 256 "
        "for a 224 crop); unset: just large enough for the crop."
    )
    random_resized_crop: Optional[list[float]] = Field(
        None, description="Train view: random-resized crop with this area scale range, e.g. [0.08, 1.0]; unset: none."
    )
    ratio: list[float] = Field(default_factory=lambda: [3 / 4, 4 / 3], description="Aspect-ratio range of the crop.")
    hflip: bool = Field(False, description="Train view: flip horizontally with probability 0.5.")
    mean: Optional[list[float]] = Field(None, description="Per-channel mean in 0..1 units; unset: 0.5 (inputs in [-1, 1]).")
    std: Optional[list[float]] = Field(None, description="Per-channel std in 0..1 units; unset: 0.5.")

    @model_validator(mode="after")
    def _check(self) -> "AugmentConfig":
        problems = []
        if self.size is not None and (len(self.size) not in (1, 2) or min(self.size) < 1):
            problems.append(f"augment.size: {self.size} must be [H, W] or [S] with positive sizes")
        rrc = self.random_resized_crop
        if rrc is not None and (len(rrc) != 2 or not 0 < rrc[0] <= rrc[1] <= 1):
            problems.append(f"augment.random_resized_crop: {rrc} must be [min, max] with 0 < min <= max <= 1")
        if len(self.ratio) != 2 or not 0 < self.ratio[0] <= self.ratio[1]:
            problems.append(f"augment.ratio: {self.ratio} must be [min, max] with 0 < min <= max")
        if self.std is not None and any(v <= 0 for v in self.std):
            problems.append(f"augment.std: {self.std} must be positive")
        if (self.mean is None) != (self.std is None) or (self.mean and len(self.mean) != len(self.std)):
            problems.append("augment.mean / augment.std: give both, with one value per channel")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class TrainConfig(_Section):
    """Optimisation settings shared by teacher, specialists and student."""

    epochs: Int = Field(5, ge=1, description="Passes over the training data.")
    batch_size: Int = Field(128, ge=1, description="Global batch size.")
    optimizer: Literal["sgd", "adam", "adamw"] = Field("adam", description="Optimizer.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    nesterov: bool = Field(False, description="Nesterov momentum (sgd).")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay.")
    schedule: Literal["cosine", "step", "constant", "onecycle"] = Field("cosine", description="LR schedule.")
    max_norm: Optional[float] = Field(
        None, gt=0, description="Max-norm constraint on each unit's incoming weights (the paper's MNIST teacher)."
    )
    jitter: Int = Field(0, ge=0, description="Random translation of images by up to this many pixels.")
    augment: Optional[AugmentConfig] = Field(
        None, description="Image decode/augmentation (pipeline.transforms); unset: images are only decoded "
        "and brought to the dataset's nominal size, stored pixels pass through."
    )
    patience: Optional[Int] = Field(
        None, ge=1, description="Early stopping: stop after this many epochs without val improvement."
    )
    checkpoint_every: Int = run_only(
        1, ge=1, description="Ray Train jobs: a checkpoint every this many epochs (a restart redoes at most "
        "that many) and one at the end; each carries the best val epoch's weights so far. Raise it when "
        "epochs are short and the checkpoint upload dominates."
    )
    checkpoint_every_steps: Optional[Int] = run_only(
        None, ge=1, description="Also checkpoint every this many optimizer steps inside an epoch, with the "
        "position in the data (for epochs that take hours on preemptible nodes); a resume neither repeats "
        "nor skips a batch. Unset: epoch checkpoints only."
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="Autocast: bf16 on GPUs (auto) or fp32; CPUs always train in fp32 under auto."
    )

    def train_dict(self) -> dict[str, Any]:
        return TrainConfig.model_validate(
            {k: getattr(self, k) for k in TrainConfig.model_fields}
        ).model_dump()


class ScalingFields(_Section):
    num_workers: Int = Field(1, ge=1, description="Ray Train data-parallel workers.")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs reserved per worker.")
    max_failures: Int = Field(2, ge=-1, description="Worker-group restarts from the last checkpoint (-1: forever).")


class TeacherConfig(TrainConfig, ScalingFields):
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(hidden=[512, 512], dropout=0.2))


class ClusterConfig(_Section):
    num_specialists: Int = Field(4, ge=1, description="K: number of specialists (k-means clusters).")
    subset_size: Optional[Int] = Field(
        None, ge=2, description="Fixed classes per specialist (the s nearest each centroid, may overlap); "
        "unset: disjoint clusters."
    )
    min_size: Int = Field(2, ge=1, description="Clusters with fewer classes get no specialist.")
    max_size: Optional[Int] = Field(None, ge=2, description="Largest subset allowed.")
    seed: Int = Field(0, description="k-means seed.")
    normalize: Literal["correlation", "excess"] = Field(
        "correlation", description="Class points for k-means: covariance columns as correlations, or "
        "correlations in excess of each class's median one (more stable across k-means seeds); see "
        "specialists.clustering.class_points."
    )
    self_similarity: Literal["max", "zero", "keep"] = Field(
        "max", description="Each class's own coordinate before k-means: its strongest confusion (max), "
        "0, or the correlation diagonal 1 (keep); see specialists.clustering.class_points."
    )
    batch_size: Int = Field(1024, ge=1, description="Inference batch size on val.")


class SpecialistsConfig(TrainConfig):
    epochs: Int = Field(3, ge=1, description="Epochs per specialist (one epoch = the subset's size x 2 samples).")
    lr: float = Field(5e-4, gt=0, description="Learning rate (fine-tuning from the generalist).")
    cpus_per_specialist: float = run_only(1, gt=0, description="CPUs per specialist trial.")
    gpus_per_specialist: float = run_only(0, ge=0, description="GPUs per specialist trial (1 on a GPU cluster).")
    max_concurrent: Optional[Int] = run_only(None, ge=1, description="Specialists trained at once (default: as resources allow).")
    max_failures: Int = run_only(2, ge=0, description="Retries of a failed specialist (others are not redone).")
    top_n: Int = Field(1, ge=1, description="Specialists are active when their subset meets the generalist's top-n.")
    combine_method: Literal["fixed_point", "gradient"] = Field("fixed_point", description="How q is found.")
    combine_iters: Int = Field(50, ge=1, description="Iterations of the combination.")


class TargetsConfig(_Section):
    format: Literal[FORMAT_SETTINGS] = Field("parquet", description="Cache file format(s) (`pipeline.cache.REGISTRY`).")
    dtype: Literal["float16", "float32"] = Field("float16", description="Stored dtype of logits/log-probs.")
    top_k: Optional[Int] = Field(None, ge=1, description="Store only the top-k (plus tail mass); unset: dense.")
    batch_size: Int = run_only(1024, ge=1, description="Inference batch size.")
    num_actors: Int = run_only(1, ge=1, description="Ray Data actor-pool size (model replicas).")
    cpus_per_actor: float = run_only(1, gt=0, description="CPUs per replica.")
    gpus_per_actor: float = run_only(0, ge=0, description="GPUs per replica.")
    uri: Optional[PathOrURI] = Field(None, description="Cache location; default `{output_dir}/targets`.")
    precision: Literal["auto", "bf16", "fp32"] = run_only(
        "auto", description="Autocast of the teacher's forward passes: bf16 on GPUs (auto) or fp32; CPUs always "
        "run fp32 under auto. Part of the cache's fingerprint when it takes effect (bf16 on a GPU)."
    )


class InferenceConfig(_Section):
    """Split-wide inference on Ray workers: evaluation of every model and the clustering covariance
    (`pipeline.inference`). Execution settings only: they never change a stored result."""

    batch_size: Int = Field(1024, ge=1, description="Rows per model call on an actor.")
    num_actors: Int = Field(2, ge=1, description="Model replicas (Ray Data actor pool); a local Ray gets at "
                            "most what its CPUs/GPUs hold, and never more than there are batches.")
    cpus_per_actor: float = Field(0.5, gt=0, description="Logical CPUs per replica (small, so evaluation fits "
                                  "beside other work on a 2-CPU machine); torch uses ceil() of it as threads.")
    gpus_per_actor: float = Field(0, ge=0, description="GPUs per replica (1 on a GPU cluster).")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="Autocast: bf16 on GPUs (auto) or fp32.")



class StudentConfig(TrainConfig, ScalingFields):
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(hidden=[64]))
    T: float = Field(4.0, gt=0, description="Distillation temperature (tune may replace it).")
    alpha: float = Field(0.9, ge=0, le=1, description="Weight of the soft term (tune may replace it).")
    target: Literal["ensemble", "generalist"] = Field("ensemble", description="Which cached targets to learn from.")
    mode: Literal["cached", "online"] = Field("cached", description="Read the cache, or run the teacher every step.")
    use_tuned: bool = Field(True, description="Use tune's best T/alpha for the final student when tune ran.")


class TuneConfig(_Section):
    enabled: bool = Field(True, description="Run the tune stage.")
    search: Literal["grid", "random"] = Field("grid", description="Grid over the lists, or random sampling.")
    num_samples: Int = Field(1, ge=1, description="Grid: repeats of the grid; random: number of trials.")
    T: list[Temperature] = Field(default_factory=lambda: [2.0, 8.0], min_length=1,
                                 description="Temperatures to try (each > 0).")
    alpha: list[Weight] = Field(default_factory=lambda: [0.5, 0.9], min_length=1,
                                description="Soft-term weights to try (each in [0, 1]).")
    lr: Optional[list[Rate]] = Field(None, min_length=1, description="Learning rates to try (unset: student.lr).")
    scheduler: Literal["asha", "fifo"] = Field("asha", description="ASHA stops poor trials early.")
    grace_period: Int = Field(1, ge=1, description="ASHA: epochs before a trial may be stopped.")
    epochs: Optional[Int] = Field(None, ge=1, description="Epochs per trial (unset: student.epochs).")
    max_concurrent: Int = Field(2, ge=1, description="Trials at once.")
    cpus_per_trial: float = Field(1, gt=0, description="CPUs per trial.")
    gpus_per_trial: float = Field(0, ge=0, description="GPUs per trial.")


class RayConfig(_Section):
    address: str = Field("", description="Ray cluster address; empty: start a local Ray.")
    num_cpus: Optional[Int] = Field(None, ge=1, description="CPUs of the local Ray (unset: all).")
    object_store_memory_mb: Int = Field(256, ge=64, description="Object store of the local Ray, MiB.")


class Config(_Section):
    output_dir: PathOrURI = Field("runs/default", validate_default=True, description="Run directory, local path or s3:// URI.")
    seed: Int = Field(0, description="Global seed.")
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    specialists: SpecialistsConfig = Field(default_factory=SpecialistsConfig)
    targets: TargetsConfig = Field(default_factory=TargetsConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _check_cross_fields(self) -> "Config":
        problems = []
        if self.data.format not in ("synthetic", "digits") and not self.data.source and not self.data.uri:
            problems.append(
                f"data.source: empty but data.format is '{self.data.format}'; set data.source to the raw "
                "data's path or URI (or data.uri to an already-ingested dataset)"
            )
        cs = self.cluster
        if cs.max_size is not None and cs.subset_size is not None and cs.subset_size > cs.max_size:
            problems.append(f"cluster.subset_size: {cs.subset_size} exceeds cluster.max_size {cs.max_size}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    # Where each stage lives: `pipeline.layout.stage_uri` (docs/contracts.md, "Run directory").
    def stage_uri(self, stage: str) -> str:
        from pipeline import layout

        return layout.stage_uri(self, stage)


# The `run_only` names of the training and data settings, left out wherever they appear in a slice
# a stage hashes as a plain dict (the tune stage hashes the student's training settings that way).
NOT_FINGERPRINTED = not_fingerprinted(TrainConfig) | not_fingerprinted(DataConfig)


def section_fingerprint(*parts: Any) -> str:
    """Stable hash of config slices / upstream fingerprints, to tell whether a stage is up to date."""
    def norm(p: Any) -> Any:
        # At any depth: a stage may fingerprint a section nested in a dict of its own (the tune
        # stage hashes the student's training settings as {"train": {...}}).
        if isinstance(p, BaseModel):
            p = p.model_dump(mode="json")
        if isinstance(p, dict):
            return {k: norm(v) for k, v in p.items() if k not in NOT_FINGERPRINTED}
        if isinstance(p, (list, tuple)):
            return [norm(v) for v in p]
        return p

    blob = json.dumps([norm(p) for p in parts], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Loading, overrides and error collection
# ---------------------------------------------------------------------------------------------

def _lookup_field(model_cls: type[BaseModel], dotted: str) -> Optional[str]:
    """None if `dotted` names a field of the schema; otherwise a message saying what is valid."""
    parts = dotted.split(".")
    cls: Any = model_cls
    for i, part in enumerate(parts):
        fields = getattr(cls, "model_fields", None)
        if fields is None:
            # Below a leaf: dict-valued fields accept any sub-key.
            return None if cls in (dict, Any) else f"'{'.'.join(parts[:i])}' is a value, not a section"
        if part not in fields:
            where = ".".join(parts[:i]) or "top level"
            return f"unknown key; valid keys at {where}: {', '.join(sorted(fields))}"
        ann = fields[part].annotation
        cls = _model_in(ann)
    return None


def _model_in(ann: Any) -> Any:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()) or ():
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return ann if ann in (dict, Any) else object


def parse_overrides(overrides: list[str]) -> tuple[list[tuple[str, Any]], list[str]]:
    pairs, problems = [], []
    for item in overrides:
        if "=" not in item:
            problems.append(f"'{item}': an override must look like KEY=VALUE, e.g. teacher.epochs=3")
            continue
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        pairs.append((key, value))
    return pairs, problems


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        if not isinstance(d.get(p), dict):
            d[p] = {}
        d = d[p]
    d[parts[-1]] = value


def _format_validation(err: ValidationError, raw: dict) -> list[str]:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"] if not str(x).startswith("function-"))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            parent = ".".join(str(x) for x in e["loc"][:-1])
            valid = _lookup_field(Config, loc) or "unknown key"
            lines.append(f"{loc}: {valid}; remove it or fix its spelling"
                         + (f" (section '{parent}')" if parent else ""))
            continue
        value = e.get("input")
        shown = json.dumps(value, default=str) if not isinstance(value, dict) else "{...}"
        if len(shown) > 80:
            shown = shown[:77] + "..."
        if loc:
            lines.append(f"{loc}: value {shown} is invalid: {msg}")
        else:
            lines.append(msg.removeprefix("Value error, "))
    return lines


class _DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise _DuplicateKey(f"key '{key}' appears twice (lines {seen[key] + 1} and "
                                f"{key_node.start_mark.line + 1}), and YAML would silently keep only the "
                                "second; merge them into one")
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_config(path: Optional[str], overrides: Optional[list[str]] = None) -> Config:
    """Read YAML at `path` (None: all defaults), apply dotted overrides, validate. Raises UserError."""
    raw: dict[str, Any] = {}
    if path is not None:
        if not os.path.exists(path):
            raise UserError(f"config file '{path}' does not exist; pass the path of a YAML file such as configs/quickstart.yaml")
        if os.path.isdir(path):
            raise UserError(f"config file '{path}' is a directory; pass the path of a YAML file inside it, "
                            "such as configs/quickstart.yaml")
        try:
            with open(path, encoding="utf-8") as f:
                loaded = yaml.load(f, Loader=_UniqueKeyLoader)
        except UnicodeDecodeError as e:
            raise UserError(f"config file '{path}' is not UTF-8 text (byte {e.start}: {e.reason}); pass "
                            "the YAML config, saved as UTF-8") from None
        except OSError as e:
            raise UserError(f"config file '{path}' cannot be read ({e.strerror}); check its permissions") from None
        except _DuplicateKey as e:
            raise UserError(f"config file '{path}': {e}") from None
        except yaml.YAMLError as e:
            raise UserError(f"config file '{path}' is not valid YAML: {e}") from None
        if loaded is None:
            raise UserError(f"config file '{path}' is empty; write the sections you change (see "
                            "configs/quickstart.yaml), or pass `{}` for all defaults on purpose")
        if not isinstance(loaded, dict):
            raise UserError(f"config file '{path}' must hold a mapping of sections (data:, teacher:, ...), "
                            f"not a {type(loaded).__name__}")
        raw = loaded
    pairs, problems = parse_overrides(overrides or [])
    for key, value in pairs:
        why = _lookup_field(Config, key)
        if why:
            problems.append(f"{key} (command line): {why}")
            continue
        _set_dotted(raw, key, value)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        problems.extend(_format_validation(e, raw))
        cfg = None
    if problems:
        src = f"config '{path}'" if path else "config"
        raise UserError(f"{src} has {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))
    assert cfg is not None
    return cfg


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
