"""Models take [0, 1] images and normalise inside."""

from __future__ import annotations

import pytest
import torch

from vebi.models import LeNet, Normalize


def test_lenet_layers_and_shapes() -> None:
    net = LeNet(num_classes=10).eval()
    sizes = {}
    hooks = [
        module.register_forward_hook(lambda m, i, o, n=name: sizes.__setitem__(n, tuple(o.shape)))
        for name, module in net.named_children()
    ]
    logits = net(torch.rand(3, 1, 28, 28))
    for hook in hooks:
        hook.remove()
    assert logits.shape == (3, 10)
    assert sizes["conv1"] == (3, 20, 24, 24)
    assert sizes["pool1"] == (3, 20, 12, 12)
    assert sizes["conv2"] == (3, 50, 8, 8)
    assert sizes["pool2"] == (3, 50, 4, 4)
    assert sizes["conv3"] == (3, 500, 1, 1)
    assert sizes["conv4"] == (3, 10, 1, 1)
    assert list(net.named_children())[0][0] == "normalize"


def test_normalize_is_per_channel_affine() -> None:
    norm = Normalize(mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
    images = torch.rand(2, 3, 4, 4)
    expected = torch.stack(
        [(images[:, 0] - 0.5) / 0.5, (images[:, 1] - 0.25) / 0.25, images[:, 2] / 2.0], dim=1
    )
    torch.testing.assert_close(norm(images), expected)


def test_normalize_rejects_wrong_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        LeNet()(torch.rand(2, 3, 28, 28))
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        LeNet()(torch.rand(28, 28))
    with pytest.raises(ValueError, match="std > 0"):
        Normalize(mean=(0.0,), std=(0.0,))


def test_atomic_path_writes_whole_files_with_normal_permissions(tmp_path) -> None:
    import os
    import stat

    from vebi.utils.io import atomic_path

    target = tmp_path / "out" / "file.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("done")
        assert not target.exists()
    assert target.read_text() == "done"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "done" and len(list(target.parent.iterdir())) == 1


def test_inference_mode_runs_sequential_relus_in_place_and_restores_them() -> None:
    from torch import nn

    from vebi.models import SmallVGG
    from vebi.models.hooks import inference_mode, to_device

    torch.manual_seed(0)
    net = SmallVGG(num_classes=4, in_channels=3).train()
    first = nn.ReLU()  # first in its Sequential: its input is the caller's tensor
    model = nn.Sequential(first, net)
    images = torch.rand(5, 3, 32, 32)
    kept = images.clone() - 0.5
    with torch.no_grad():
        expected = model.eval()(kept.clone())
    model.train()
    with inference_mode(model) as same:
        assert same is model and not model.training and not torch.is_grad_enabled()
        assert not first.inplace and net.relu1.inplace and net.relu3.inplace
        logits = model(kept)
    assert torch.equal(logits, expected)
    assert torch.equal(kept, images - 0.5)  # the input was not overwritten
    assert model.training and not any(m.inplace for m in model.modules() if type(m) is nn.ReLU)
    # channels-last weights on the CPU: the same logits up to float rounding
    fast = to_device(SmallVGG(num_classes=4, in_channels=3), "cpu").eval()
    assert fast.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        reference = SmallVGG(num_classes=4, in_channels=3)
        reference.load_state_dict(fast.state_dict())
        torch.testing.assert_close(fast(images), reference.eval()(images), atol=1e-5, rtol=1e-4)
