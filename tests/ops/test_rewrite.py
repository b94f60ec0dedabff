"""The one layer-rewrite mechanism: refusal of instance-level forwards, the public source API."""

from __future__ import annotations

import functools

import pytest
import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from unet_surgery.errors import TransformError
from unet_surgery.ops import rewrite
from unet_surgery.ops.redilate import ConvSetting, redilate_, restore_
from unet_surgery.ops.scale_fusion import FusionSetting, fuse_attention_


def _monkey_patch_forward(module: nn.Module) -> None:
    """What offload/profiling tools do: an instance attribute wrapping the bound forward."""
    original = module.forward

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        return original(*args, **kwargs)

    module.forward = wrapped


def test_redilating_a_conv_with_an_instance_forward_is_refused() -> None:
    conv = nn.Conv2d(2, 2, 3, padding=1)
    _monkey_patch_forward(conv)
    x = torch.randn(1, 2, 8, 8)
    before = conv(x)
    with pytest.raises(TransformError, match="instance-level forward"):
        redilate_(conv, 2.0)
    # Nothing was changed: the class, the attributes and the output.
    assert type(conv) is nn.Conv2d and not rewrite.is_rewritten(conv)
    assert torch.equal(conv(x), before)
    # Without the wrapper the swap works and really re-dilates.
    del conv.forward
    redilate_(conv, 2.0)
    reference = nn.Conv2d(2, 2, 3, padding=2, dilation=2)
    reference.load_state_dict(conv.state_dict())
    assert torch.equal(conv(x), reference(x)) and not torch.equal(conv(x), before)
    restore_(conv)
    assert torch.equal(conv(x), before)


def test_fusing_an_attention_with_an_instance_forward_is_refused() -> None:
    attn = Attention(8, heads=2, dim_head=4)
    _monkey_patch_forward(attn)
    with pytest.raises(TransformError, match="instance-level forward"):
        fuse_attention_(attn, FusionSetting(grid_hw=(4, 4), window_hw=(2, 2), jitter=0.0))
    assert type(attn) is Attention


def test_frozen_source_pins_and_restores_the_setting() -> None:
    conv = nn.Conv2d(2, 2, 3, padding=1)
    x = torch.randn(1, 2, 8, 8)
    plain = conv(x)
    source = lambda: ConvSetting(1.0)  # noqa: E731
    redilate_(conv, source)
    assert rewrite.source(conv) is source
    with rewrite.frozen_source(conv, ConvSetting(2.0)):
        assert rewrite.read_setting(conv) == ConvSetting(2.0)
        frozen = conv(x)
    assert rewrite.source(conv) is source
    assert torch.equal(conv(x), plain) and not torch.equal(frozen, plain)
    restore_(conv)
    with pytest.raises(TransformError, match="not rewritten"):
        rewrite.source(conv)


def test_one_rewrite_kind_at_a_time() -> None:
    conv = nn.Conv2d(2, 2, 3, padding=1)
    redilate_(conv, 2.0)
    with pytest.raises(TransformError, match="already"):
        redilate_(conv, 3.0)
    redilate_(conv, 3.0, replace=True)
    assert rewrite.read_setting(conv) == 3.0
    restore_(conv)
    assert type(conv) is nn.Conv2d and "_unet_surgery_source" not in conv.__dict__
