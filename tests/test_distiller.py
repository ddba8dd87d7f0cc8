import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from kdkit import losses as L
from kdkit.capture import UnknownModuleError
from kdkit.distiller import Distiller, DistillTerm
from kdkit.errors import ConfigError, NonFiniteLossError
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


# --- separate models ----------------------------------------------------------------------


def test_the_same_model_as_teacher_and_student_is_refused():
    model = tiny_cnn(4)
    with pytest.raises(ConfigError, match="same module.*copy.deepcopy"):
        Distiller(model, model, TERMS[:1])
    assert all(p.requires_grad for p in model.parameters())  # refused before freezing


def test_a_student_sharing_parameters_with_the_teacher_is_refused():
    teacher = tiny_cnn(4)
    student = nn.Sequential(teacher[0], *tiny_cnn(4)[1:])
    with pytest.raises(ConfigError, match=r"shares 4 parameter\(s\).*0\.0\.weight.*deepcopy"):
        Distiller(teacher, student, TERMS[:1])


# --- training modes ---------------------------------------------------------------------------


def modes(model):
    return {name: m.training for name, m in model.named_modules()}


@pytest.mark.parametrize("training", [True, False])
def test_construction_with_example_inputs_leaves_the_student_in_its_mode(training):
    torch.manual_seed(0)
    teacher, student = tiny_cnn(16), tiny_cnn(4).train(training)
    Distiller(teacher, student, TERMS, example_inputs=torch.randn(2, 3, 16, 16))
    assert set(modes(student).values()) == {training}


def test_forward_runs_the_student_in_its_mode_and_the_teacher_in_eval():
    distiller, x = make()
    distiller.train()
    seen = {}

    def mode_of(role):
        def hook(module, inputs, output):
            seen[role] = module.training

        return hook

    distiller.student[0][1].register_forward_hook(mode_of("student"))
    distiller.teacher[0][1].register_forward_hook(mode_of("teacher"))
    running_mean = distiller.student[0][1].running_mean.clone()
    distiller(x)
    assert seen == {"student": True, "teacher": False}
    assert not torch.equal(distiller.student[0][1].running_mean, running_mean)
    assert set(modes(distiller.student).values()) == {True}
    assert set(modes(distiller.teacher).values()) == {False}
    distiller.eval()
    distiller(x)
    assert set(modes(distiller.student).values()) == {False}


def test_the_teacher_stays_in_eval_after_distiller_train():
    distiller, x = make()
    distiller.teacher.train()  # even when a user put it back in training mode
    distiller.train()
    assert set(modes(distiller.teacher).values()) == {False}
    state = copy.deepcopy(distiller.teacher.state_dict())
    distiller(x)
    for key, value in distiller.teacher.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)


# --- the finite check ------------------------------------------------------------------------


def poison(module: nn.Module, value: float) -> None:
    """Make ``module`` output ``value`` (NaN or ±inf) in its first element."""

    def hook(module, inputs, output):
        output = output.clone()
        output.view(-1)[0] = value
        return output

    module.register_forward_hook(hook)


def test_check_finite_names_the_term_feature_and_the_student():
    distiller, x = make(check_finite=True)
    poison(distiller.student[0][2], float("nan"))  # the last op of block "0"
    with pytest.raises(NonFiniteLossError,
                       match=r"term 'spatial_similarity:0': the student's feature '0' holds NaN"):
        distiller(x)


def test_check_finite_names_the_teacher():
    distiller, x = make(check_finite=True)
    poison(distiller.teacher[1][2], float("inf"))
    with pytest.raises(NonFiniteLossError, match=r"term 'channel_similarity:1': the "
                       r"teacher's feature '1' holds infinite values.*teacher's weights"):
        distiller(x)


class ZeroOverZero(L.DistillationLoss):
    def forward(self, student, teacher):
        return (student.sum() - teacher.sum()) * 0 / 0


def test_check_finite_says_when_the_features_were_finite_and_the_loss_was_not():
    terms = [TERMS[0], DistillTerm(ZeroOverZero(), student="1", teacher="1", name="broken")]
    distiller, x = make(terms, check_finite=True)
    with pytest.raises(NonFiniteLossError, match="term 'broken': the features are finite but "
                       r"the loss \(weight 1.0\) is NaN"):
        distiller(x)


class HostSyncs(TorchDispatchMode):
    """Counts device-to-host reads of a value (``.item()``, ``bool(tensor)``, ``float()``)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("check_finite, syncs", [(False, 0), (True, 1)])
def test_the_finite_check_costs_one_host_sync_and_none_when_off(check_finite, syncs):
    distiller, x = make(check_finite=check_finite)
    distiller.train()
    with HostSyncs() as counter:
        out = distiller(x)
    assert counter.count == syncs
    assert torch.isfinite(out.losses["total"])


def test_without_the_check_a_nan_feature_passes_silently():
    distiller, x = make()
    poison(distiller.student[0][2], float("nan"))  # the last op of block "0"
    assert torch.isnan(distiller(x).losses["total"])


class Refuses(L.DistillationLoss):
    def forward(self, student, teacher):
        raise ValueError("my loss wants something else")


def test_a_user_losss_own_value_error_keeps_its_type_and_names_the_term():
    with pytest.raises(ValueError, match="my loss wants") as info:
        make([DistillTerm(Refuses(), student="0", teacher="0", name="mine")])
    assert not isinstance(info.value, ConfigError)
    assert info.value.__notes__ == ["in distillation term 'mine'"]


def test_students_sharing_one_teacher_pass_get_their_own_losses():
    from kdkit.distiller import record_teacher, shared_teacher_recorder

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1))
    students = [nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 1))
                for _ in range(2)]
    x = torch.randn(2, 3, 6, 6)
    distillers = [
        Distiller(teacher, students[0], [DistillTerm("spatial_similarity", "2", "2")],
                  example_inputs=x),
        Distiller(teacher, students[1], [DistillTerm("channel_similarity", "0", "0",
                                                     adapter="conv1x1"),
                                         DistillTerm("hinton", "output", "output")],
                  example_inputs=x)]
    recorder, refs = shared_teacher_recorder(teacher, distillers)
    assert sorted(refs) == ["0", "2"]
    shared = record_teacher(teacher, recorder, refs, (x,), {})
    for distiller in distillers:
        alone, together = distiller(x), distiller.student_losses(shared, x)
        assert alone.losses.keys() == together.losses.keys()
        for name, value in alone.losses.items():
            torch.testing.assert_close(together.losses[name], value)
        assert torch.equal(together.teacher_output, alone.teacher_output)
