"""The names Megatron-Bridge's modules use from ``transformer_engine.pytorch`` at import time."""

import contextlib

import torch


class Linear(torch.nn.Linear):
    pass


class LayerNormLinear(torch.nn.Linear):
    pass


class TransformerLayer(torch.nn.Module):
    pass


class GroupedLinear(torch.nn.Module):  # looked up by Megatron-Bridge 0.6.x
    pass


class ops:
    Sequential = torch.nn.Sequential


@contextlib.contextmanager
def fp8_autocast(*args, **kwargs):
    yield
