"""Ship the distilled student: a state dict, TorchScript and ONNX files, and what it costs to run.

The point of distillation is a model that is cheap to deploy, so the student stage ends by writing
the model in the forms a serving stack loads (TorchScript for libtorch/TorchServe, ONNX for
onnxruntime/TensorRT) and by measuring its CPU latency per batch beside the teacher's: the report
can then say "N times fewer parameters, M times faster" from numbers measured in the same process.

Files under `student/export/` (local or s3://):
    student.pt    plain tensor state dict (load with `torch.load(..., weights_only=True)`)
    model.json    spec, input shape, classes, params (rebuild with `pipeline.models.build_model`)
    student.ts    TorchScript (traced), `torch.jit.load` needs no Python class (libtorch, TorchServe)
    student.pt2   torch.export ExportedProgram, dynamic batch axis (`torch.export.load(...).module()`)
    student.onnx  ONNX (opset 17, dynamic batch axis), when the `onnx` package is installed
    export.json   what was written, with sha256 of each file

Plain torch; no Ray.
"""
from __future__ import annotations

import io
import statistics
import time
import warnings
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from pipeline import storage
from pipeline.models import count_params, unwrap_model

ONNX_OPSET = 17


def _example(input_shape: Sequence[int], batch_size: int) -> torch.Tensor:
    # Models take prepared float32 inputs (pipeline.models.prepare_inputs maps pixels to [-1, 1]).
    g = torch.Generator().manual_seed(0)
    return torch.rand((batch_size, *[int(s) for s in input_shape]), generator=g) * 2 - 1


def export_student(
    model: nn.Module,
    meta: dict,
    out_uri: str,
    onnx: bool = True,
) -> dict:
    """Write the student under `out_uri` as state dict + model.json + TorchScript + ExportedProgram (+ ONNX).

    model: the trained student (any wrapper is removed; it is exported in eval mode on CPU).
    meta: the checkpoint metadata of `pipeline.models.save_checkpoint` (spec, input_shape, num_classes).
    Returns {"files": {name: {"uri", "sha256", "bytes"}}, "onnx": bool, "onnx_error": str | None}.
    Every exported file is reloaded and checked against the eager model on a random batch before it
    is published, so a broken export fails here rather than in someone's serving stack. A missing
    `onnx` package (or an ONNX exporter failure) only skips the ONNX file, with the reason returned.
    """
    inner = unwrap_model(model).to("cpu").eval()
    example = _example(meta["input_shape"], 8)
    with torch.no_grad():
        expected = inner(example)

    files: dict[str, bytes] = {}
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in inner.state_dict().items()}, buf)
    files["student.pt"] = buf.getvalue()

    files["student.ts"] = _torchscript_bytes(inner, example, expected)
    files["student.pt2"] = _exported_program_bytes(inner, example, expected)

    onnx_error: Optional[str] = None
    if onnx:
        try:
            files["student.onnx"] = _onnx_bytes(inner, example, expected)
        except ImportError as e:  # the optional `export` extra is not installed
            onnx_error = f"onnx not available ({e}); install distill[export] for an ONNX file"
        except Exception as e:  # noqa: BLE001 - an ONNX failure must not lose the other exports
            onnx_error = f"{type(e).__name__}: {e}"

    out: dict[str, Any] = {"files": {}, "onnx": "student.onnx" in files, "onnx_error": onnx_error}
    for name, data in files.items():
        uri = storage.join(out_uri, name)
        storage.write_bytes_atomic(uri, data)
        out["files"][name] = {"uri": uri, "sha256": storage.sha256_bytes(data), "bytes": len(data)}
    model_json = {
        "spec": meta["spec"],
        "input_shape": meta["input_shape"],
        "num_classes": meta["num_classes"],
        "params": count_params(inner),
        "inputs": "float32 (B, *input_shape), pixels mapped to [-1, 1] as pipeline.models.prepare_inputs does",
        "outputs": "float32 (B, num_classes) logits",
    }
    storage.write_json_atomic(storage.join(out_uri, "model.json"), model_json)
    storage.write_json_atomic(storage.join(out_uri, "export.json"), out)
    return out


def _check(name: str, got: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5) -> None:
    if got.shape != expected.shape or not torch.allclose(got, expected, atol=atol, rtol=100 * atol):
        raise RuntimeError(f"{name} export does not reproduce the eager student's outputs")


def _torchscript_bytes(model: nn.Module, example: torch.Tensor, expected: torch.Tensor) -> bytes:
    # TorchScript is deprecated in recent torch releases but still what libtorch / TorchServe load;
    # its deprecation warnings say nothing the user can act on here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with torch.no_grad():
            traced = torch.jit.trace(model, example)
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
        data = buf.getvalue()
        reloaded = torch.jit.load(io.BytesIO(data))
        with torch.no_grad():
            _check("TorchScript", reloaded(example), expected)
    return data


def _exported_program_bytes(model: nn.Module, example: torch.Tensor, expected: torch.Tensor) -> bytes:
    """torch.export's ExportedProgram (.pt2), TorchScript's successor, with a dynamic batch axis."""
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    buf = io.BytesIO()
    torch.export.save(program, buf)
    data = buf.getvalue()
    reloaded = torch.export.load(io.BytesIO(data)).module()
    with torch.no_grad():
        _check("torch.export", reloaded(example[:3]), expected[:3])
    return data


def _onnx_bytes(model: nn.Module, example: torch.Tensor, expected: torch.Tensor) -> bytes:
    import os
    import tempfile

    import onnx  # optional dependency (distill[export])

    # The TorchScript-based exporter (dynamo=False) needs only `onnx`; the dynamo exporter would also
    # need onnxscript, which this project does not depend on.
    fd, tmp = tempfile.mkstemp(suffix=".onnx")
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (example,), tmp, dynamo=False, opset_version=ONNX_OPSET,
                input_names=["x"], output_names=["logits"],
                dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
            )
        with open(tmp, "rb") as f:
            data = f.read()
    finally:
        os.unlink(tmp)
    proto = onnx.load_model_from_string(data)
    onnx.checker.check_model(proto)
    # onnx's reference evaluator runs the graph without onnxruntime: a numeric check of the export.
    from onnx.reference import ReferenceEvaluator

    (got,) = ReferenceEvaluator(proto).run(None, {"x": example.numpy()})
    _check("ONNX", torch.from_numpy(got), expected, atol=1e-4)
    return data


def measure_latency(
    fn: Callable[[torch.Tensor], Any],
    input_shape: Sequence[int],
    batch_size: int = 256,
    runs: int = 20,
    warmup: int = 3,
    threads: Optional[int] = None,
) -> dict:
    """CPU latency of `fn` on one batch: {"ms_median", "ms_p90", "batch_size", "runs", "threads"}.

    `fn` maps a prepared float32 batch (batch_size, *input_shape) to outputs (a model in eval mode, the
    teacher ensemble, a TorchScript module). The median of `runs` timed calls after `warmup` untimed
    ones: medians shrug off the noise of a shared machine better than means. `threads` pins torch's
    intra-op threads for the measurement (restored afterwards), so models are compared alike.
    """
    x = _example(input_shape, batch_size)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        used = torch.get_num_threads()
        with torch.inference_mode():
            for _ in range(warmup):
                fn(x)
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                fn(x)
                times.append((time.perf_counter() - t0) * 1000.0)
    finally:
        torch.set_num_threads(before)
    times.sort()
    return {
        "ms_median": round(statistics.median(times), 4),
        "ms_p90": round(times[min(len(times) - 1, int(0.9 * len(times)))], 4),
        "batch_size": int(batch_size),
        "runs": int(runs),
        "threads": used,
    }


def model_latency(model: nn.Module, input_shape: Sequence[int], batch_size: int = 256, runs: int = 20,
                  threads: Optional[int] = None) -> dict:
    """`measure_latency` of a model in eval mode on CPU."""
    inner = unwrap_model(model).to("cpu").eval()
    return measure_latency(inner, input_shape, batch_size=batch_size, runs=runs, threads=threads)
