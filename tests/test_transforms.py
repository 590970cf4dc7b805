"""Decode and augmentation (`pipeline.transforms`): seeded per sample, new every epoch, off for
evaluation, mixed-size JPEG/PNG decoding, normalisation on the device."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from pipeline.config import AugmentConfig, load_config
from pipeline.transforms import make_batch_transform, normalize_on_device, output_shape

MANIFEST_RGB = {"encoding": "image", "input_shape": [3, 40, 40]}


def _encoded(n=6, seed=0):
    """JPEG and PNG images of different sizes and modes, as stored in image shards."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    blobs = []
    for i in range(n):
        h, w = int(rng.integers(30, 60)), int(rng.integers(30, 60))
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        arr[:, : w // 2] //= 4  # a left-right asymmetry, so a flip is visible
        im = Image.fromarray(arr)
        if i % 3 == 1:
            im = im.convert("L")
        buf = io.BytesIO()
        im.save(buf, format="PNG" if i % 2 else "JPEG", quality=92)
        blobs.append(buf.getvalue())
    batch = {"image": np.array(blobs, dtype=object), "key": np.array([f"train_{i:08d}" for i in range(n)]),
             "y": np.arange(n)}
    return batch


TRAIN_AUG = {"size": [32], "random_resized_crop": [0.3, 1.0], "hflip": True}


def test_mixed_size_jpeg_and_png_decode_to_one_uint8_shape():
    batch = _encoded()
    fn = make_batch_transform(None, MANIFEST_RGB, train=False, seed=0)
    out = fn(dict(batch), 0)
    assert "image" not in out and out["x"].dtype == np.uint8 and out["x"].shape == (6, 3, 40, 40)
    np.testing.assert_array_equal(out["y"], batch["y"])
    out2 = make_batch_transform({"size": [24, 32], "resize": 36}, MANIFEST_RGB, train=False, seed=0)(dict(batch), 0)
    assert out2["x"].shape == (6, 3, 24, 32)
    grey = make_batch_transform(None, {"encoding": "image", "input_shape": [1, 28, 28]}, False, 0)(dict(batch), 0)
    assert grey["x"].shape == (6, 1, 28, 28)
    assert output_shape({"size": [24, 32]}, MANIFEST_RGB) == (3, 24, 32) and output_shape(None, MANIFEST_RGB) == (3, 40, 40)


def test_train_augmentation_is_seeded_reproducible_and_new_each_epoch():
    batch = _encoded()
    fn = make_batch_transform(TRAIN_AUG, MANIFEST_RGB, train=True, seed=7)
    a0 = fn(dict(batch), 0)["x"]
    again = make_batch_transform(AugmentConfig(**TRAIN_AUG), MANIFEST_RGB, train=True, seed=7)(dict(batch), 0)["x"]
    np.testing.assert_array_equal(a0, again)  # same seed, key, epoch: same view (config object or dict)
    a1 = fn(dict(batch), 1)["x"]
    assert a0.shape == a1.shape == (6, 3, 32, 32)
    assert all(not np.array_equal(a0[i], a1[i]) for i in range(6))  # every sample changes with the epoch
    other_seed = make_batch_transform(TRAIN_AUG, MANIFEST_RGB, train=True, seed=8)(dict(batch), 0)["x"]
    assert not np.array_equal(a0, other_seed)
    # per sample, not per batch position: a sample gets its view whatever batch it is in
    sub = {k: v[3:] for k, v in batch.items()}
    np.testing.assert_array_equal(fn(sub, 0)["x"], a0[3:])
    # rows of several passes in one batch: the per-row "epoch" column
    mixed = dict(batch, epoch=np.array([0, 1, 0, 1, 0, 1]))
    got = fn(mixed)["x"]
    for i in range(6):
        np.testing.assert_array_equal(got[i], (a0 if i % 2 == 0 else a1)[i])


def test_augmentation_is_off_for_evaluation():
    batch = _encoded()
    ev = make_batch_transform(TRAIN_AUG, MANIFEST_RGB, train=False, seed=7)
    e0, e1 = ev(dict(batch), 0)["x"], ev(dict(batch), 5)["x"]
    np.testing.assert_array_equal(e0, e1)
    plain = make_batch_transform({"size": [32]}, MANIFEST_RGB, train=True, seed=0)(dict(batch), 3)["x"]
    np.testing.assert_array_equal(e0, plain)  # the eval view is the resize + centre crop


def test_flip_alone_mirrors_some_samples_and_keeps_the_rest():
    batch = _encoded(n=16)
    ev = make_batch_transform({"size": [32]}, MANIFEST_RGB, train=False, seed=0)(dict(batch), 0)["x"]
    tr = make_batch_transform({"size": [32], "hflip": True}, MANIFEST_RGB, train=True, seed=0)(dict(batch), 0)["x"]
    flipped = [np.array_equal(tr[i], ev[i][..., ::-1]) for i in range(16)]
    same = [np.array_equal(tr[i], ev[i]) for i in range(16)]
    assert all(f or s for f, s in zip(flipped, same)) and 2 <= sum(flipped) <= 14


def test_stored_pixels_and_vectors():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 1, 28, 28), dtype=np.uint8)
    keys = np.array([f"k{i}" for i in range(5)])
    m = {"input_shape": [1, 28, 28]}
    same = make_batch_transform(None, m, train=True, seed=0)({"x": x, "key": keys}, 0)
    assert same["x"] is x  # no augment section: stored pixels pass through
    out = make_batch_transform({"size": [24], "random_resized_crop": [0.5, 1]}, m, True, 0)({"x": x, "key": keys}, 0)
    assert out["x"].shape == (5, 1, 24, 24) and out["x"].dtype == np.uint8
    v = rng.standard_normal((5, 8)).astype(np.float32)
    assert make_batch_transform(TRAIN_AUG, {"input_shape": [8]}, True, 0)({"x": v, "key": keys}, 0)["x"] is v
    with pytest.raises(ValueError, match="'key'"):
        make_batch_transform(TRAIN_AUG, MANIFEST_RGB, True, 0)({"image": _encoded()["image"]}, 0)


def test_normalize_on_device_matches_prepare_inputs_by_default():
    from pipeline.models import prepare_inputs

    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    torch.testing.assert_close(normalize_on_device(x), prepare_inputs(x.clone()))
    cfg = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    y = normalize_on_device(x, cfg)
    assert y.dtype == torch.float32
    want = (x[:, 1].float() / 255 - 0.456) / 0.224
    torch.testing.assert_close(y[:, 1], want)
    f = torch.zeros(2, 3)
    assert normalize_on_device(f, cfg) is f


def test_augment_section_in_every_training_stage_and_validated():
    cfg = load_config(None, ["teacher.augment.size=[32]", "teacher.augment.random_resized_crop=[0.25,1]",
                             "specialists.augment.hflip=true", "student.augment.mean=[0.5]", "student.augment.std=[0.25]"])
    assert cfg.teacher.augment.size == [32] and cfg.specialists.augment.hflip and cfg.student.augment.std == [0.25]
    assert cfg.teacher.train_dict()["augment"]["random_resized_crop"] == [0.25, 1.0]
    from pipeline.errors import UserError

    with pytest.raises(UserError, match="random_resized_crop"):
        load_config(None, ["teacher.augment.random_resized_crop=[0.5,3]"])
    with pytest.raises(UserError, match="mean / augment.std"):
        load_config(None, ["teacher.augment.mean=[0.5]"])
