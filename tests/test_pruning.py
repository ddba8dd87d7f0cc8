"""Channel pruning on Torch-Pruning's dependency graph: one test per coupling pattern
(unpooling indices, residual adds, concatenation), physical size, save and reload."""

import pytest
import timm
import torch
import torch_pruning as tp
from torch import nn

from kdkit.pruning import (
    bn_l1_penalty,
    channel_config,
    count_parameters_and_flops,
    dcp_importance,
    load_pruned,
    prepare_for_sparsity,
    prune_channels,
    save_pruned,
)
from tasks.matting.models import DIM, DIMSpec, dim_teacher

SPEC = DIMSpec(encoder=((8, 8), (16,), (16,), (16,), (16,)), decoder=(16, 16, 16, 8, 1))


def random_gammas(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.weight.copy_(torch.rand(module.num_features, generator=g) + 0.05)
    return model


def test_dim_prunes_unpool_coupled_channels_together_and_keeps_the_largest_gammas():
    model = random_gammas(DIM(SPEC)).eval()
    x = torch.randn(1, 4, 64, 64)
    gammas = {n: m.weight.detach().clone() for n, m in model.named_modules()
              if isinstance(m, nn.BatchNorm2d)}
    params, flops = count_parameters_and_flops(model, (x,))
    prune_channels(model, x, {"conv": 0.5, "deconv": 0.5}, ignored=[model.deconv1.conv])
    pruned_params, pruned_flops = count_parameters_and_flops(model, (x,))
    assert pruned_params < 0.6 * params and pruned_flops < 0.6 * flops
    widths = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    # each decoder stage's output feeds the unpooling of the block below: equal channels
    assert widths["deconv5.conv"] == widths["conv4.units.0.conv"]
    assert widths["deconv4.conv"] == widths["conv3.units.0.conv"]
    assert widths["deconv2.conv"] == widths["conv1.units.1.conv"]
    assert widths["deconv1.conv"] == 1
    assert len(set(widths.values())) > 3, "a global ranking gives uneven widths"
    # in an uncoupled layer the survivors are the largest |γ|, in their original order
    kept = model.conv1.units[0].bn.weight.detach()
    original = gammas["conv1.units.0.bn"]
    expected = original[original.argsort(descending=True)[: len(kept)].sort().values]
    torch.testing.assert_close(kept, expected)
    assert model(torch.randn(2, 4, 37, 45)).shape == (2, 1, 37, 45)


def test_the_dim_teacher_halves_to_a_physically_smaller_network():
    model = random_gammas(dim_teacher()).eval()
    x = torch.randn(1, 4, 64, 64)
    params, flops = count_parameters_and_flops(model, (x,))
    assert params == 25_582_595
    prune_channels(model, x, {"conv": 0.5, "deconv": 0.5}, ignored=[model.deconv1.conv])
    pruned_params, pruned_flops = count_parameters_and_flops(model, (x,))
    assert pruned_params == sum(p.numel() for p in model.parameters()) < 0.35 * params
    assert pruned_flops < 0.35 * flops
    assert model(torch.randn(1, 4, 40, 56)).shape == (1, 1, 40, 56)


def test_timm_resnet_residual_coupling():
    model = random_gammas(timm.create_model("resnet18", num_classes=3)).eval()
    x = torch.randn(1, 3, 64, 64)
    prune_channels(model, x, {"": 0.3}, ignored=[model.fc])
    config = channel_config(model)
    # the residual stream of a stage: conv2 of every block and the downsample share channels
    assert config["layer2.0.conv2"]["out"] == config["layer2.1.conv2"]["out"] == (
        config["layer2.0.downsample.0"]["out"])
    assert config["layer2.0.conv2"]["out"] < 128
    assert model(x).shape == (1, 3)


class TwoBranchConcat(nn.Module):
    """Two conv-BN branches concatenated, then a conv-BN head."""

    def __init__(self):
        super().__init__()
        self.left = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.right = nn.Sequential(nn.Conv2d(3, 10, 3, padding=1), nn.BatchNorm2d(10), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 2, 1))

    def forward(self, x):
        return self.head(torch.cat([self.left(x), self.right(x)], dim=1))


def test_concatenation_coupling():
    model = random_gammas(TwoBranchConcat()).eval()
    x = torch.randn(1, 3, 8, 8)
    prune_channels(model, x, {"": 0.5}, ignored=[model.head[3]])
    left, right = model.left[0].out_channels, model.right[0].out_channels
    assert left + right == model.head[0].in_channels < 16
    assert model(x).shape == (1, 2, 8, 8)


def test_pruned_model_saves_and_reloads_without_pruning(tmp_path):
    model = random_gammas(DIM(SPEC)).eval()
    x = torch.randn(1, 4, 32, 32)
    prune_channels(model, x, {"conv": 0.5, "deconv": 0.5}, ignored=[model.deconv1.conv])
    path = tmp_path / "pruned.pt"
    save_pruned(model, path)
    reloaded = load_pruned(lambda: DIM(SPEC), path).eval()
    assert channel_config(reloaded) == channel_config(model)
    torch.testing.assert_close(reloaded(x), model(x))
    with pytest.raises(ValueError, match="not a pruned model"):
        torch.save({"model": {}}, tmp_path / "plain.pt")
        load_pruned(lambda: DIM(SPEC), tmp_path / "plain.pt")


def test_sparsity_preparation_and_penalty():
    model = DIM(SPEC)
    prepare_for_sparsity(model)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all((m.weight == 0.5).all() and (m.bias == 0).all() for m in bns)
    assert not any(m.bias.requires_grad for m in bns)
    encoder = sum(m.num_features for n, m in model.named_modules()
                  if n.startswith("conv") and isinstance(m, nn.BatchNorm2d))
    decoder = sum(m.num_features for n, m in model.named_modules()
                  if n.startswith("deconv") and isinstance(m, nn.BatchNorm2d))
    penalty = bn_l1_penalty(model, {"conv": 1e-4, "deconv": 1e-5})
    assert penalty.item() == pytest.approx(0.5 * (1e-4 * encoder + 1e-5 * decoder))
    with pytest.raises(ValueError, match="no BatchNorm"):
        bn_l1_penalty(model, {"encoder": 1.0})


class ResidualAndPlain(nn.Module):
    """A residual group (the stem's BN and the block's last BN, added) and a plain group
    (the block's middle conv-BN), four channels each, for planted γ."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        self.mid = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
        self.out = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        s = self.stem(x)
        return self.head(torch.relu(s + self.out(self.mid(s))))


def planted(stem, mid, out):
    model = ResidualAndPlain().eval()
    for bn, gamma in ((model.stem[1], stem), (model.mid[1], mid), (model.out[1], out)):
        with torch.no_grad():
            bn.weight.copy_(torch.tensor(gamma))
    return model


# residual group: mean |γ| = [2.0, 0.3, 3.0, 2.0] (sum 4, 0.6, 6, 4; max 3, 0.4, 4, 3);
# plain group: [0.25, 0.35, 3.0, 6.0]
GAMMAS = dict(stem=[1.0, -0.2, 2.0, 3.0], mid=[0.25, 0.35, -3.0, 6.0], out=[3.0, 0.4, 4.0, 1.0])


def test_dcp_ranks_the_group_mean_abs_gamma_globally_and_unnormalised():
    model = planted(**GAMMAS)
    prune_channels(model, torch.randn(1, 3, 4, 4), {"": 0.25}, ignored=[model.head])
    # the 2 lowest of all 8 scores: plain 0 (0.25) and residual 1 (0.3)
    assert model.stem[1].weight.tolist() == [1.0, 2.0, 3.0]
    assert model.out[1].weight.tolist() == [3.0, 4.0, 1.0]
    torch.testing.assert_close(model.mid[1].weight, torch.tensor([0.35, -3.0, 6.0]))
    assert model(torch.randn(1, 3, 4, 4)).shape == (1, 2, 4, 4)


@pytest.mark.parametrize("other", [
    dict(normalizer="mean"),  # Torch-Pruning's default: each group divided by its mean
    dict(normalizer=None, group_reduction="sum"),
    dict(normalizer=None, group_reduction="max"),
])
def test_the_planted_gammas_tell_other_scores_apart(other):
    model = planted(**GAMMAS)
    importance = tp.importance.BNScaleImportance(**other)
    prune_channels(model, torch.randn(1, 3, 4, 4), {"": 0.25}, ignored=[model.head],
                   importance=importance)
    # these remove plain 0 and 1 instead: the test above pins DCP's score, not any |γ| score
    assert model.stem[1].weight.shape == (4,) and model.mid[1].num_features == 2


def test_importance_is_the_group_mean_absolute_gamma():
    model = planted(**GAMMAS)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 2, 2))
    residual = graph.get_pruning_group(model.stem[0], tp.prune_conv_out_channels,
                                       idxs=[0, 1, 2, 3])
    plain = graph.get_pruning_group(model.mid[0], tp.prune_conv_out_channels,
                                    idxs=[0, 1, 2, 3])
    torch.testing.assert_close(dcp_importance()(residual), torch.tensor([2.0, 0.3, 3.0, 2.0]))
    torch.testing.assert_close(dcp_importance()(plain), torch.tensor([0.25, 0.35, 3.0, 6.0]))
