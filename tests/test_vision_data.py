"""The image loaders on tiny files written in the real formats; nothing is downloaded."""
from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

from kdablate.data import crop_flip, load_dataset
from kdablate.registry import ConfigError
from kdablate.study import StudyError, load_study
from kdablate.data.fake import write_cifar, write_imagefolder, write_mnist


def write_cifar10(root, n_train=100, n_test=40):
    return write_cifar(root, "cifar10", n_train, n_test)


def write_cifar100(root, n_train=400, n_test=100):
    return write_cifar(root, "cifar100", n_train, n_test)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_cifar10_pickles(tmp_path):
    d = load_dataset("cifar10", {"data_root": str(write_cifar10(tmp_path)), "val_fraction": 0.2})
    assert d.x_train.dtype == torch.uint8 and d.x_train.shape[1:] == (3, 32, 32)
    assert len(d.y_train) + len(d.y_val) == 100 and len(d.y_test) == 40 and d.num_classes == 10
    assert d.augment == "crop_flip" and d.mean == pytest.approx((0.4914, 0.4822, 0.4465))


def test_cifar100_fine_with_groups_and_coarse(tmp_path):
    root = str(write_cifar100(tmp_path))
    fine = load_dataset("cifar100", {"data_root": root})
    assert fine.num_classes == 100 and torch.equal(fine.class_groups, torch.arange(100) // 5)
    coarse = load_dataset("cifar100", {"data_root": root, "coarse": True})
    assert coarse.num_classes == 20 and int(coarse.y_test.max()) < 20
    assert torch.equal(coarse.x_test, fine.x_test) and torch.equal(coarse.y_test, fine.y_test // 5)


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_idx_files(tmp_path, name, folder):
    write_mnist(tmp_path, folder)
    d = load_dataset(name, {"data_root": str(tmp_path), "augment": True})
    assert d.x_test.shape == (40, 1, 28, 28) and d.augment == "none"  # no crop/flip for digits
    # the writer's own pixels come back exactly
    raw = np.frombuffer((tmp_path / folder / "raw" / "t10k-images-idx3-ubyte").read_bytes()[16:], dtype=np.uint8)
    assert np.array_equal(d.x_test.numpy().ravel(), raw)


def test_imagefolder_jpeg_and_png_decoded_once(tmp_path, monkeypatch):
    root = write_imagefolder(tmp_path)
    d = load_dataset("imagefolder", {"data_root": str(root), "image_size": 16})
    assert d.x_test.shape == (18, 3, 16, 16) and d.num_classes == 3
    import kdablate.data.vision as vd

    monkeypatch.setattr(vd, "read_imagefolder", lambda *a: pytest.fail("decoded twice"))
    again = load_dataset("imagefolder", {"data_root": str(root), "image_size": 16})
    assert torch.equal(again.x_test, d.x_test)
    (root / "test" / "cat" / "0.jpg").unlink()  # the source changed: decode again
    monkeypatch.undo()
    assert len(load_dataset("imagefolder", {"data_root": str(root), "image_size": 16}).y_test) == 17


@pytest.mark.parametrize("name,expected", [
    ("cifar10", "cifar-10-batches-py/data_batch_1"), ("cifar100", "cifar-100-python/train"),
    ("mnist", "MNIST/raw/train-images-idx3-ubyte"), ("imagefolder", "train/<class>/<image>")])
def test_missing_files_say_what_to_put_where(tmp_path, name, expected):
    with pytest.raises(ConfigError, match="not found: expected .*" + expected.replace("<", ".").replace(">", ".")):
        load_dataset(name, {"data_root": str(tmp_path)})


def test_missing_data_root_is_rejected_when_the_study_loads(tmp_path):
    study = tmp_path / "s.yaml"
    study.write_text("base: {data: {name: cifar10, data_root: /nonexistent/data}}\nseeds: [0]\n"
                     "arms: [{name: ce}]\n")
    with pytest.raises(StudyError, match="base.data: .*data_root '/nonexistent/data' does not exist"):
        load_study(study)
    study.write_text(f"base: {{data: {{name: cifar10, data_root: {tmp_path}}}}}\nseeds: [0]\narms: [{{name: ce}}]\n")
    with pytest.raises(StudyError, match="cifar10 not found: expected"):
        load_study(study)


def test_balanced_subset_and_validation_split(tmp_path):
    root = str(write_cifar100(tmp_path, n_train=1000))
    d = load_dataset("cifar100", {"data_root": root, "train_subset": 300, "split_seed": 3})
    counts = torch.bincount(d.y_train, minlength=100)
    assert counts.max() <= 3 and 250 <= len(d.y_train) <= 300  # 3 per class, fewer only where the pool lacks them
    again = load_dataset("cifar100", {"data_root": root, "train_subset": 300, "split_seed": 3})
    assert torch.equal(d.y_train, again.y_train) and len(d.y_val) == 100


def test_prepare_normalises_and_crop_flip_moves_pixels_only(tmp_path):
    d = load_dataset("cifar10", {"data_root": str(write_cifar10(tmp_path))})
    x = d.x_test[:8]
    out = d.prepare(x)
    mean, std = torch.tensor(d.mean).view(1, 3, 1, 1), torch.tensor(d.std).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (x.float() / 255 - mean) / std)
    assert out.is_contiguous(memory_format=torch.channels_last)
    same = crop_flip(x.float(), torch.Generator().manual_seed(0), pad=0)
    assert all(torch.equal(s, o) or torch.equal(s, o.flip(2)) for s, o in zip(same, x.float()))
    a = crop_flip(x.float(), torch.Generator().manual_seed(1))
    b = crop_flip(x.float(), torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == x.shape and not torch.equal(a, x.float())


def test_teacher_view_cache_matches_the_online_teacher(tmp_path):
    """A KD step on cached view v sees exactly the image and the logits the online teacher would."""
    from kdablate.config import CellConfig
    from kdablate.teacher import get_teacher, get_teacher_views

    root = str(write_cifar10(tmp_path / "d"))
    cell = CellConfig(arm="kd", seed=0, data={"name": "cifar10", "data_root": root},
                      teacher={"model": {"name": "resnet8"}, "optim": {"epochs": 1, "batch_size": 32}, "views": 2},
                      knowledge={"mass": "teacher", "structure": "teacher", "temperature": 4.0, "alpha": 0.9})
    data = load_dataset("cifar10", {"data_root": root})
    teacher = get_teacher(cell, data, tmp_path / "cache")
    cached = get_teacher_views(2, data, teacher)
    assert cached["views"].shape == (2, len(data.y_train), 3) and cached["logits"].shape == (2, len(data.y_train), 10)
    model = teacher.model(data)
    idx = torch.arange(5)
    x = data.prepare(data.x_train[idx], train=True, views=cached["views"][1][idx])
    with torch.inference_mode():
        torch.testing.assert_close(model(x), cached["logits"][1][idx], rtol=1e-4, atol=1e-4)
    assert cell.teacher_key() == cell.model_copy(update={"teacher": cell.teacher.model_copy(update={"views": 0})}).teacher_key()
    assert get_teacher_views(2, data, teacher)["views"].equal(cached["views"])  # cached, same views


def test_device_resident_images_prepare_where_they_live(tmp_path):
    """Images moved once to a device (here 'meta', which checks devices as CUDA does, without one)
    are gathered, scaled, normalised, cropped and flipped there; labels and the fingerprint stay."""
    from kdablate.data import on_device
    from kdablate.trainer import epoch_batches

    data = load_dataset("cifar10", {"data_root": str(write_cifar10(tmp_path))})
    moved = on_device(data, "meta")
    assert moved.x_train.device.type == "meta" and moved.x_train.dtype == torch.uint8
    assert moved.y_train.device.type == "cpu" and moved.fingerprint == data.fingerprint
    order = torch.randperm(len(data.y_train))
    (xb, *_) = epoch_batches(moved.x_train, order, 16)
    x = moved.prepare(xb, train=True, generator=torch.Generator().manual_seed(0))
    assert x.device.type == "meta" and x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
    views = torch.zeros(16, 3, dtype=torch.long)
    assert moved.prepare(xb, train=True, views=views).device.type == "meta"
    assert on_device(data, "cpu") is data


def test_crop_flip_on_device_params_equals_the_cpu_result(tmp_path):
    data = load_dataset("cifar10", {"data_root": str(write_cifar10(tmp_path))})
    x, params = data.x_train[:8], torch.tensor([[0, 8, 1], [4, 4, 0]] * 4)
    from kdablate.data import apply_crop_flip

    out = apply_crop_flip(x.float(), params)
    assert torch.equal(out[1], x[1].float()) and torch.equal(out[0, :, 4:, :4], torch.zeros(3, 28, 4))
