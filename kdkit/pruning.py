"""Distillation-based channel pruning (DCP) on Torch-Pruning's dependency graph.

The DCP recipe (``docs/methods.md``): (1) *sparsify*: train a full-width student with the
distillation loss plus an L1 penalty on BatchNorm ``γ`` (:func:`prepare_for_sparsity`,
:func:`bn_l1_penalty`); (2) *prune*: rank ``|γ|`` globally within each part of the network
(encoder, decoder) and remove the lowest fraction of each, coupled channels together
(:func:`prune_channels` with :func:`dcp_importance`, Torch-Pruning's own BN-scale score);
(3) *retrain* the pruned architecture with distillation. The pruned model is physically
smaller; it saves as its channel configuration plus weights (:func:`save_pruned`) and
loads without Torch-Pruning (:func:`load_pruned`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kdkit.errors import CheckpointError, ConfigError

__all__ = [
    "dcp_importance",
    "prepare_for_sparsity",
    "bn_l1_penalty",
    "prune_channels",
    "channel_config",
    "save_pruned",
    "load_pruned",
    "count_parameters_and_flops",
]

_BN = nn.modules.batchnorm._BatchNorm


def dcp_importance() -> tp.importance.Importance:
    """DCP's channel score, Torch-Pruning's ``BNScaleImportance(normalizer=None)``: each
    channel of a group scores the mean ``|γ|`` of the group's BatchNorms at that channel
    (``group_reduction="mean"``), unnormalised, so that scores of different groups compare
    directly (the global ranking of network slimming and DCP; Torch-Pruning's default
    ``normalizer="mean"`` divides each group by its own mean and ranks differently). After
    a sparsity training driven by a distillation loss, this is DCP's distillation-based
    score. ``group → 1-D tensor``, one score per channel of the group."""
    return tp.importance.BNScaleImportance(group_reduction="mean", normalizer=None)


def prepare_for_sparsity(model: nn.Module, gamma: float = 0.5) -> None:
    """DCP's start: every BatchNorm ``γ = gamma``, ``β = 0`` and frozen."""
    for module in model.modules():
        if isinstance(module, _BN) and module.affine:
            with torch.no_grad():
                module.weight.fill_(gamma)
                module.bias.zero_()
            module.bias.requires_grad_(False)


def _bn_modules(model: nn.Module, prefixes: Iterable[str]) -> list[tuple[str, nn.Module]]:
    prefixes = tuple(prefixes)
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, _BN) and m.affine and name.startswith(prefixes)]


def bn_l1_penalty(model: nn.Module, weights: dict[str, float]) -> torch.Tensor:
    """``Σ_parts λ_part · Σ |γ|`` over the BatchNorms whose module name starts with each
    part's prefix (e.g. ``{"conv": 1e-4, "deconv": 1e-5}`` for DIM's encoder and decoder)."""
    total = None
    for prefix, weight in weights.items():
        modules = _bn_modules(model, [prefix])
        if not modules:
            raise ConfigError(f"no BatchNorm module name starts with {prefix!r}")
        part = sum(m.weight.abs().sum() for _, m in modules) * weight
        total = part if total is None else total + part
    if total is None:
        raise ConfigError("bn_l1_penalty needs at least one prefix → weight")
    return total


def prune_channels(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple,
    fractions: dict[str, float],
    ignored: Sequence[nn.Module] = (),
    importance: tp.importance.Importance | None = None,
) -> nn.Module:
    """Remove, in place, the lowest-scoring fraction of the channels of each part of the
    network (``fractions``: module-name prefix → fraction; ``""`` is the whole network),
    ranking every group of that part together. Channels coupled through residual adds or
    concatenations are removed together; a model whose coupling autograd cannot see (the
    integer indices of max-unpooling) provides ``pruning_forward(*inputs)``, the same
    computation with that coupling made visible, which is used for tracing. ``ignored``
    layers (e.g. the output convolution) keep their output channels."""
    importance = importance or dcp_importance()
    scopes = {}
    for prefix, fraction in fractions.items():
        if not 0 <= fraction < 1:
            raise ConfigError(f"fraction for {prefix!r} must be in [0, 1), got {fraction}")
        layers = tuple(m for n, m in model.named_modules()
                       if n.startswith(prefix) and isinstance(m, (nn.modules.conv._ConvNd, _BN)))
        if not layers:
            raise ConfigError(f"no conv or BatchNorm module name starts with {prefix!r}")
        scopes[layers] = fraction  # one ranking scope per part (Torch-Pruning's tuple keys)
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    tracing = getattr(model, "pruning_forward", None)
    pruner = tp.pruner.MetaPruner(
        model, inputs, importance=importance, global_pruning=True,
        pruning_ratio_dict=scopes, ignored_layers=list(ignored),
        forward_fn=None if tracing is None else (lambda m, x: m.pruning_forward(*x)),
    )
    pruner.step()
    return model


def channel_config(model: nn.Module) -> dict[str, dict[str, int]]:
    """The shapes that pruning changes: for every conv, linear and BatchNorm, its channel
    counts (enough to rebuild the pruned architecture from the unpruned one)."""
    config = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            config[name] = {"in": module.in_channels, "out": module.out_channels,
                            "groups": module.groups}
        elif isinstance(module, nn.Linear):
            config[name] = {"in": module.in_features, "out": module.out_features}
        elif isinstance(module, _BN):
            config[name] = {"out": module.num_features}
    return config


def save_pruned(model: nn.Module, path: str | Path) -> None:
    """Save ``{"channels": channel_config, "model": state_dict}`` (loads with
    ``weights_only=True``)."""
    torch.save({"channels": channel_config(model), "model": model.state_dict()}, path)


def _resize(module: nn.Module, shape: dict[str, int]) -> None:
    """Give ``module`` the recorded channel counts (empty parameters of the new shapes)."""
    def empty_like(parameter, *size):
        return nn.Parameter(parameter.new_empty(size), requires_grad=parameter.requires_grad)

    if isinstance(module, nn.modules.conv._ConvNd):
        module.in_channels, module.out_channels = shape["in"], shape["out"]
        module.groups = shape["groups"]
        kernel = module.weight.shape[2:]
        if module.transposed:
            module.weight = empty_like(module.weight, shape["in"], shape["out"] // shape["groups"],
                                       *kernel)
        else:
            module.weight = empty_like(module.weight, shape["out"], shape["in"] // shape["groups"],
                                       *kernel)
        if module.bias is not None:
            module.bias = empty_like(module.bias, shape["out"])
    elif isinstance(module, nn.Linear):
        module.in_features, module.out_features = shape["in"], shape["out"]
        module.weight = empty_like(module.weight, shape["out"], shape["in"])
        if module.bias is not None:
            module.bias = empty_like(module.bias, shape["out"])
    elif isinstance(module, _BN):
        module.num_features = shape["out"]
        if module.affine:
            module.weight = empty_like(module.weight, shape["out"])
            module.bias = empty_like(module.bias, shape["out"])
        if module.track_running_stats:
            module.running_mean = module.running_mean.new_zeros(shape["out"])
            module.running_var = module.running_var.new_ones(shape["out"])


def load_pruned(build: Callable[[], nn.Module] | nn.Module, path: str | Path) -> nn.Module:
    """Rebuild a pruned model: the unpruned architecture (a model or a builder) resized to
    the saved channel configuration, then its weights. No pruning code runs."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or "channels" not in payload:
        raise CheckpointError(f"{path} is not a pruned model (no channel configuration); save it "
                         "with kdkit.pruning.save_pruned")
    model = build() if callable(build) and not isinstance(build, nn.Module) else build
    named = dict(model.named_modules())
    unknown = [name for name in payload["channels"] if name not in named]
    if unknown:
        raise CheckpointError(f"{path} has layers this architecture lacks: {unknown[:5]}")
    for name, shape in payload["channels"].items():
        _resize(named[name], shape)
    model.load_state_dict(payload["model"])
    return model


def count_parameters_and_flops(model: nn.Module, example_inputs: tuple) -> tuple[int, int]:
    """(parameters, FLOPs of one forward on ``example_inputs``), measured."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*example_inputs)
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops()
