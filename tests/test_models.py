"""Models: architectures, input preparation, jitter, max-norm, head replacement and checkpoints."""
import io
import json
import math
import os

import numpy as np
import pytest
import torch

from pipeline import storage
from pipeline.errors import UserError
from pipeline.models import (
    apply_max_norm,
    build_model,
    checkpoint_fingerprint,
    count_params,
    jitter,
    load_checkpoint,
    prepare_inputs,
    replace_head,
    resolve_spec,
    save_checkpoint,
)


# ---- architectures ----------------------------------------------------------------------------


def test_paper_mnist_parameter_counts():
    teacher = build_model({"arch": "mlp", "hidden": [1200, 1200], "dropout": 0.5}, (784,), 10)
    student = build_model({"arch": "mlp", "hidden": [800, 800]}, (1, 28, 28), 10)
    assert count_params(teacher) == 784 * 1200 + 1200 + 1200 * 1200 + 1200 + 1200 * 10 + 10 == 2_395_210
    assert count_params(student) == 784 * 800 + 800 + 800 * 800 + 800 + 800 * 10 + 10
    assert student(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_every_arch_ends_in_head_linear():
    for spec, shape in [
        ({"arch": "mlp", "hidden": []}, (5,)),
        ({"arch": "cnn", "channels": [4, 8, 8, 8], "hidden": [16]}, (1, 8, 8)),
        ({"arch": "resnet", "depth": 8, "width": 4}, (3, 16, 16)),
        ({"arch": "wrn", "depth": 10, "widen_factor": 1}, (3, 16, 16)),
    ]:
        m = build_model(spec, shape, 7)
        assert isinstance(m.head, torch.nn.Linear) and m.head.out_features == 7
        x = torch.randn(2, *shape)
        assert torch.equal(m.eval()(x), m.head(m.features(x)))


@pytest.mark.parametrize(
    "spec,params",
    [
        # CIFAR ResNet-20 is ~0.27 M parameters (He et al. 2016), WRN-16-4 ~2.7 M (Zagoruyko & Komodakis).
        ({"arch": "resnet"}, (0.26e6, 0.29e6)),
        ({"arch": "wrn", "dropout": 0.3}, (2.6e6, 2.8e6)),
    ],
)
def test_cifar_nets_forward_shape_and_size(spec, params):
    m = build_model(spec, (3, 32, 32), 100)
    assert params[0] < count_params(m) < params[1]
    m.eval()
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_cnn_handles_tiny_digit_images():
    m = build_model({"arch": "cnn"}, (1, 8, 8), 10)
    out = m(torch.randn(4, 1, 8, 8))
    assert out.shape == (4, 10) and torch.isfinite(out).all()


def test_bad_specs_raise_user_errors_naming_the_key():
    with pytest.raises(UserError, match=r"model\.arch.*'nope'.*mlp, cnn, resnet, wrn"):
        build_model({"arch": "nope"}, (4,), 2)
    with pytest.raises(UserError, match=r"model\.depth.*6n\+2"):
        build_model({"arch": "resnet", "depth": 21}, (3, 32, 32), 10)
    with pytest.raises(UserError, match=r"model\.depth.*6n\+4"):
        build_model({"arch": "wrn", "depth": 20}, (3, 32, 32), 10)
    with pytest.raises(UserError, match=r"model\.hidden"):
        build_model({"arch": "mlp", "hidden": [10, -1]}, (4,), 2)
    with pytest.raises(UserError, match=r"model\.widht"):
        build_model({"arch": "mlp", "widht": 3}, (4,), 2)
    with pytest.raises(UserError, match=r"\(C, H, W\)"):
        build_model({"arch": "cnn"}, (64,), 10)


def test_resolve_spec_fills_defaults_and_drops_other_archs_keys():
    assert resolve_spec({}) == {"arch": "mlp", "hidden": [256, 256], "dropout": 0.0, "input_dropout": 0.0}
    # The config's ModelConfig.spec() carries mlp keys even for a resnet; they must not leak in.
    assert resolve_spec({"arch": "resnet", "hidden": [5], "channels": [3]}) == {"arch": "resnet", "depth": 20, "width": 16}


# ---- inputs -----------------------------------------------------------------------------------


def test_prepare_inputs_scales_uint8_and_keeps_floats():
    u8 = np.array([[0, 255, 128]], dtype=np.uint8)
    out = prepare_inputs(u8)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), (u8 / 255.0 - 0.5) / 0.5, atol=1e-6)
    assert torch.equal(prepare_inputs(torch.from_numpy(u8)), out)
    ro = u8.copy()
    ro.flags.writeable = False  # e.g. a memory-mapped shard
    assert torch.equal(prepare_inputs(ro), out)
    f = torch.randn(2, 3)
    assert prepare_inputs(f) is f  # already prepared: no copy
    f64 = np.random.default_rng(0).normal(size=(2, 3))
    np.testing.assert_allclose(prepare_inputs(f64).numpy(), f64, rtol=1e-6)
    assert prepare_inputs(f64).dtype == torch.float32


def test_jitter_moves_content_within_range_and_keeps_shape():
    b, h, w, p = 512, 9, 9, 2
    x = torch.full((b, 1, h, w), -1.0)
    x[:, 0, 4, 4] = 1.0
    g = torch.Generator().manual_seed(0)
    out = jitter(x, p, generator=g)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert (out == 1.0).flatten(1).sum(1).eq(1).all()  # the bright pixel survives exactly once
    pos = (out[:, 0] == 1.0).nonzero()[:, 1:]
    shifts = pos - 4
    assert shifts.abs().max() <= p
    seen = {tuple(s) for s in shifts.tolist()}
    assert len(seen) == (2 * p + 1) ** 2  # every offset happens over 512 draws
    assert set(out.unique().tolist()) == {-1.0, 1.0}  # replicate padding keeps the background
    # Same generator seed -> same shifts; 3-D (B, H, W) batches and vectors.
    assert torch.equal(jitter(x, p, torch.Generator().manual_seed(0)), out)
    assert jitter(x[:, 0], p).shape == (b, h, w)
    v = torch.randn(8, 20)
    assert jitter(v, 2) is v
    assert jitter(x, 0) is x


def test_jitter_shift_is_a_translation():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    out = jitter(x, 1, torch.Generator().manual_seed(3))
    for i in range(2):
        # Find the shift from the centre pixel of channel 0 and check the whole interior follows it.
        src = (x[i, 0] == out[i, 0, 2, 2]).nonzero()[0]
        dy, dx = int(src[0]) - 2, int(src[1]) - 2
        for c in range(3):
            assert torch.equal(out[i, c, 1:5, 1:5], x[i, c, 1 + dy : 5 + dy, 1 + dx : 5 + dx])


# ---- max-norm and heads -----------------------------------------------------------------------


def test_apply_max_norm_caps_hidden_rows_only():
    m = build_model({"arch": "mlp", "hidden": [16, 16]}, (8,), 3)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(50)
    head_before = m.head.weight.clone()
    apply_max_norm(m, 2.0)
    lin = [mod for mod in m.body.modules() if isinstance(mod, torch.nn.Linear)]
    for mod in lin:
        assert mod.weight.norm(dim=1).max() <= 2.0 + 1e-5
    assert torch.equal(m.head.weight, head_before)
    small = build_model({"arch": "mlp", "hidden": [4]}, (3,), 2)
    before = [p.clone() for p in small.parameters()]
    apply_max_norm(small, 1e6)  # rows already inside the ball are untouched
    assert all(torch.equal(a, b) for a, b in zip(before, small.parameters()))


def test_replace_head_copies_rows_and_builds_dustbin():
    torch.manual_seed(0)
    m = build_model({"arch": "mlp", "hidden": [6]}, (4,), 5)
    old_w, old_b = m.head.weight.clone(), m.head.bias.clone()
    x = torch.randn(7, 4)
    old_logits = m(x)
    rows = torch.tensor([3, 1])
    replace_head(m, 3, init_rows=rows)
    assert m.head.out_features == 3
    assert torch.equal(m.head.weight[:2], old_w[rows]) and torch.equal(m.head.bias[:2], old_b[rows])
    others = [0, 2, 4]
    torch.testing.assert_close(m.head.weight[2], old_w[others].mean(0))
    torch.testing.assert_close(m.head.bias[2], old_b[others].mean() + math.log(3))
    new_logits = m(x)
    torch.testing.assert_close(new_logits[:, :2], old_logits[:, [3, 1]])
    # Dustbin logit = mean of the other logits + log(#others) <= their logsumexp (Jensen).
    lse = torch.logsumexp(old_logits[:, others], 1)
    torch.testing.assert_close(new_logits[:, 2], old_logits[:, others].mean(1) + math.log(3))
    assert (new_logits[:, 2] <= lse + 1e-5).all()
    replace_head(m, 9)
    assert m.head.out_features == 9 and m(x).shape == (7, 9)
    with pytest.raises(ValueError):
        replace_head(m, 5, init_rows=torch.tensor([0, 1]))


# ---- checkpoints ------------------------------------------------------------------------------


def _tiny(num_classes=4):
    torch.manual_seed(1)
    return build_model({"arch": "cnn", "channels": [4], "hidden": [8]}, (1, 6, 6), num_classes)


def test_checkpoint_roundtrip_identical_outputs(tmp_path):
    m = _tiny()
    m.train()
    m(torch.randn(16, 1, 6, 6))  # move BatchNorm running stats off their init: buffers must round-trip
    m.eval()
    x = torch.randn(5, 1, 6, 6)
    d = str(tmp_path / "ck")
    meta = save_checkpoint(d, m, {"arch": "cnn", "channels": [4], "hidden": [8]}, (1, 6, 6), 4, extra={"epoch": 3})
    assert sorted(os.listdir(d)) == ["model.json", "model.pt"]
    on_disk = json.loads((tmp_path / "ck" / "model.json").read_text())
    assert on_disk == meta
    assert on_disk["sha256"] == storage.sha256_file(os.path.join(d, "model.pt"))
    assert on_disk["num_outputs"] == 4 and on_disk["params"] == count_params(m) and on_disk["extra"] == {"epoch": 3}
    assert on_disk["spec"] == {"arch": "cnn", "channels": [4], "hidden": [8], "dropout": 0.0}
    m2, meta2 = load_checkpoint(d)
    assert not m2.training
    assert torch.equal(m(x), m2(x))
    assert checkpoint_fingerprint(d) == meta["sha256"] == meta2["sha256"]


def test_checkpoint_of_specialist_head_and_remote_uri():
    m = _tiny(10)
    replace_head(m, 4, init_rows=torch.tensor([2, 5, 7]))
    uri = "memory://distill-test/spec0"  # fsspec's in-memory store goes through the remote code path
    save_checkpoint(uri, m, {"arch": "cnn", "channels": [4], "hidden": [8]}, (1, 6, 6), 10, {"subset": [2, 5, 7]})
    m2, meta = load_checkpoint(uri)
    assert meta["num_classes"] == 10 and meta["num_outputs"] == 4 and meta["extra"]["subset"] == [2, 5, 7]
    x = torch.randn(3, 1, 6, 6)
    m.eval()
    assert torch.equal(m(x), m2(x))
    storage.remove(uri, recursive=True)


def test_checkpoint_fingerprint_changes_with_weights(tmp_path):
    m = _tiny()
    spec = {"arch": "cnn", "channels": [4], "hidden": [8]}
    save_checkpoint(str(tmp_path / "a"), m, spec, (1, 6, 6), 4)
    save_checkpoint(str(tmp_path / "b"), m, spec, (1, 6, 6), 4)
    assert checkpoint_fingerprint(str(tmp_path / "a")) == checkpoint_fingerprint(str(tmp_path / "b"))
    with torch.no_grad():
        m.head.bias.add_(1)
    save_checkpoint(str(tmp_path / "b"), m, spec, (1, 6, 6), 4)
    assert checkpoint_fingerprint(str(tmp_path / "a")) != checkpoint_fingerprint(str(tmp_path / "b"))


def test_damaged_or_missing_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        load_checkpoint(str(tmp_path / "nothing"))
    d = tmp_path / "ck"
    save_checkpoint(str(d), _tiny(), {"arch": "cnn", "channels": [4], "hidden": [8]}, (1, 6, 6), 4)
    data = bytearray((d / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / "model.pt").write_bytes(bytes(data))
    with pytest.raises(UserError, match="sha256"):
        load_checkpoint(str(d))


_EXECUTED = []


def _side_effect():
    _EXECUTED.append(1)
    return {}


class _Evil:
    def __reduce__(self):
        return (_side_effect, ())


def test_checkpoint_is_loaded_with_weights_only(tmp_path):
    """A model.pt carrying a pickled callable (with a matching sha256) is refused, never executed."""
    d = tmp_path / "ck"
    save_checkpoint(str(d), _tiny(), {"arch": "cnn", "channels": [4], "hidden": [8]}, (1, 6, 6), 4)
    buf = io.BytesIO()
    torch.save({"head.weight": _Evil()}, buf)
    (d / "model.pt").write_bytes(buf.getvalue())
    meta = json.loads((d / "model.json").read_text())
    meta["sha256"] = storage.sha256_bytes(buf.getvalue())
    (d / "model.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="refusing"):
        load_checkpoint(str(d))
    assert _EXECUTED == []


# ---- torchvision image models -----------------------------------------------------------------

TINY_VIT = {"arch": "vit", "patch_size": 8, "num_layers": 2, "num_heads": 2, "hidden_dim": 32, "mlp_dim": 64}


@pytest.mark.parametrize("spec,shape,params", [
    ({"arch": "resnet18"}, (3, 64, 64), (11.1e6, 11.3e6)),          # torchvision's 11.7 M less the 1000-way fc
    ({"arch": "resnet18", "stem": "cifar"}, (1, 32, 32), (11.1e6, 11.3e6)),
    ({"arch": "resnet50"}, (3, 64, 64), (23.4e6, 23.6e6)),
    (TINY_VIT, (3, 32, 32), (2e4, 6e4)),
    (TINY_VIT, (1, 32, 32), (2e4, 6e4)),
])
def test_torchvision_models_fit_the_classifier_api(spec, shape, params):
    m = build_model(spec, shape, 10)
    assert isinstance(m.head, torch.nn.Linear) and m.head.out_features == 10
    assert params[0] < count_params(m) < params[1]
    x = torch.randn(2, *shape)
    m.eval()
    assert m(x).shape == (2, 10) and torch.equal(m(x), m.head(m.features(x)))
    replace_head(m, 4, init_rows=torch.tensor([1, 5, 7]))  # a specialist: 3 classes + dustbin
    assert m(x).shape == (2, 4)


def test_vit_defaults_are_vit_small_and_inputs_are_checked():
    spec = resolve_spec({"arch": "vit"})
    assert (spec["num_layers"], spec["num_heads"], spec["hidden_dim"], spec["patch_size"]) == (12, 6, 384, 16)
    with pytest.raises(UserError, match=r"square inputs.*patch_size \(8\).*augment\.size"):
        build_model(TINY_VIT, (3, 30, 30), 10)
    with pytest.raises(UserError, match=r"model\.hidden_dim: 30 must be a multiple of model\.num_heads"):
        build_model(dict(TINY_VIT, hidden_dim=30, num_heads=4), (3, 32, 32), 10)
    with pytest.raises(UserError, match=r"model\.stem"):
        build_model({"arch": "resnet18", "stem": "tiny"}, (3, 32, 32), 10)


def test_start_from_a_torchvision_state_dict_file(tmp_path):
    from torchvision.models import resnet18

    ref = resnet18(weights=None, num_classes=10)
    path = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), path)
    m = build_model({"arch": "resnet18", "weights": str(path)}, (3, 64, 64), 10).eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(m(x), ref.eval()(x))  # body and (10-way) classifier both taken
    # another class count: the body is taken, the head stays fresh
    m100 = build_model({"arch": "resnet18", "weights": str(path)}, (3, 64, 64), 100).eval()
    torch.testing.assert_close(m100.features(x), m.features(x))
    # greyscale data: the RGB stem is summed over its input channels
    g = build_model({"arch": "resnet18", "weights": str(path)}, (1, 64, 64), 10).eval()
    xg = torch.randn(2, 1, 64, 64)
    torch.testing.assert_close(g(xg), ref(xg.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-4)
    # a checkpoint of this project's own model.pt works too, and load_checkpoint never needs the file
    save_checkpoint(str(tmp_path / "ck"), m, {"arch": "resnet18", "weights": str(path)}, (3, 64, 64), 10)
    path.unlink()
    again, meta = load_checkpoint(str(tmp_path / "ck"))
    assert meta["spec"]["weights"] == str(path)
    torch.testing.assert_close(again(x), m(x))
    vit = build_model(TINY_VIT, (3, 32, 32), 10)
    torch.save({"state_dict": vit.state_dict()}, tmp_path / "vit.pt")
    vit2 = build_model(dict(TINY_VIT, weights=str(tmp_path / "vit.pt")), (3, 32, 32), 10)
    xv = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(vit2.eval()(xv), vit.eval()(xv))


def test_missing_mismatched_or_pickled_weights_are_user_errors(tmp_path):
    from torchvision.models import resnet18

    with pytest.raises(UserError, match=r"model\.weights .*nope\.pth: file not found.*nothing is downloaded"):
        build_model({"arch": "resnet18", "weights": str(tmp_path / "nope.pth")}, (3, 32, 32), 10)
    torch.save(resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(UserError, match=r"does not fit model\.arch 'resnet50'.*missing"):
        build_model({"arch": "resnet50", "weights": str(tmp_path / "r18.pth")}, (3, 32, 32), 10)
    with pytest.raises(UserError, match=r"of another shape \(e\.g\. conv1\.weight"):
        build_model({"arch": "resnet18", "stem": "cifar", "weights": str(tmp_path / "r18.pth")}, (3, 32, 32), 10)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"conv1.weight": Evil()}, tmp_path / "evil.pth", _use_new_zipfile_serialization=True)
    with pytest.raises(UserError, match="refusing to load"):
        build_model({"arch": "resnet18", "weights": str(tmp_path / "evil.pth")}, (3, 32, 32), 10)


def test_config_accepts_the_torchvision_archs():
    from pipeline.config import load_config

    cfg = load_config(None, ["teacher.model.arch=vit", "teacher.model.patch_size=8", "student.model.arch=resnet18",
                             "student.model.stem=cifar", "teacher.model.weights=ckpt/vit.pt"])
    spec = cfg.teacher.model.spec()
    assert spec["arch"] == "vit" and spec["patch_size"] == 8 and os.path.isabs(spec["weights"])
    assert resolve_spec(cfg.student.model.spec()) == {"arch": "resnet18", "stem": "cifar", "weights": None}
