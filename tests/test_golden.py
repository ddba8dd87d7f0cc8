"""Golden values of every loss on fixed inputs, kept in tests/fixtures/loss_golden.json, so a
refactor that changes any number fails loudly. After an intended change of definition,
regenerate with ``KDKIT_UPDATE_GOLDEN=1 pytest tests/test_golden.py`` and say why in the
commit."""

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import tensor
from torch import nn

from kdkit import losses as L

GOLDEN = Path(__file__).parent / "fixtures" / "loss_golden.json"


def _bn():
    bn = nn.BatchNorm2d(6).double()
    with torch.no_grad():
        bn.weight.copy_(tensor(6, 100))
        bn.bias.copy_(tensor(6, 101, scale=2.0))
    return bn


def _cases():
    s, t = tensor((4, 6, 8, 8), 1), tensor((4, 12, 8, 8), 2)
    s6 = tensor((4, 6, 8, 8), 3)
    s_half = tensor((4, 6, 4, 4), 4)
    t_half = tensor((4, 6, 4, 4), 5)
    logits_s, logits_t = tensor((4, 5, 3, 3), 6, 2.0), tensor((4, 5, 3, 3), 7, 2.0)
    return {
        "batch_similarity": lambda: L.batch_similarity_loss(s, t),
        "spatial_similarity": lambda: L.spatial_similarity_loss(s, t),
        "channel_similarity": lambda: L.channel_similarity_loss(s, s6),
        "spatial_channel_similarity": lambda: L.spatial_channel_similarity_loss(s, s6),
        "attention_transfer_p2": lambda: L.attention_transfer_loss(s, t),
        "attention_transfer_p4": lambda: L.attention_transfer_loss(s, t, p=4),
        "fsp": lambda: L.fsp_loss([s, s_half], [s6, t_half]),
        "ofd_margin_sum": lambda: L.ofd_margin(_bn()).sum(),
        "ofd": lambda: L.ofd_loss(s, s6, L.ofd_margin(_bn())),
        "hinton_t4": lambda: L.hinton_kd_loss(logits_s, logits_t),
        "hinton_t1": lambda: L.hinton_kd_loss(logits_s.flatten(1), logits_t.flatten(1), 1.0),
    }


def _compute():
    return {name: case().item() for name, case in _cases().items()}


def test_golden_values():
    values = _compute()
    if os.environ.get("KDKIT_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(values, indent=2) + "\n")
        pytest.skip("golden values rewritten")
    golden = json.loads(GOLDEN.read_text())
    assert set(golden) == set(values), "cases added or removed: regenerate the golden file"
    for name, value in values.items():
        assert value == pytest.approx(golden[name], rel=1e-10, abs=1e-14), name
