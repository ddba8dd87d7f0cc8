import copy

import pytest
import torch
from torch import nn

from kdkit.capture import UnknownModuleError
from kdkit.distiller import Distiller, DistillTerm
from kdkit.losses import ofd_margin


def tiny_cnn(width: int, classes: int = 3) -> nn.Module:
    """conv(stride 2) → block1 → conv(stride 2) → block2 → head; BN everywhere."""

    def block(cin, cout, stride):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU())

    return nn.Sequential(
        block(3, width, 2),
        block(width, 2 * width, 2),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, classes)),
    )


TERMS = [
    DistillTerm("spatial_similarity", student="0", teacher="0"),
    DistillTerm("channel_similarity", student="1", teacher="1", adapter="conv1x1"),
    DistillTerm("attention_transfer", student="1", teacher="1", weight=10.0),
    DistillTerm("hinton", student="output", teacher="output", args={"temperature": 2.0}),
]


def make(terms=TERMS, **kwargs):
    torch.manual_seed(0)
    teacher, student = tiny_cnn(16), tiny_cnn(4)
    x = torch.randn(8, 3, 16, 16)
    return Distiller(teacher, student, terms, example_inputs=x[:2], **kwargs), x


def test_training_lowers_the_distillation_loss_and_leaves_the_teacher_alone():
    distiller, x = make()
    teacher_state = copy.deepcopy(distiller.teacher.state_dict())
    optimizer = torch.optim.Adam(distiller.trainable_parameters(), lr=1e-2)
    distiller.train()
    totals = []
    for _ in range(30):
        out = distiller(x)
        optimizer.zero_grad()
        out.losses["total"].backward()
        optimizer.step()
        totals.append(out.losses["total"].item())
    assert totals[-1] < 0.5 * totals[0]
    assert set(out.losses) == {
        "spatial_similarity:0", "channel_similarity:1", "attention_transfer:1",
        "hinton:output", "total",
    }
    assert not distiller.teacher.training and distiller.student.training
    assert all(p.grad is None for p in distiller.teacher.parameters())
    for key, value in distiller.teacher.state_dict().items():
        torch.testing.assert_close(value, teacher_state[key], rtol=0, atol=0, msg=key)


def test_losses_are_weighted_and_summed():
    distiller, x = make()
    out = distiller(x)
    from kdkit.losses import attention_transfer_loss

    student_feat = distiller.student[1](distiller.student[0](x))
    with torch.no_grad():
        teacher_feat = distiller.teacher[1](distiller.teacher[0](x))
    expected = 10.0 * attention_transfer_loss(student_feat, teacher_feat)
    torch.testing.assert_close(out.losses["attention_transfer:1"], expected)
    parts = sum(v for k, v in out.losses.items() if k != "total")
    torch.testing.assert_close(out.losses["total"], parts)
    torch.testing.assert_close(out.teacher_output, distiller.teacher(x))


def test_adapter_parameters_are_trainable_and_sized_from_features():
    distiller, _ = make()
    (adapter,) = distiller.adapters_of("channel_similarity:1")
    assert distiller.adapters[1][0] is adapter and len(distiller.adapters[0]) == 0
    assert adapter.weight.shape == (32, 8, 1, 1)
    ids = {id(p) for p in distiller.trainable_parameters()}
    assert id(adapter.weight) in ids
    assert not ids & {id(p) for p in distiller.teacher.parameters()}


def test_unknown_module_name_is_reported_with_the_term_and_suggestions():
    terms = [DistillTerm("spatial_similarity", student="0", teacher="O")]
    with pytest.raises(UnknownModuleError, match="term 'spatial_similarity:0'.*teacher"):
        make(terms)


def test_mismatched_shapes_are_reported_up_front():
    terms = [DistillTerm("spatial_similarity", student="0", teacher="1")]
    with pytest.raises(ValueError, match="term 'spatial_similarity:0'.*spatial size"):
        make(terms)
    terms = [DistillTerm("channel_similarity", student="1", teacher="1")]
    with pytest.raises(ValueError, match="add an adapter|Add an adapter"):
        make(terms)


def test_adapters_need_example_inputs():
    with pytest.raises(ValueError, match="example_inputs"):
        Distiller(tiny_cnn(8), tiny_cnn(4), TERMS)


def test_duplicate_term_names_are_rejected():
    terms = [DistillTerm("spatial_similarity", "0", "0")] * 2
    with pytest.raises(ValueError, match="unique"):
        make(terms)


def test_ofd_term_takes_margin_from_teacher_batchnorm_and_clone_handles_inplace():
    def relu_inplace(model):
        for block in list(model)[:2]:
            block[2] = nn.ReLU(inplace=True)
        return model

    torch.manual_seed(0)
    teacher, student = relu_inplace(tiny_cnn(16)), relu_inplace(tiny_cnn(4))
    x = torch.randn(4, 3, 16, 16)
    term = DistillTerm("ofd", student="1.2", teacher="1.1", adapter="conv1x1_bn")
    with pytest.raises(RuntimeError, match="clone"):
        Distiller(teacher, student, [term], example_inputs=x)
    term.clone = True
    distiller = Distiller(teacher, student, [term], example_inputs=x)
    torch.testing.assert_close(distiller.losses[0].margin, ofd_margin(teacher[1][1]))
    assert distiller(x).losses["total"].item() > 0


def test_fsp_term_takes_lists_with_one_adapter_each():
    terms = [DistillTerm("fsp", student=["0", "1"], teacher=["0", "1"], adapter="conv1x1")]
    distiller, x = make(terms)
    assert len(distiller.adapters_of("fsp:0+1")) == 2
    assert distiller(x).losses["total"].item() > 0


def test_unequal_feature_lists_are_rejected():
    terms = [DistillTerm("fsp", student=["0", "1"], teacher=["0"])]
    with pytest.raises(ValueError, match="2 student feature"):
        make(terms)
