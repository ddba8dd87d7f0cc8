"""The segmentation task's data side: VOC colours, mask files, synthetic scenes, folder
datasets and transforms."""

from __future__ import annotations

import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from kdkit.data import read_image, split_seed, write_gray, write_image
from tasks.segmentation.data import (
    IGNORE_INDEX,
    EvalTransform,
    FolderSegmentation,
    SyntheticSegmentation,
    TrainTransform,
    colourise,
    mask_from_colours,
    read_mask,
    synthesize_scene,
    voc_palette,
    write_mask,
    write_synthetic_folder,
)
from tasks.segmentation.data.synthetic import _FULL, _scene

SIZE = 128
SEEDS = range(20)


@pytest.fixture(scope="module")
def scenes():
    """Scenes 0..19 at 128², 6 classes."""
    return [synthesize_scene(seed, SIZE, 6) for seed in SEEDS]


def _labels(seed: int, shape=(48, 64)) -> np.ndarray:
    """A label map with classes 0..20 and some ignore pixels."""
    rng = np.random.default_rng(seed)
    mask = rng.integers(0, 21, size=shape).astype(np.uint8)
    mask[rng.random(shape) < 0.1] = IGNORE_INDEX
    return mask


def _sample(height: int = 64, width: int = 64, seed: int = 0) -> dict:
    """8×8-pixel blocks labelled 0/1 at random; the image's red channel is 255 exactly on
    label 1 and its green channel a left-to-right ramp (so a flip is visible)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 2, size=(-(-height // 8), -(-width // 8))).astype(np.uint8)
    mask = np.kron(blocks, np.ones((8, 8), np.uint8))[:height, :width]
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0] = 255 * mask
    image[..., 1] = np.linspace(0, 255, width).round().astype(np.uint8)[None, :]
    return {"image": image, "mask": mask, "name": f"blocks_{seed}"}


# ---------------------------------------------------------------- palette


def test_voc_palette_known_entries():
    colours = voc_palette()
    assert colours.shape == (256, 3) and colours.dtype == np.uint8
    expected = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0),
                15: (192, 128, 128), 20: (0, 64, 128), 255: (224, 224, 192)}
    for index, colour in expected.items():
        assert tuple(colours[index]) == colour, index
    assert len({tuple(c) for c in colours}) == 256
    np.testing.assert_array_equal(voc_palette(21), colours[:21])
    with pytest.raises(ValueError, match="1..256"):
        voc_palette(257)


def test_colourise_round_trip_keeps_ignore():
    mask = _labels(0)
    rgb = colourise(mask)
    assert rgb.shape == (*mask.shape, 3) and rgb.dtype == np.uint8
    assert (rgb[mask == IGNORE_INDEX] == (224, 224, 192)).all()
    assert (rgb[mask == 15] == (192, 128, 128)).all()
    np.testing.assert_array_equal(mask_from_colours(rgb, "x.png"), mask)
    every = np.arange(256, dtype=np.uint8).reshape(16, 16)
    np.testing.assert_array_equal(mask_from_colours(colourise(every), "x.png"), every)


def test_unknown_colour_names_file_colour_and_count():
    rgb = colourise(_labels(1))
    rgb[2, 5] = (1, 2, 3)
    rgb[7, 1] = (250, 0, 0)
    with pytest.raises(ValueError) as error:
        mask_from_colours(rgb, Path("masks/cat.png"))
    text = str(error.value)
    assert "masks/cat.png" in text and "(1, 2, 3)" in text and "(x=5, y=2)" in text
    assert "2 pixel" in text


# ---------------------------------------------------------------- synthetic scenes


def test_synthesize_scene_is_deterministic_by_seed():
    a, b, c = synthesize_scene(7, 64), synthesize_scene(7, 64), synthesize_scene(8, 64)
    for key in ("image", "mask"):
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["image"], c["image"])
    assert not np.array_equal(a["mask"], c["mask"])


@pytest.mark.parametrize("classes", [2, 6, 21])
def test_scene_format_and_label_range(classes):
    for seed in range(4):
        s = synthesize_scene(seed, 96, classes)
        assert s["image"].shape == (96, 96, 3) and s["image"].dtype == np.uint8
        assert s["mask"].shape == (96, 96) and s["mask"].dtype == np.uint8
        assert s["mask"].max() < classes
        assert s["name"] == f"scene_{seed}"
        assert (s["mask"] == 0).any() and (s["mask"] > 0).any()


def test_scenes_show_every_class_and_several_per_image(scenes):
    present = [set(np.unique(s["mask"]).tolist()) for s in scenes]
    assert set().union(*present) == {0, 1, 2, 3, 4, 5}
    assert np.mean([len(p) for p in present]) >= 3.5
    # objects cover a real share of the image, but the background stays the largest class
    share = np.mean([(s["mask"] > 0).mean() for s in scenes])
    assert 0.1 < share < 0.5


def test_later_objects_occlude_earlier_ones(scenes):
    """Replays the objects of each scene: the mask is the class of the topmost object
    covering ≥ half a pixel, fully covered pixels show that object's texture exactly, and
    occlusion really happens (objects lose drawn area to later ones)."""
    occluded_scenes = 0
    for seed, scene in zip(SEEDS, scenes):
        _, layers = _scene(seed, SIZE, 6)
        expected = np.zeros((SIZE, SIZE), np.uint8)
        top = np.full((SIZE, SIZE), -1)  # index of the topmost layer touching the pixel
        drawn, lost = 0, 0
        for index, layer in enumerate(layers):
            y0, y1, x0, x1 = layer.box
            hard = layer.coverage * 2 >= _FULL
            expected[y0:y1, x0:x1][hard] = layer.cls
            top[y0:y1, x0:x1][layer.coverage > 0] = index
        np.testing.assert_array_equal(scene["mask"], expected)
        for index, layer in enumerate(layers):
            y0, y1, x0, x1 = layer.box
            hard = layer.coverage * 2 >= _FULL
            covered_later = (top[y0:y1, x0:x1] > index) & hard
            drawn += hard.sum()
            lost += (covered_later & (scene["mask"][y0:y1, x0:x1] != layer.cls)).sum()
            solid = (top[y0:y1, x0:x1] == index) & (layer.coverage == _FULL)
            np.testing.assert_array_equal(scene["image"][y0:y1, x0:x1][solid],
                                          layer.texture[solid])
        assert drawn >= (scene["mask"] > 0).sum()
        occluded_scenes += lost > 0
    assert occluded_scenes >= 8


def test_image_is_antialiased_but_mask_is_hard(scenes):
    """Where one object alone partly covers a pixel, the image blends its texture over the
    background by the coverage k/16; the mask there is the object's class iff k ≥ 8."""
    blended = 0
    for seed, scene in zip(range(4), scenes):
        background, layers = _scene(seed, SIZE, 6)
        touching = np.zeros((SIZE, SIZE), np.int32)
        for layer in layers:
            y0, y1, x0, x1 = layer.box
            touching[y0:y1, x0:x1] += layer.coverage > 0
        for layer in layers:
            y0, y1, x0, x1 = layer.box
            k = layer.coverage.astype(np.float64)
            alone = (touching[y0:y1, x0:x1] == 1) & (k > 0) & (k < _FULL)
            under = background[y0:y1, x0:x1][alone].astype(np.float64)
            over = layer.texture[alone].astype(np.float64)
            expected = under + (k[alone] / _FULL)[:, None] * (over - under)
            image = scene["image"][y0:y1, x0:x1][alone].astype(np.float64)
            np.testing.assert_allclose(image, expected, atol=0.51)
            blended += int((np.abs(over - under).max(axis=1) > 8).sum())
            hard = scene["mask"][y0:y1, x0:x1][alone] == layer.cls
            np.testing.assert_array_equal(hard, k[alone] * 2 >= _FULL)
        assert set(np.unique(scene["mask"]).tolist()) <= set(range(6))
    assert blended > 200


def test_thin_parts_vanish_under_erosion(scenes):
    """Class 4 (branching sticks, ≤ 3 px wide) is removed by a 5×5 erosion; class 1
    (filled ellipses) mostly survives it."""
    kernel = np.ones((5, 5), np.uint8)
    totals = {1: [0, 0], 4: [0, 0]}
    for scene in scenes:
        for cls, counts in totals.items():
            region = (scene["mask"] == cls).astype(np.uint8)
            counts[0] += int(region.sum())
            counts[1] += int(cv2.erode(region, kernel).sum())
    assert totals[4][0] > 500 and totals[1][0] > 500
    assert totals[4][1] <= 0.1 * totals[4][0]
    assert totals[1][1] >= 0.4 * totals[1][0]


def test_scene_arguments_are_checked():
    for classes in (1, 22):
        with pytest.raises(ValueError, match=r"classes in 2\.\.21"):
            synthesize_scene(0, 64, classes)
    with pytest.raises(ValueError, match="at least 32"):
        synthesize_scene(0, 31)
    with pytest.raises(ValueError, match=r"classes in 2\.\.21"):
        SyntheticSegmentation("train", 2, 64, classes=0)


def test_split_seeds_are_disjoint_and_dataset_pickles():
    train = SyntheticSegmentation("train", 2, 64, classes=6)
    test = SyntheticSegmentation("test", 2, 64, classes=6)
    a, b = train[0], test[0]
    assert a["name"] == "scene_0" and b["name"] == f"scene_{split_seed('test', 0)}"
    assert not np.array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(b["mask"], synthesize_scene(10_000_000, 64, 6)["mask"])
    again = pickle.loads(pickle.dumps(test))  # DataLoader workers need this
    np.testing.assert_array_equal(again[1]["image"], test[1]["image"])
    assert len(train) == 2


# ---------------------------------------------------------------- folders and files


def test_synthetic_folder_reads_back_bit_identically(tmp_path):
    out = write_synthetic_folder(tmp_path / "syn", 3, 64, seed0=2, split="test", classes=6)
    assert out == tmp_path / "syn"
    assert cv2.imread(str(out / "mask" / "00000.png"), cv2.IMREAD_UNCHANGED).shape == (64, 64, 3)
    data = FolderSegmentation(out, classes=6)
    assert len(data) == 3
    for i in range(3):
        expected = synthesize_scene(split_seed("test", 2 + i), 64, 6)
        item = data[i]
        assert item["name"] == f"{i:05d}"
        np.testing.assert_array_equal(item["image"], expected["image"])
        np.testing.assert_array_equal(item["mask"], expected["mask"])
    sheet = read_image(out / "contact_sheet.png")
    assert sheet.shape == (128, 3 * 256, 3)
    first = synthesize_scene(split_seed("test", 2), 64, 6)

    def grow(a):
        return cv2.resize(a, (128, 128), interpolation=cv2.INTER_NEAREST)

    np.testing.assert_array_equal(sheet[:, :128], grow(first["image"]))
    np.testing.assert_array_equal(sheet[:, 128:256], grow(colourise(first["mask"])))


def test_read_mask_index_and_colour_pngs(tmp_path):
    mask = _labels(2)
    write_gray(tmp_path / "index.png", mask)
    np.testing.assert_array_equal(read_mask(tmp_path / "index.png", 21), mask)
    write_mask(tmp_path / "colour.png", mask)
    stored = cv2.imread(str(tmp_path / "colour.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(stored[..., ::-1], colourise(mask))  # viewable VOC colours
    np.testing.assert_array_equal(read_mask(tmp_path / "colour.png", 21), mask)
    rgba = cv2.cvtColor(stored, cv2.COLOR_BGR2BGRA)
    rgba[..., 3] = 7
    cv2.imwrite(str(tmp_path / "rgba.png"), rgba)
    np.testing.assert_array_equal(read_mask(tmp_path / "rgba.png", 21), mask)


def test_read_mask_palette_png_from_pillow(tmp_path):
    image_module = pytest.importorskip(
        "PIL.Image", reason="Pillow is needed to write palette-mode PNGs like VOC's"
    )
    mask = _labels(3)
    picture = image_module.fromarray(mask, mode="P")
    picture.putpalette(voc_palette().ravel().tolist())
    picture.save(tmp_path / "voc.png")
    picture.save(tmp_path / "voc_transparent.png", transparency=255)
    with image_module.open(tmp_path / "voc.png") as check:
        assert check.mode == "P"
    for name in ("voc.png", "voc_transparent.png"):
        np.testing.assert_array_equal(read_mask(tmp_path / name, 21), mask)


def test_read_mask_rejects_bad_values_and_files(tmp_path):
    mask = np.zeros((8, 8), np.uint8)
    mask[0, :4] = (5, 6, 9, 255)
    write_gray(tmp_path / "big.png", mask)
    with pytest.raises(ValueError) as error:
        read_mask(tmp_path / "big.png", 6)
    text = str(error.value)
    assert str(tmp_path / "big.png") in text and "{6, 9}" in text and "classes is 6" in text
    assert "data.classes" in text
    np.testing.assert_array_equal(read_mask(tmp_path / "big.png", 10), mask)

    colours = colourise(np.zeros((8, 8), np.uint8))
    colours[3, 3] = (10, 20, 30)
    write_image(tmp_path / "odd.png", colours)
    with pytest.raises(ValueError, match=r"odd\.png.*\(10, 20, 30\)"):
        read_mask(tmp_path / "odd.png", 6)

    cv2.imwrite(str(tmp_path / "deep.png"), np.zeros((4, 4), np.uint16))
    with pytest.raises(ValueError, match=r"deep\.png.*uint16"):
        read_mask(tmp_path / "deep.png", 6)

    (tmp_path / "garbage.png").write_bytes(b"this is not a png at all")
    with pytest.raises(ValueError, match=r"could not decode.*garbage\.png"):
        read_mask(tmp_path / "garbage.png", 6)

    write_image(tmp_path / "lossy.jpg", colours)
    with pytest.raises(ValueError, match=r"lossy\.jpg.*PNG"):
        read_mask(tmp_path / "lossy.jpg", 6)
    with pytest.raises(ValueError, match="1..255"):
        read_mask(tmp_path / "big.png", 256)


def _folder(root: Path, stems=("a", "b"), size=(32, 32), mask_size=None) -> Path:
    for stem in stems:
        write_image(root / "image" / f"{stem}.png", np.zeros((*size, 3), np.uint8))
        write_mask(root / "mask" / f"{stem}.png", np.ones(mask_size or size, np.uint8))
    return root


def test_folder_dataset_errors(tmp_path):
    root = _folder(tmp_path / "ok")
    item = FolderSegmentation(root, 3, transform=EvalTransform())[1]
    assert item["name"] == "b" and item["mask"].dtype == torch.int64
    assert (item["mask"] == 1).all()

    (root / "mask" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"mask/b\..*image/b\.png"):
        FolderSegmentation(root, 3)

    (tmp_path / "empty" / "image").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        FolderSegmentation(tmp_path / "empty", 3)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FolderSegmentation(tmp_path / "nowhere", 3)
    no_masks = tmp_path / "no_masks"
    write_image(no_masks / "image" / "a.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match="mask"):
        FolderSegmentation(no_masks, 3)

    corrupt = _folder(tmp_path / "corrupt", stems=("a",))
    (corrupt / "mask" / "a.png").write_bytes(b"\x89PNG garbage")
    data = FolderSegmentation(corrupt, 3)
    with pytest.raises(ValueError, match=r"could not decode.*mask/a\.png"):
        data[0]

    jpeg = _folder(tmp_path / "jpeg", stems=("a",))
    (jpeg / "mask" / "a.png").rename(jpeg / "mask" / "a.jpg")
    with pytest.raises(ValueError, match=r"a\.jpg is not a PNG"):
        FolderSegmentation(jpeg, 3)


def test_folder_size_mismatch_names_both_files(tmp_path):
    root = _folder(tmp_path, stems=("a",), size=(32, 40), mask_size=(30, 40))
    with pytest.raises(ValueError) as error:
        FolderSegmentation(root, 3)[0]
    text = str(error.value)
    assert str(root / "image" / "a.png") in text and str(root / "mask" / "a.png") in text
    assert "40×32" in text and "40×30" in text


# ---------------------------------------------------------------- transforms


def test_train_transform_shapes_and_determinism():
    samples = [_sample(96, 80, seed) for seed in range(4)]
    first = [TrainTransform(48, seed=3)(s) for s in samples]
    second = [TrainTransform(48, seed=3)(s) for s in samples]
    other = [TrainTransform(48, seed=4)(s) for s in samples]
    for a, b, s in zip(first, second, samples):
        assert a["image"].shape == (3, 48, 48) and a["image"].dtype == torch.float32
        assert a["mask"].shape == (48, 48) and a["mask"].dtype == torch.int64
        assert 0 <= a["image"].min() and a["image"].max() <= 1
        assert a["name"] == s["name"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert any(not torch.equal(a["image"], c["image"]) for a, c in zip(first, other))
    with pytest.raises(ValueError, match="scale_range"):
        TrainTransform(48, scale_range=(2.0, 1.0))


def test_train_transform_pads_with_ignore():
    sample = _sample(64, 64)
    flips = set()
    for seed in range(6):
        out = TrainTransform(128, scale_range=(1.0, 1.0), seed=seed)(sample)
        mask, image = out["mask"].numpy(), out["image"].numpy()
        flipped = bool(image[1, 0, 127] < image[1, 0, 64])  # the ramp runs right to left
        flips.add(flipped)
        if flipped:  # the padding is on the left
            mask, image = mask[:, ::-1], image[:, :, ::-1]
        np.testing.assert_array_equal(mask[:64, :64], sample["mask"])
        assert (mask[64:] == IGNORE_INDEX).all() and (mask[:, 64:] == IGNORE_INDEX).all()
        assert (image[:, 64:] == 0).all() and (image[:, :, 64:] == 0).all()
        assert (mask == IGNORE_INDEX).sum() == 128 * 128 - 64 * 64
    assert flips == {True, False}


def test_train_transform_scale_two_is_exact():
    sample = _sample(64, 64, seed=5)
    flips = set()
    for seed in range(6):
        out = TrainTransform(128, scale_range=(2.0, 2.0), seed=seed)(sample)
        mask = out["mask"].numpy()
        image = np.rint(out["image"].numpy().transpose(1, 2, 0) * 255).astype(np.uint8)
        flipped = image[0, 0, 1] > image[0, -1, 1]
        flips.add(flipped)
        if flipped:
            mask, image = mask[:, ::-1], image[:, ::-1]
        np.testing.assert_array_equal(mask, np.kron(sample["mask"], np.ones((2, 2), np.uint8)))
        np.testing.assert_array_equal(
            image, cv2.resize(sample["image"], (128, 128), interpolation=cv2.INTER_LINEAR)
        )
    assert flips == {True, False}


def test_train_transform_keeps_image_and_mask_aligned():
    """Random scale, crop and flip: wherever the mask is constant over a 3×3 neighbourhood,
    the red channel still says the label (bright exactly on class 1)."""
    flips, checked = set(), 0
    kernel = np.ones((3, 3), np.uint8)
    for seed in range(16):
        sample = _sample(96, 112, seed)
        out = TrainTransform(64, scale_range=(0.5, 2.0), seed=seed)(sample)
        mask = out["mask"].numpy()
        red, green = out["image"][0].numpy(), out["image"][1].numpy()
        labelled = mask != IGNORE_INDEX
        ones = (mask == 1).astype(np.uint8)
        interior = labelled & (cv2.erode(ones, kernel) == cv2.dilate(ones, kernel))
        interior &= cv2.erode(labelled.astype(np.uint8), kernel).astype(bool)
        np.testing.assert_array_equal(red[interior] > 0.5, mask[interior] == 1)
        checked += int(interior.sum())
        rows = np.flatnonzero(labelled.all(axis=1))
        if rows.size:
            row = green[rows[0]][labelled[rows[0]]]
            flips.add(bool(row[0] > row[-1]))
    assert checked > 16 * 64 * 64 * 0.3
    assert flips == {True, False}


def test_eval_transform_is_exact():
    sample = _sample(40, 56, seed=1)
    sample["mask"][0, 0] = IGNORE_INDEX
    out = EvalTransform()(sample)
    expected = torch.from_numpy(sample["image"]).permute(2, 0, 1).float() / 255
    assert out["image"].dtype == torch.float32 and torch.equal(out["image"], expected)
    assert out["mask"].dtype == torch.int64
    assert torch.equal(out["mask"], torch.from_numpy(sample["mask"]).long())
    assert out["mask"][0, 0] == IGNORE_INDEX and out["name"] == "blocks_1"
