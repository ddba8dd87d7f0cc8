"""Natural-photo backgrounds of the synthetic matting generator (kdkit.data.photos)."""

import hashlib
import subprocess
import sys

import cv2
import numpy as np
import pytest

from kdkit.config import ConfigError
from kdkit.data import split_seed
from kdkit.data.photos import BUNDLED, TEST_PHOTOS, photo_sources
from kdkit.errors import DataError
from tasks.matting.data import SyntheticMatting, synthesize, write_synthetic_folder
from tasks.matting.task import _checked_data

#: sha256 of image, fg, bg, alpha, trimap of ``synthesize(seed, 64)`` before natural photos
#: existed (kdkit 3d706f7); ``backgrounds="procedural"`` must reproduce them bit for bit.
PROCEDURAL_HASHES = {
    0: "364ea4c2df6e8273edd8bb5102cabc7cd24c82dd308e6fb313e6e9929914678e",
    1: "0bf253e6492e9460032094a7c597502c63e9d9c85002390de63489a823c12435",
    7: "e7eaf81d3db38bb5dfbc9ff50fff61de19d6bdb4cc52299ae041e480e4c190d6",
    10_000_003: "3217d5225df622b7a2e287384127a3d445eae5217bc7edf850c35d3af9b86029",
}
ARRAYS = ("image", "fg", "bg", "alpha", "trimap")


def _digest(sample: dict) -> str:
    h = hashlib.sha256()
    for key in ARRAYS:
        h.update(np.ascontiguousarray(sample[key]).tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("seed", sorted(PROCEDURAL_HASHES))
def test_procedural_equals_the_generator_before_photos(seed):
    assert _digest(synthesize(seed, 64, backgrounds="procedural")) == PROCEDURAL_HASHES[seed]


def test_natural_is_deterministic_by_seed():
    a, b, c = (synthesize(s, 64) for s in (5, 5, 6))
    assert _digest(a) == _digest(b) and a["bg_source"] == b["bg_source"]
    assert _digest(a) != _digest(c)


def test_splits_draw_only_their_own_photos():
    train = [synthesize(split_seed("train", i), 48) for i in range(40)]
    test = [synthesize(split_seed("test", i), 48) for i in range(40)]
    names = {p.name for p in BUNDLED}
    used = {split: {s[key] for s in samples for key in ("bg_source", "fg_source")} - {
        "procedural"} for split, samples in (("train", train), ("test", test))}
    assert used["test"] <= set(TEST_PHOTOS) and len(used["test"]) >= 2
    assert used["train"] <= names - set(TEST_PHOTOS) and len(used["train"]) >= 5
    fg = [s["fg_source"] for s in train]
    assert 0.2 < fg.count("procedural") / len(fg) < 0.8  # photo colours about half the time
    assert all(s["fg_source"] != s["bg_source"] for s in train)


def test_bundled_photos_come_from_the_package_without_pooch():
    code = ("import sys; from kdkit.data.photos import photo_sources, photo_pyramid\n"
            "for split in ('train', 'test'):\n"
            "    for name, path in photo_sources('natural', split):\n"
            "        assert '/skimage/data/' in path, path\n"
            "        assert photo_pyramid(path)[0].ndim == 3\n"
            "assert 'pooch' not in sys.modules and 'skimage' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert len(photo_sources("natural", "train")) + len(TEST_PHOTOS) == len(BUNDLED)


@pytest.mark.parametrize("backgrounds", ["natural", "procedural"])
def test_compositing_stays_exact(backgrounds):
    for seed in (3, 10_000_001):
        s = synthesize(seed, 64, backgrounds=backgrounds)
        k = np.rint(s["alpha"] * 255).astype(np.int64)[..., None]
        np.testing.assert_array_equal((k / 255).astype(np.float32), s["alpha"][..., None])
        exact = (k * s["fg"] + (255 - k) * s["bg"] + 127) // 255
        np.testing.assert_array_equal(s["image"], exact)


def _photos(folder, n=3):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        cv2.imwrite(str(folder / f"p{i}.png"), rng.integers(0, 256, (40 + 8 * i, 60, 3),
                                                           dtype=np.uint8))
    return folder


def test_a_folder_of_photos_splits_by_sorted_name(tmp_path):
    folder = str(_photos(tmp_path / "mine"))
    assert [n for n, _ in photo_sources(folder, "test")] == ["p0.png"]
    assert [n for n, _ in photo_sources(folder, "train")] == ["p1.png", "p2.png"]
    test = SyntheticMatting("test", 6, 48, backgrounds=folder)
    train = SyntheticMatting("train", 6, 48, backgrounds=folder)
    assert {test[i]["bg_source"] for i in range(6)} == {"p0.png"}
    assert {train[i]["bg_source"] for i in range(6)} <= {"p1.png", "p2.png"}
    out = write_synthetic_folder(tmp_path / "out", 2, 48, backgrounds=folder)
    assert len(list((out / "bg").iterdir())) == 2


def test_folder_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match="nowhere.*not a folder"):
        SyntheticMatting("train", 2, 48, backgrounds=str(tmp_path / "nowhere"))
    one = _photos(tmp_path / "one", 1)
    with pytest.raises(DataError, match=f"{one}.*at least 2"):
        SyntheticMatting("train", 2, 48, backgrounds=str(one))
    bad = _photos(tmp_path / "bad", 2)
    (bad / "p1.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="p1.png.*expected a readable PNG or JPEG"):
        synthesize(0, 48, backgrounds=str(bad))


def test_the_config_option_is_checked(tmp_path):
    assert _checked_data({}).backgrounds == "natural"
    assert _checked_data({"backgrounds": str(tmp_path)}).backgrounds == str(tmp_path)
    with pytest.raises(ConfigError, match="data.backgrounds.*Did you mean 'natural'"):
        _checked_data({"backgrounds": "natrual"})
