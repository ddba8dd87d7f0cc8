"""The matting task's data side: synthetic samples, trimaps, folder datasets, transforms."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from kdkit.errors import DataError
from tasks.matting.data import (
    Composition1kMatting,
    EvalTransform,
    ImageFolderMatting,
    SyntheticMatting,
    TrainTransform,
    eval_trimap,
    normalise_trimap,
    random_trimap,
    read_trimap,
    split_seed,
    synthesize,
    write_synthetic_folder,
)

LEMUR_TRIMAP = Path("/work/shared/data/lemur/lemur_trimap.png")
SIZE = 128


@pytest.fixture(scope="module")
def samples():
    """The procedural generator's samples (its fg and bg share a palette; the alpha
    generator is the same with natural backgrounds, which only draw other seeds' shapes)."""
    return [synthesize(seed, SIZE, backgrounds="procedural") for seed in range(3)]


def _write_rgb(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def _write_gray(path: Path, gray: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), gray)


def _colour_histogram(pixels: np.ndarray) -> np.ndarray:
    """Normalised 8×8×8-bin RGB histogram of ``N×3`` uint8 pixels."""
    q = (pixels // 32).astype(np.int64)
    counts = np.bincount(q[:, 0] * 64 + q[:, 1] * 8 + q[:, 2], minlength=512)
    return counts / counts.sum()


# ---------------------------------------------------------------- synthetic samples


def test_synthesize_is_deterministic_by_seed():
    a, b, c = synthesize(7, 64), synthesize(7, 64), synthesize(8, 64)
    for key in ("image", "fg", "bg", "alpha", "trimap"):
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["image"], c["image"])
    assert not np.array_equal(a["alpha"], c["alpha"])


def test_synthetic_sample_format(samples):
    s = samples[0]
    for key in ("image", "fg", "bg"):
        assert s[key].shape == (SIZE, SIZE, 3) and s[key].dtype == np.uint8
    assert s["alpha"].shape == (SIZE, SIZE) and s["alpha"].dtype == np.float32
    assert s["trimap"].shape == (SIZE, SIZE) and s["trimap"].dtype == np.uint8
    assert set(np.unique(s["trimap"])) == {0, 128, 255}
    assert s["name"] == "synthetic_0"
    # alpha is a multiple of 1/255, so an 8-bit PNG stores it exactly
    k = s["alpha"] * 255
    np.testing.assert_allclose(k, np.rint(k), atol=1e-4)
    assert set(np.unique(synthesize(0, SIZE, unknown_value=100)["trimap"])) == {0, 100, 255}


def test_split_seeds_are_disjoint():
    assert [split_seed("train", i) for i in range(3)] == [0, 1, 2]
    assert split_seed("test", 0) == 10_000_000
    train, test = SyntheticMatting("train", 4, 64), SyntheticMatting("test", 4, 64)
    assert len(train) == 4
    np.testing.assert_array_equal(test[1]["image"], synthesize(10_000_001, 64)["image"])
    train_names = {train[i]["name"] for i in range(4)}
    test_names = {test[i]["name"] for i in range(4)}
    assert not train_names & test_names
    assert not np.array_equal(train[0]["image"], test[0]["image"])
    with pytest.raises(ValueError, match="unknown split 'val'"):
        SyntheticMatting("val", 4)
    with pytest.raises(ValueError, match="disjoint"):
        SyntheticMatting("train", 10_000_001)
    with pytest.raises(IndexError):
        train[4]


def test_synthetic_alpha_is_truly_fractional(samples):
    for s in samples:
        alpha, unknown = s["alpha"], s["trimap"] == 128
        fractional = (alpha > 0) & (alpha < 1)
        assert fractional[unknown].mean() > 0.4  # most of the unknown band is fractional
        assert ((alpha >= 0.1) & (alpha <= 0.9)).sum() > 500  # veil, blurred edges
        assert (alpha == 1).sum() > 300 and (alpha == 0).sum() > 5000


def test_synthetic_sample_has_a_semi_transparent_region(samples):
    """A veil: a region at least 7 px across (not just a blurred edge) with 0.1 <= α <= 0.9."""
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7))
    for s in samples:
        partial = ((s["alpha"] >= 0.1) & (s["alpha"] <= 0.9)).astype(np.uint8)
        assert cv2.erode(partial, kernel).sum() >= 200


def test_synthetic_sample_has_subpixel_strands(samples):
    """Strands are 1-pixel ridges whose peak alpha stays below 0.5 (sub-pixel coverage)."""
    for s in samples:
        p = np.pad(s["alpha"], 1)
        c = p[1:-1, 1:-1]
        across_x = c - np.maximum(p[1:-1, :-2], p[1:-1, 2:]) > 0.1
        across_y = c - np.maximum(p[:-2, 1:-1], p[2:, 1:-1]) > 0.1
        ridges = (c > 0) & (c < 0.5) & (across_x | across_y)
        assert ridges.sum() >= 30


def test_fur_is_dense_at_the_body_and_single_strands_at_the_tips():
    """Fur's strands overlap into coverage above one half near the body, where hair's stay
    apart, and both end in sub-pixel strands."""
    from tasks.matting.data.synthetic import _ellipses, _strand_alpha

    for seed in range(5):
        rng = np.random.default_rng(seed)
        ellipses = _ellipses(rng, 96)
        hair, fur = (_strand_alpha(np.random.default_rng(seed), 96, ellipses, dense)
                     for dense in (False, True))
        assert (fur >= 0.5).sum() > 5 * (hair >= 0.5).sum()
        assert fur.sum() > 2 * hair.sum()
        for alpha in (hair, fur):
            assert ((alpha > 0) & (alpha < 0.3)).sum() > 100


def test_synthetic_fg_and_bg_share_colours(samples):
    overlaps = []
    for s in samples:
        fg_pixels = s["image"][s["alpha"] == 1]
        bg_pixels = s["image"][s["alpha"] == 0]
        overlap = np.minimum(_colour_histogram(fg_pixels), _colour_histogram(bg_pixels)).sum()
        overlaps.append(overlap)
    assert min(overlaps) > 0.15 and np.mean(overlaps) > 0.3, overlaps


def test_synthetic_compositing_is_exact(samples):
    for s in samples:
        a = s["alpha"].astype(np.float64)[..., None]
        expected = np.rint(a * s["fg"] + (1 - a) * s["bg"])
        np.testing.assert_array_equal(s["image"], expected.astype(np.uint8))


def test_synthetic_trimap_is_the_evaluation_trimap(samples):
    for s in samples:
        alpha, trimap = s["alpha"], s["trimap"]
        np.testing.assert_array_equal(trimap, eval_trimap(alpha, radius=2))
        assert np.all(alpha[trimap == 255] == 1) and np.all(alpha[trimap == 0] == 0)
        assert np.all(trimap[(alpha > 0) & (alpha < 1)] == 128)


# ---------------------------------------------------------------- trimaps


def _disc_alpha() -> np.ndarray:
    """64×64: a definite-foreground square with a fractional border, the rest background."""
    alpha = np.zeros((64, 64), np.float32)
    alpha[20:44, 20:44] = 0.5
    alpha[22:42, 22:42] = 1.0
    return alpha


def test_eval_trimap_values_and_dilation():
    alpha = _disc_alpha()
    exact = eval_trimap(alpha, radius=0, unknown_value=100)
    np.testing.assert_array_equal(exact == 255, alpha == 1)
    np.testing.assert_array_equal(exact == 0, alpha == 0)
    np.testing.assert_array_equal(exact == 100, alpha == 0.5)
    dilated = eval_trimap(alpha, radius=3)
    row = dilated[32]  # the fractional border spans columns 20-21 and 42-43
    assert list(row[16:20]) == [0, 128, 128, 128]  # 3 px out into the background
    assert list(row[22:26]) == [128, 128, 128, 255]  # 3 px into the foreground
    assert set(np.unique(dilated)) == {0, 128, 255}


def test_random_trimap_erosion_only_shrinks_definite_regions():
    alpha = _disc_alpha()
    base = eval_trimap(alpha, radius=0)
    np.testing.assert_array_equal(
        random_trimap(alpha, np.random.default_rng(0), kernel_range=(1, 1)), base
    )
    sizes = set()
    for seed in range(6):
        trimap = random_trimap(alpha, np.random.default_rng(seed))
        assert set(np.unique(trimap)) <= {0, 128, 255}
        assert np.all(alpha[trimap == 255] == 1) and np.all(alpha[trimap == 0] == 0)
        assert np.all(trimap[alpha == 0.5] == 128)
        sizes.add(int((trimap == 128).sum()))
        again = random_trimap(alpha, np.random.default_rng(seed))
        np.testing.assert_array_equal(trimap, again)
    assert len(sizes) > 1  # the kernels are random
    eroded = random_trimap(alpha, np.random.default_rng(0), kernel_range=(15, 15))
    assert (eroded == 255).sum() < (base == 255).sum()
    assert (eroded == 0).sum() < (base == 0).sum()
    assert (eroded == 255).sum() > 0


def test_normalise_trimap_keeps_the_dataset_convention():
    trimap = np.array([[0, 102], [255, 102]], np.uint8)
    rgba = np.dstack([trimap, trimap, trimap, np.full_like(trimap, 255)])
    out = normalise_trimap(rgba, unknown_value=102)
    assert out.shape == (2, 2) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, trimap)
    with pytest.raises(DataError, match=r"\{102\}.*set data.unknown_value: 102 in the config "
                                        r"\(or --set data.unknown_value=102\)"):
        normalise_trimap(trimap)
    with pytest.raises(ValueError, match="7, 9"):
        normalise_trimap(np.array([[0, 7, 9, 128]], np.uint8))
    with pytest.raises(DataError, match=r"data.unknown_value must be an integer in 1\.\.254"):
        normalise_trimap(trimap, unknown_value=255)


def test_lemur_trimap_needs_its_unknown_value():
    if not LEMUR_TRIMAP.is_file():
        pytest.skip(f"{LEMUR_TRIMAP} is not present on this machine")
    trimap = read_trimap(LEMUR_TRIMAP, unknown_value=102)
    assert trimap.shape == (440, 680) and trimap.dtype == np.uint8
    assert set(np.unique(trimap)) == {0, 102, 255}
    with pytest.raises(DataError, match=r"lemur_trimap\.png.*102.*--set data.unknown_value=102"):
        read_trimap(LEMUR_TRIMAP)


# ---------------------------------------------------------------- Composition-1k


def _gradient(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = rng.integers(0, 60, size=3)
    return ((base + 3 * x[..., None] + 2 * y[..., None]) % 256).astype(np.uint8)


@pytest.fixture
def comp1k(tmp_path):
    """2 foregrounds (40×30 and 24×36), 2 backgrounds: one smaller than its foreground
    (must be scaled up to cover), one larger (only cropped)."""
    root = tmp_path / "comp1k"
    rng = np.random.default_rng(0)
    data = {}
    for name, (h, w) in (("a.png", (40, 30)), ("b.png", (24, 36))):
        fg = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        alpha = rng.integers(0, 256, size=(h, w), dtype=np.uint8)
        alpha[:4], alpha[-4:] = 0, 255
        trimap = np.where(alpha == 0, 0, np.where(alpha == 255, 255, 128)).astype(np.uint8)
        _write_rgb(root / "fg" / name, fg)
        _write_gray(root / "alpha" / name, alpha)
        _write_gray(root / "trimaps" / name, trimap)
        data[name] = (fg, alpha, trimap)
    backgrounds = {"small.png": _gradient(10, 16, 1), "large.png": _gradient(60, 70, 2)}
    for name, bg in backgrounds.items():
        _write_rgb(root / "bg" / name, bg)
    (root / "bg_names.txt").write_text("small.png\nlarge.png\n")
    return root, data, backgrounds


def _official_composite(fg: np.ndarray, bg: np.ndarray, alpha8: np.ndarray) -> np.ndarray:
    """The official script's per-pixel loop, verbatim arithmetic in Python floats."""
    out = np.empty_like(fg)
    for y in range(fg.shape[0]):
        for x in range(fg.shape[1]):
            a = int(alpha8[y, x]) / 255
            for c in range(3):
                t, t2 = int(fg[y, x, c]), int(bg[y, x, c])
                out[y, x, c] = t if a >= 1 else int(a * t + (1 - a) * t2) if a > 0 else t2
    return out


def test_composition1k_composites_with_the_official_rule(comp1k):
    root, data, backgrounds = comp1k
    dataset = Composition1kMatting(root, split="test", bg_per_fg=1)
    assert len(dataset) == 2
    for index, (fg_name, bg_name) in enumerate((("a.png", "small.png"), ("b.png", "large.png"))):
        fg, alpha8, trimap = data[fg_name]
        h, w = alpha8.shape
        sample = dataset[index]
        assert sample["name"] == f"{fg_name[0]}_0"
        for key in ("image", "fg", "bg"):
            assert sample[key].shape == (h, w, 3) and sample[key].dtype == np.uint8
        assert sample["alpha"].dtype == np.float32 and sample["alpha"].shape == (h, w)
        np.testing.assert_array_equal(sample["trimap"], trimap)
        bg = backgrounds[bg_name]
        ratio = max(h / bg.shape[0], w / bg.shape[1])
        if ratio > 1:  # smaller background: bicubic scale to cover, then top-left crop
            size = (math.ceil(bg.shape[1] * ratio), math.ceil(bg.shape[0] * ratio))
            bg = cv2.resize(bg, size, interpolation=cv2.INTER_CUBIC)
        np.testing.assert_array_equal(sample["bg"], bg[:h, :w])
        np.testing.assert_array_equal(sample["image"], _official_composite(fg, bg, alpha8))
    assert backgrounds["small.png"].shape[0] < 40  # the first pair really was scaled up


def test_composition1k_train_split_draws_training_trimaps(comp1k):
    root, data, _ = comp1k
    a = Composition1kMatting(root, split="train", bg_per_fg=1, unknown_value=100)
    b = Composition1kMatting(root, split="train", bg_per_fg=1, unknown_value=100)
    alpha8 = data["a.png"][1]
    trimap = a[0]["trimap"]
    np.testing.assert_array_equal(trimap, b[0]["trimap"])
    assert set(np.unique(trimap)) <= {0, 100, 255}
    assert np.all(alpha8[trimap == 255] == 255) and np.all(alpha8[trimap == 0] == 0)
    with pytest.raises(ValueError, match="lists 2 backgrounds, expected 2 foregrounds"):
        Composition1kMatting(root, split="train", bg_per_fg=2)
    (root / "trimaps" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"trimaps/b\.png"):
        Composition1kMatting(root, split="test", bg_per_fg=1)


# ---------------------------------------------------------------- plain folders


def test_image_folder_matting_loads_a_plain_folder(tmp_path):
    image = np.empty((20, 30, 3), np.uint8)
    image[...] = (200, 50, 120)  # distinct channels: a BGR/RGB swap would show
    image[:, :, 1] += np.arange(30, dtype=np.uint8)
    alpha8 = np.zeros((20, 30), np.uint8)
    alpha8[5:15, 5:25] = 255
    alpha8[5:15, 5] = 77
    trimap = np.where(alpha8 == 255, 255, np.where(alpha8 == 0, 0, 102)).astype(np.uint8)
    _write_rgb(tmp_path / "image" / "p.jpg", image)
    _write_gray(tmp_path / "alpha" / "p.png", alpha8)
    _write_gray(tmp_path / "trimap" / "p.png", trimap)
    (tmp_path / "image" / "notes.txt").write_text("ignored: not an image suffix")

    sample = ImageFolderMatting(tmp_path, unknown_value=102)[0]
    assert sample["name"] == "p" and "fg" not in sample
    assert sample["image"].shape == (20, 30, 3) and sample["image"].dtype == np.uint8
    assert np.abs(sample["image"].astype(int) - image).mean() < 8  # JPEG, RGB order kept
    np.testing.assert_array_equal(sample["alpha"], alpha8.astype(np.float32) / 255)
    np.testing.assert_array_equal(sample["trimap"], trimap)
    with pytest.raises(ValueError, match=r"p\.png.*unknown_value=102"):
        ImageFolderMatting(tmp_path)[0]

    for path in (tmp_path / "trimap").iterdir():
        path.unlink()
    (tmp_path / "trimap").rmdir()
    made = ImageFolderMatting(tmp_path, trimap_radius=1)[0]["trimap"]
    np.testing.assert_array_equal(made, eval_trimap(alpha8.astype(np.float32) / 255, 1))


def test_write_synthetic_folder_round_trips(tmp_path):
    root = write_synthetic_folder(tmp_path / "syn", n=3, size=64, seed0=5, split="test")
    sheet = cv2.imread(str(root / "contact_sheet.png"))
    assert sheet is not None and sheet.shape == (128, 3 * 3 * 128, 3)
    dataset = ImageFolderMatting(root)
    assert len(dataset) == 3
    loaded = dataset[2]
    expected = synthesize(split_seed("test", 7), 64)
    assert loaded["name"] == "00002"
    for key in ("image", "fg", "bg", "alpha", "trimap"):
        assert loaded[key].dtype == expected[key].dtype
        np.testing.assert_array_equal(loaded[key], expected[key])


def test_folder_errors_name_the_file(tmp_path):
    root = write_synthetic_folder(tmp_path / "syn", n=3, size=32)
    (root / "alpha" / "00001.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"alpha/00001\..*image/00001\.png"):
        ImageFolderMatting(root)

    root = write_synthetic_folder(tmp_path / "syn2", n=2, size=32)
    (root / "image" / "00001.png").write_text("not a png")
    dataset = ImageFolderMatting(root)
    dataset[0]
    with pytest.raises(ValueError, match=r"image/00001\.png"):
        dataset[1]

    (root / "bg" / "00002.png").write_bytes((root / "bg" / "00000.png").read_bytes())
    with pytest.raises(ValueError, match=r"bg/00002\.png has no image"):
        ImageFolderMatting(root)

    (tmp_path / "empty" / "image").mkdir(parents=True)
    (tmp_path / "empty" / "alpha").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolderMatting(tmp_path / "empty")


# ---------------------------------------------------------------- transforms


def test_train_transform_outputs(samples):
    transform = TrainTransform(crop_sizes=(64, 96, 160), output_size=48, seed=0)
    for s in samples:
        out = transform(s)
        for key in ("image", "fg", "bg"):
            assert out[key].shape == (3, 48, 48) and out[key].dtype == torch.float32
            assert 0 <= out[key].min() and out[key].max() <= 1
        for key in ("alpha", "trimap"):
            assert out[key].shape == (1, 48, 48) and out[key].dtype == torch.float32
        assert 0 <= out["alpha"].min() and out["alpha"].max() <= 1
        assert set(out["trimap"].unique().tolist()) <= {0.0, 128.0, 255.0}
        assert (out["trimap"] == 128).any()
        assert out["name"] == s["name"]
    small = {"image": samples[0]["image"][:40, :50], "alpha": samples[0]["alpha"][:40, :50]}
    out = TrainTransform(crop_sizes=(64,), output_size=64, seed=0)(small)
    assert out["image"].shape == (3, 64, 64) and "fg" not in out  # padded up to the crop
    with pytest.raises(ValueError, match="needs an 'alpha'"):
        TrainTransform(seed=0)({"image": small["image"]})


def test_trimap_kernel_sets_the_training_trimaps_erosion():
    """``data.trimap_kernel: [1, 1]`` erodes nothing: the training trimap's unknown region
    is exactly the fractional alpha (no resize at one crop size); a reversed range is a
    config error naming the key."""
    from kdkit.errors import ConfigError
    from tasks.matting.task import MattingTask

    spec = {"kind": "synthetic", "train_length": 3, "test_length": 1, "size": 64,
            "crop_sizes": [64], "output_size": 64, "trimap_kernel": [1, 1]}
    narrow = MattingTask().datasets(spec)[0]
    for item in narrow:
        alpha, trimap = item["alpha"][0], item["trimap"][0]
        torch.testing.assert_close(trimap == 128, (alpha > 0) & (alpha < 1))
    wide = MattingTask().datasets({**spec, "trimap_kernel": [29, 30]})[0]
    assert (wide[0]["trimap"] == 128).sum() > (narrow[0]["trimap"] == 128).sum()
    with pytest.raises(ConfigError, match=r"data.trimap_kernel is \[low, high\].*\[5, 2\]"):
        MattingTask().datasets({**spec, "trimap_kernel": [5, 2]})


def test_train_crop_is_centred_on_an_unknown_pixel():
    alpha = np.zeros((200, 200), np.float32)
    alpha[95:105, 90:110] = 1.0
    alpha[94, 90:110] = 0.4  # the only fractional pixels
    image = np.zeros((200, 200, 3), np.uint8)
    transform = TrainTransform(crop_sizes=(65,), output_size=65, seed=3)
    for _ in range(10):  # odd size: the centre pixel stays the centre under the flip
        out = transform({"image": image, "alpha": alpha})
        assert out["trimap"][0, 32, 32] == 128


def test_train_transform_is_deterministic_and_flips():
    s = synthesize(11, 64)
    first, second = TrainTransform((64,), 64, seed=5), TrainTransform((64,), 64, seed=5)
    other = TrainTransform((64,), 64, seed=6)
    original = torch.from_numpy(s["image"].transpose(2, 0, 1).copy()).float() / 255
    flips, other_flips = [], []
    for _ in range(12):
        a, b = first(s), second(s)
        for key in ("image", "alpha", "trimap", "fg", "bg"):
            assert torch.equal(a[key], b[key])
        # the crop is the whole image, so the output is the image or its mirror
        if torch.equal(a["image"], original):
            flips.append(False)
        else:
            assert torch.equal(a["image"], original.flip(-1))
            flips.append(True)
        other_flips.append(not torch.equal(other(s)["image"], original))
    assert any(flips) and not all(flips)
    assert other_flips != flips


def test_eval_transform_and_dataset_hook():
    dataset = SyntheticMatting("test", 2, 64, transform=EvalTransform())
    out = dataset[0]
    raw = synthesize(split_seed("test", 0), 64)
    assert out["image"].shape == (3, 64, 64) and out["trimap"].shape == (1, 64, 64)
    assert torch.equal(out["image"], torch.from_numpy(raw["image"]).permute(2, 0, 1) / 255.0)
    assert torch.equal(out["trimap"][0], torch.from_numpy(raw["trimap"]).float())
    assert torch.equal(out["alpha"][0], torch.from_numpy(raw["alpha"]))
    with pytest.raises(ValueError, match="unknown_value=128"):
        EvalTransform(unknown_value=102)(raw)
