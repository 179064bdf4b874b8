"""Channels-last (time-major) memory layout for encoders on the CPU.

oneDNN, which runs PyTorch's CPU convolutions, is slow on the channels-first [B, C, N] layout when
C is small and N is long: a 1x1 conv over 8 channels of a 30 s window takes ~80 ms, the same conv in
channels-last layout ~18 ms. `channels_last_encoder` returns a copy of an encoder whose `nn.Conv1d`s
run as 2-D convolutions over [B, C, 1, N] tensors in `torch.channels_last` layout, so every
activation between them stays time-major (elementwise ops keep their input's layout). The values are
the same convolutions; only oneDNN's summation order differs (fp32 latents agree within 1e-5).

Input and output stay logical [B, C, N] tensors, so the rest of the encoder (activations, padding,
LSTMs) is untouched; the output is made contiguous again for the bottleneck.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class ChannelsLastConv1d(nn.Module):
    """An `nn.Conv1d` (zero padding) computed as a channels-last 2-D convolution; same weights."""

    def __init__(self, conv: nn.Conv1d):
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"only zero-padded convolutions with explicit padding, not {conv}")
        self.weight = nn.Parameter(conv.weight.detach().unsqueeze(2).contiguous(memory_format=torch.channels_last),
                                   requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach(), requires_grad=False)
        self.stride = (1, conv.stride[0])
        self.padding = (0, conv.padding[0])
        self.dilation = (1, conv.dilation[0])
        self.groups = conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x.unsqueeze(2), self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return y.squeeze(2)


class ChannelsLastEncoder(nn.Module):
    """Runs `encoder` on a time-major copy of the input; returns contiguous [B, C, T] latents."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.transpose(1, 2).contiguous().transpose(1, 2)  # [B, C, N] logical, time-major in memory
        return self.encoder(x).contiguous()


def _swap_convs(module: nn.Module) -> int:
    swapped = 0
    for name, child in module.named_children():
        if type(child) is nn.Conv1d and child.padding_mode == "zeros" and not isinstance(child.padding, str):
            setattr(module, name, ChannelsLastConv1d(child))
            swapped += 1
        else:
            swapped += _swap_convs(child)
    return swapped


def swappable_convs(encoder: nn.Module) -> int:
    """How many of the encoder's convolutions the channels-last copy would run time-major."""
    return sum(1 for m in encoder.modules()
               if type(m) is nn.Conv1d and m.padding_mode == "zeros" and not isinstance(m.padding, str))


def channels_last_encoder(encoder: nn.Module) -> nn.Module:
    """A channels-last copy of `encoder` (the original is left as it is; parameters are copied).

    Convolutions of other kinds (reflect padding, transposed) are kept and still work: a channels-
    first input is converted by the convolution itself.
    """
    fast = copy.deepcopy(encoder)
    _swap_convs(fast)
    return ChannelsLastEncoder(fast).eval()
