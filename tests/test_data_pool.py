"""The data pool (``data.pool``), lean matting batches (``data.fields``) and
``train.num_workers: auto``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from toy_task import ToyTask

import kdkit.data.pool as pool_module
import kdkit.data.workers as workers
from kdkit.checkpoint import load_checkpoint
from kdkit.config import ConfigError, run_config_from_mapping
from kdkit.data import SamplePool, SeededDataset, resolve_num_workers
from kdkit.distributed import World
from kdkit.errors import DataError
from kdkit.sampling import KeyedSamples
from kdkit.train import train
from kdkit.training import evaluation
from kdkit.training.run import training_data
from tasks.matting.task import MattingTask
from tasks.segmentation.task import SegmentationTask

MATTING = {"kind": "synthetic", "train_length": 12, "test_length": 2, "size": 48,
           "crop_sizes": [32, 48], "output_size": 32}
SEGMENTATION = {"kind": "synthetic", "train_length": 12, "test_length": 2, "size": 48,
                "crop_size": 32}


def _generate(seed: int) -> dict:
    """A toy sample: a uint8 image, a float32 alpha of multiples of 1/255, a name."""
    rng = np.random.default_rng(seed)
    k = rng.integers(0, 256, (4, 5), dtype=np.uint8)
    return {"image": rng.integers(0, 256, (4, 5, 3), dtype=np.uint8),
            "alpha": k.astype(np.float32) / np.float32(255), "name": f"s{seed}"}


def _assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == b[key].dtype and torch.equal(value, b[key]), key
        elif isinstance(value, np.ndarray):
            assert value.dtype == b[key].dtype and np.array_equal(value, b[key]), key
        else:
            assert value == b[key], key


@pytest.mark.parametrize("processes", [1, 2])
def test_pool_returns_the_generated_samples_bit_for_bit(processes):
    seeds = [3, 1, 4, 1, 5]
    pool = SamplePool.build(_generate, seeds, processes=processes, progress=False)
    assert len(pool) == 5 and pool.nbytes == 5 * (4 * 5 * 3 + 4 * 5)
    for j, seed in enumerate(seeds):
        _assert_same(pool[j], _generate(seed))
    pool[0]["image"][:] = 0  # a transform changing a sample in place leaves the pool as it was
    _assert_same(pool[0], _generate(3))


def test_pool_keeps_only_the_named_fields():
    pool = SamplePool.build(_generate, [0, 1], fields=["alpha"], processes=1, progress=False)
    assert set(pool[1]) == {"alpha", "name"}


def test_pool_refuses_fields_it_cannot_keep_exactly():
    def float64_alpha(seed):
        return {"alpha": np.full((2, 2), 0.5)}

    def unequal_sizes(seed):
        return {"image": np.zeros((2 + seed, 2), np.uint8)}

    def half_alpha(seed):  # 0.5 is no multiple of 1/255
        return {"alpha": np.full((2, 2), 0.5, np.float32)}

    with pytest.raises(DataError, match="'alpha' is float64"):
        SamplePool.build(float64_alpha, [0], processes=1, progress=False)
    with pytest.raises(DataError, match="'alpha' is float32 and does not fit"):
        SamplePool.build(half_alpha, [0], processes=1, progress=False)
    with pytest.raises(DataError, match="one size; seed 1's 'image'"):
        SamplePool.build(unequal_sizes, [0, 1], processes=1, progress=False)


def test_a_full_pool_equals_the_dataset_without_one():
    plain = SeededDataset(_generate, "train", 6)
    pooled = SeededDataset(_generate, "train", 6, pool=6)
    for i in range(6):
        _assert_same(pooled[i], plain[i])


def test_a_small_pool_cycles_through_its_samples():
    pooled = SeededDataset(_generate, "train", 6, pool=2)
    assert [pooled[i]["name"] for i in range(6)] == ["s0", "s1"] * 3
    with pytest.raises(DataError, match=r"data.pool must be 1..6"):
        SeededDataset(_generate, "train", 6, pool=7)


@pytest.mark.parametrize("task, spec", [(MattingTask(), MATTING),
                                        (SegmentationTask(), SEGMENTATION)])
def test_pooled_training_views_are_keyed_per_sample(task, spec):
    """The same (seed, epoch, index) gives the same view, with or without a pool of the
    whole set; with a smaller pool, a reused scene gets a new view."""
    plain = KeyedSamples(task.datasets(spec)[0], seed=5)
    pooled = KeyedSamples(task.datasets({**spec, "pool": 12})[0], seed=5)
    for key in [(0, 0), (0, 11), (3, 4)]:
        _assert_same(pooled[key], plain[key])
    small = KeyedSamples(task.datasets({**spec, "pool": 4})[0], seed=5)
    _assert_same(small[(1, 2)], plain[(1, 2)])
    assert small[(1, 6)]["name"] == small[(1, 2)]["name"]
    assert not torch.equal(small[(1, 6)]["image"], small[(1, 2)]["image"])


def test_keyed_samples_prepare_the_pool_before_the_workers_start():
    dataset = MattingTask().datasets({**MATTING, "pool": 3})[0]
    assert dataset.sample_pool is None  # evaluation-only callers never make it
    KeyedSamples(dataset, seed=0)
    assert dataset.sample_pool is not None and len(dataset.sample_pool) == 3


def test_pool_is_for_synthetic_data_only(tmp_path):
    with pytest.raises(ConfigError, match="data.pool applies to synthetic data"):
        MattingTask().datasets({"kind": "folder", "root": str(tmp_path),
                                "test_root": str(tmp_path), "pool": 4})
    with pytest.raises(ConfigError, match="data.pool applies to synthetic data"):
        SegmentationTask().datasets({"kind": "folder", "root": str(tmp_path),
                                     "test_root": str(tmp_path), "pool": 4})
    with pytest.raises(ConfigError, match=r"data.pool: expected a number >= 1"):
        MattingTask().datasets({**MATTING, "pool": 0})


def test_matting_batches_leave_out_what_data_fields_leaves_out():
    lean_spec = {**MATTING, "fields": ["image", "alpha", "trimap"]}
    for pool in (None, 12):
        full = MattingTask().datasets(MATTING)[0]  # fresh: a repeated key continues its draws
        lean, lean_test = MattingTask().datasets({**lean_spec, "pool": pool})
        a, b = KeyedSamples(full, 1)[(0, 3)], KeyedSamples(lean, 1)[(0, 3)]
        assert {"fg", "bg"} <= set(a) and not {"fg", "bg"} & set(b)
        _assert_same(b, {k: v for k, v in a.items() if k not in ("fg", "bg")})
    assert not {"fg", "bg"} & set(lean_test[0])
    with pytest.raises(ConfigError, match="data.fields must hold image, alpha, trimap.*add "
                                          "trimap"):
        MattingTask().datasets({**MATTING, "fields": ["image", "alpha"]})
    with pytest.raises(ConfigError, match=r"data.fields\[3\]: unknown .*'foreground'.*fg, bg"):
        MattingTask().datasets({**MATTING, "fields": ["image", "alpha", "trimap", "foreground"]})


def test_the_composition_loss_without_fg_says_to_add_them_to_data_fields():
    train, _ = MattingTask().datasets({**MATTING, "fields": ["image", "alpha", "trimap"]})
    batch = torch.utils.data.default_collate([KeyedSamples(train, 0)[(0, 0)]])
    prediction = torch.rand(1, 1, 32, 32)
    with pytest.raises(ConfigError, match="both in data.fields"):
        MattingTask().losses(prediction, batch, None, {"alpha": 0.5, "composition": 0.5})


def test_num_workers_auto_uses_the_cores_but_one(monkeypatch):
    monkeypatch.setattr(workers, "usable_cores", lambda: 16)
    assert resolve_num_workers("auto") == 15
    monkeypatch.setattr(workers, "usable_cores", lambda: 1)
    assert resolve_num_workers("auto") == 0
    assert resolve_num_workers(3) == 3
    run = {"task": "matting", "model": {}, "out_dir": "x"}
    assert run_config_from_mapping({**run, "train": {"num_workers": "auto"}}).train.num_workers \
        == "auto"
    with pytest.raises(ConfigError, match="train.num_workers: expected an integer >= 0 or "
                                          "'auto'.*found 'all'"):
        run_config_from_mapping({**run, "train": {"num_workers": "all"}})


def test_the_training_and_evaluation_loaders_resolve_auto(monkeypatch):
    monkeypatch.setattr(workers, "usable_cores", lambda: 3)
    run = run_config_from_mapping({"task": "toy_task:ToyTask", "model": {}, "out_dir": "x",
                                   "train": {"num_workers": "auto", "batch_size": 2}})
    assert training_data(run, ToyTask(), World()).loader.num_workers == 2
    monkeypatch.setattr(workers, "usable_cores", lambda: 1)  # in the main process
    _, eval_set = ToyTask().datasets({})
    batches = evaluation.test_batches(eval_set, torch.device("cpu"), "auto")
    assert len(list(batches)) == len(eval_set)


def _pooled_run(out, steps: int) -> dict:
    """A narrow DIM on a pool of 6 of 12 samples, loaded by two forked workers."""
    return {"task": "matting", "out_dir": str(out),
            "model": {"name": "dim", "encoder_channels": [[4], [4], [8], [8], [8]],
                      "decoder_channels_dim": [8, 8, 4, 4, 1]},
            "data": {**MATTING, "pool": 6, "fields": ["image", "alpha", "trimap"]},
            "train": {"steps": steps, "batch_size": 2, "schedule": "constant",
                      "num_workers": 2, "checkpoint_every": 3, "log_every": 3}}


def test_a_pooled_run_resumed_draws_the_same_batches(tmp_path, monkeypatch):
    """The resumed process makes the pool again and continues at the same keyed views; the
    pools are made by processes spawned from the training process."""
    monkeypatch.setattr(pool_module, "SPAWN_SECONDS", 0.0)
    train(run_config_from_mapping(_pooled_run(tmp_path / "whole", 6)), MattingTask(),
          progress=False)
    train(run_config_from_mapping(_pooled_run(tmp_path / "resumed", 3)), MattingTask(),
          progress=False)
    train(run_config_from_mapping(_pooled_run(tmp_path / "resumed", 6)), MattingTask(),
          progress=False)
    whole = load_checkpoint(tmp_path / "whole" / "model.pt")["model"]
    resumed = load_checkpoint(tmp_path / "resumed" / "model.pt")["model"]
    for name, value in whole.items():
        assert torch.equal(resumed[name], value), name
