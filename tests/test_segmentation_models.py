"""The segmentation task's model, metrics and losses (the data side is in
test_segmentation_data.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdkit.capture import FeatureRecorder
from kdkit.config import ConfigError
from kdkit.pruning import count_parameters_and_flops, prepare_for_sparsity, prune_channels
from tasks.segmentation.metrics import segmentation_metrics, update_segmentation_metrics
from tasks.segmentation.models import SegmentationFPN
from tasks.segmentation.task import SegmentationTask

NARROW = {"channels": (16, 32, 64, 128)}


def _params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("encoder, decoder, args, expected", [
    ("resnet50", 128, {}, 24_739_398),  # the full teacher (configs/teacher.yaml)
    ("resnet18", 64, {}, 11_423_558),  # the full student
    ("resnet50", 64, NARROW, 1_734_790),  # the tiny preset's teacher
    ("resnet18", 32, NARROW, 771_622),  # the tiny preset's student
])
def test_parameter_counts_are_pinned(encoder, decoder, args, expected):
    assert _params(SegmentationFPN(encoder, 6, decoder, args)) == expected


@pytest.mark.parametrize("encoder", ["resnet18", "mobilenetv2_050"])
def test_any_input_size_gives_logits_at_that_size_and_stable_taps(encoder):
    model = SegmentationFPN(encoder, 5, 16, NARROW if encoder == "resnet18" else {}).eval()
    taps = [f"stage{k}" for k in range(1, 5)] + [f"fpn{k}" for k in range(1, 5)] + ["logits"]
    recorder = FeatureRecorder(taps).initialize(model)
    with recorder, torch.no_grad():
        logits = model(torch.rand(2, 3, 70, 45))
    assert logits.shape == (2, 5, 70, 45)
    for k, stride in zip(range(1, 5), (4, 8, 16, 32)):
        assert recorder[f"stage{k}"].shape[-2:] == (-(-70 // stride), -(-45 // stride))
        assert recorder[f"fpn{k}"].shape[1] == 16
    assert torch.equal(recorder["logits"], logits)


def test_wrong_input_is_a_clear_error():
    with pytest.raises(ValueError, match="B×3×H×W"):
        SegmentationFPN("resnet18", 3, 8, NARROW)(torch.rand(1, 4, 32, 32))


def test_ofd_modules_of_methods_yaml_exist_and_are_batchnorms():
    teacher = dict(SegmentationFPN("resnet50", 6, 16, NARROW).named_modules())
    student = dict(SegmentationFPN("resnet18", 6, 16, NARROW).named_modules())
    for k, last in zip(range(1, 5), (2, 3, 5, 2)):
        assert isinstance(teacher[f"encoder.layer{k}.{last}.bn3"], torch.nn.BatchNorm2d)
        assert isinstance(student[f"encoder.layer{k}.1.bn2"], torch.nn.BatchNorm2d)
        assert f"encoder.layer{k}.{last + 1}" not in teacher  # it is the stage's last block


def _reference_scores(predictions, targets, classes, ignore=255):
    """Dataset mIoU and pixel accuracy from a summed confusion matrix (float64)."""
    confusion = np.zeros((classes, classes))
    for p, t in zip(predictions, targets):
        keep = t != ignore
        np.add.at(confusion, (t[keep], p[keep]), 1)
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    return (tp[union > 0] / union[union > 0]).mean(), tp.sum() / confusion.sum()


def test_metrics_match_a_confusion_matrix_reference_over_several_images():
    rng = np.random.default_rng(0)
    classes, metrics = 5, segmentation_metrics(5)
    predictions, targets = [], []
    for _ in range(3):
        logits = torch.tensor(rng.standard_normal((1, classes, 9, 7)))
        target = rng.integers(0, 4, size=(1, 9, 7))  # class 4 never in the truth
        target[0, :2] = 255
        update_segmentation_metrics(metrics, logits, torch.tensor(target))
        predictions.append(logits.argmax(1).numpy()[0])
        targets.append(target[0])
    miou, accuracy = _reference_scores(predictions, targets, classes)
    values = {k: float(v) for k, v in metrics.compute().items()}
    assert values["mIoU"] == pytest.approx(miou, abs=1e-6)
    assert values["pixel_acc"] == pytest.approx(accuracy, abs=1e-6)


def test_metrics_hand_case():
    metrics = segmentation_metrics(3)
    logits = torch.zeros(1, 3, 1, 4)
    logits[0, [0, 0, 1, 1], 0, [0, 1, 2, 3]] = 1  # predicts 0 0 1 1
    update_segmentation_metrics(metrics, logits, torch.tensor([[[0, 1, 1, 255]]]))
    values = metrics.compute()  # IoU0 = 1/2, IoU1 = 1/2, class 2 absent: mIoU 1/2
    assert float(values["mIoU"]) == pytest.approx(0.5)
    assert float(values["pixel_acc"]) == pytest.approx(2 / 3)


def test_metric_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="B×H×W mask"):
        update_segmentation_metrics(segmentation_metrics(3), torch.zeros(1, 3, 4, 4),
                                    torch.zeros(1, 5, 4, dtype=torch.long))


def test_cross_entropy_ignores_255_and_checks_classes():
    task = SegmentationTask()
    logits = torch.tensor(np.random.default_rng(1).standard_normal((2, 3, 4, 4)),
                          dtype=torch.float32)
    mask = torch.tensor(np.random.default_rng(2).integers(0, 3, (2, 4, 4)))
    mask[0, 0] = 255
    loss = task.losses(logits, {"mask": mask}, None, {"ce": 2.0})["ce"]
    keep = mask != 255
    log_p = torch.log_softmax(logits.double(), 1).permute(0, 2, 3, 1)[keep]
    expected = -log_p[torch.arange(len(log_p)), mask[keep]].mean() * 2
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    with pytest.raises(ConfigError, match="set model.classes to data.classes"):
        task.losses(logits, {"mask": torch.full((2, 4, 4), 4)}, None, {"ce": 1.0})
    with pytest.raises(ConfigError, match="metrics: {classes: K}"):
        task.metrics({})


def test_pruning_halves_a_segmentation_network_and_keeps_it_working():
    torch.manual_seed(0)
    model = SegmentationFPN("resnet50", 6, 32, NARROW).eval()
    prepare_for_sparsity(model)
    for module in model.modules():  # distinct scales so the ranking is well defined
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data = torch.rand_like(module.weight)
    x = torch.rand(1, 3, 64, 64)
    before, _ = count_parameters_and_flops(model, (x,))
    prune_channels(model, (x,), {"encoder": 0.5, "decoder": 0.5}, [model.decoder.classifier])
    after, _ = count_parameters_and_flops(model, (x,))
    assert after < 0.4 * before
    assert model.decoder.classifier.out_channels == 6
    assert model(torch.rand(2, 3, 50, 66)).shape == (2, 6, 50, 66)
