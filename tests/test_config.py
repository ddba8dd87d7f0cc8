import math

import pytest

from kdkit.config import (
    ConfigError,
    Range,
    apply_overrides,
    from_mapping,
    load_run_config,
    load_terms,
    load_yaml,
    register_checks,
    run_config_from_mapping,
)
from kdkit.distiller import DistillTerm

YAML = """
distillation:
  - loss: spatial_similarity
    student: layer2
    teacher: layer2
  - loss: channel_similarity
    student: layer2
    teacher: layer2
    adapter: conv1x1
    weight: 2
  - loss: fsp
    student: [layer2, layer3]
    teacher: [layer2, layer3]
    adapter: conv1x1
  - loss: hinton
    student: output
    teacher: output
    args: {temperature: 3.0}
    name: kd
"""


def test_terms_load_from_yaml_text_and_file(tmp_path):
    terms = load_terms(YAML)
    assert terms[0] == DistillTerm("spatial_similarity", "layer2", "layer2")
    assert terms[1].adapter == "conv1x1" and terms[1].weight == 2
    assert terms[2].student == ["layer2", "layer3"]
    assert terms[3].args == {"temperature": 3.0} and terms[3].display_name() == "kd"
    path = tmp_path / "kd.yaml"
    path.write_text(YAML)
    assert load_terms(path) == terms
    assert load_terms(str(path)) == terms


def test_unknown_key_is_rejected_with_a_suggestion():
    bad = YAML.replace("weight: 2", "wieght: 2")
    with pytest.raises(ConfigError, match=r"distillation\[1\]: unknown key 'wieght'.*'weight'"):
        load_terms(bad)


def test_wrong_types_and_missing_keys_are_named():
    with pytest.raises(ConfigError, match=r"distillation\[1\].weight: expected float"):
        load_terms(YAML.replace("weight: 2", "weight: heavy"))
    with pytest.raises(ConfigError, match="missing required key.*teacher"):
        load_terms([{"loss": "fsp", "student": "a"}])
    with pytest.raises(ConfigError, match="student: expected"):
        load_terms([{"loss": "fsp", "student": 3, "teacher": "a"}])
    with pytest.raises(ConfigError, match="'distillation' list"):
        load_terms({"terms": []})
    with pytest.raises(ConfigError, match="non-empty list"):
        load_terms({"distillation": []})


def test_yaml_tags_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = f'distillation: !!python/object/apply:os.system ["touch {marker}"]\n'
    with pytest.raises(ConfigError, match="could not parse YAML"):
        load_terms(evil)
    assert not marker.exists()


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "absent.yaml")


def test_from_mapping_rejects_non_mappings():
    with pytest.raises(ConfigError, match="expected a mapping"):
        from_mapping(DistillTerm, ["spatial_similarity"], "term")


@pytest.mark.parametrize("text, value", [
    ("2e-3", 2e-3), ("1E5", 1e5), ("1.5e+3", 1.5e3), ("1.5e3", 1.5e3), (".5", 0.5),
    ("-.5", -0.5), ("-1e-4", -1e-4), ("+2.5", 2.5), ("1_000.5", 1000.5), ("1.", 1.0),
])
def test_floats_read_as_python_writes_them(text, value):
    loaded = load_yaml(f"x: {text}\n")["x"]
    assert isinstance(loaded, float) and loaded == value


def test_ints_stay_ints_and_yaml_spells_infinity_and_nan():
    loaded = load_yaml("a: 3\nb: -12\nc: 1_000\nd: .inf\ne: -.inf\nf: .nan\ng: nan\nh: inf\n")
    assert [type(loaded[k]) for k in "abc"] == [int, int, int]
    assert loaded["d"] == math.inf and loaded["e"] == -math.inf and math.isnan(loaded["f"])
    assert loaded["g"] == "nan" and loaded["h"] == "inf"  # as YAML says: strings
    assert load_yaml("v: 1e5x\nw: 1:30.5\n") == {"v": "1e5x", "w": "1:30.5"}


def test_ints_are_read_as_python_writes_them():
    assert load_yaml("a: 17\nb: -3\nc: 1_000\nd: 0x1F\ne: 0\n") == {
        "a": 17, "b": -3, "c": 1000, "d": 31, "e": 0}
    # YAML 1.1 reads these as the octal 15 and the sexagesimal 90: they stay strings here
    assert load_yaml("f: 017\ng: 1:30\n") == {"f": "017", "g": "1:30"}


def test_overrides_and_term_weights_read_exponent_floats():
    data = apply_overrides({"train": {}}, ["train.lr=1e-3", "train.weight_decay=5E-4"])
    assert data == {"train": {"lr": 1e-3, "weight_decay": 5e-4}}
    assert load_terms(YAML.replace("weight: 2", "weight: 1e-3"))[1].weight == 1e-3
    with pytest.raises(ConfigError, match=r"could not parse YAML \(--set train.lr=\[1"):
        apply_overrides({}, ["train.lr=[1"])


RUN = "task: matting\nmodel: {name: dim_student}\nout_dir: runs/x\n"


def test_run_config_with_the_pruning_docs_sparsity(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(RUN + "sparsity: {conv: 1e-4, deconv: 1e-5}\ntrain: {lr: 2e-3}\n")
    run = load_run_config(path)
    assert run.sparsity == {"conv": 1e-4, "deconv": 1e-5} and run.train.lr == 2e-3


@pytest.mark.parametrize("override, message", [
    ("train.steps=-5", r"train.steps: expected a number >= 1, found -5; set train.steps"),
    ("train.steps=0", r"train.steps: .*>= 1, found 0"),
    ("train.batch_size=0", r"train.batch_size: .*>= 1, found 0"),
    ("train.lr=-1e-3", r"train.lr: expected a number > 0, found -0.001"),
    ("train.lr=0", r"train.lr: .*> 0, found 0"),
    ("train.weight_decay=-1", r"train.weight_decay: .*>= 0"),
    ("train.grad_clip=0", r"train.grad_clip: .*> 0.*or null"),
    ("train.checkpoint_every=-1", r"train.checkpoint_every: .*>= 0"),
    ("train.eval_every=-1", r"train.eval_every: .*>= 0"),
    ("train.log_every=0", r"train.log_every: .*>= 1"),
    ("train.num_workers=-2", r"train.num_workers: .*>= 0"),
    ("train.optimizer=adamw", r"train.optimizer: unknown optimizer 'adamw'. Did you mean "
                              r"'adam'\? Valid values: adam, sgd"),
    ("train.schedule=step", r"train.schedule: unknown schedule 'step'.*cosine, constant"),
    ("train.amp_dtype=fp32", r"train.amp_dtype: unknown amp_dtype 'fp32'.*fp16, bf16"),
    ("train.on_nonfinite=ignore", r"train.on_nonfinite: .*stop, skip"),
    ("train.lr=.nan", r"train.lr: found nan, but NaN and infinite values are not allowed"),
    ("train.grad_clip=.inf", r"train.grad_clip: found inf"),
    ("data.size=.inf", r"data.size: found inf"),
    ("sparsity={conv: -1e-4}", r"sparsity.conv: expected a number >= 0, found -0.0001"),
    ("sparsity={conv: .nan}", r"sparsity.conv: found nan"),
    ("sparsity={conv: heavy}", r"sparsity: expected dict\[str, float\]"),
    ("sparsity={3: 1e-4}", r"sparsity: expected dict\[str, float\]"),
])
def test_values_out_of_range_are_named_with_the_fix(tmp_path, override, message):
    path = tmp_path / "run.yaml"
    path.write_text(RUN)
    load_run_config(path)
    with pytest.raises(ConfigError, match=message):
        load_run_config(path, [override])


@pytest.mark.parametrize("weight, message", [
    ("-1", r"distillation\[1\].weight: expected a number >= 0, found -1.*switches a term off"),
    (".nan", r"distillation\[1\].weight: found nan"),
    ("-.inf", r"distillation\[1\].weight: found -inf"),
])
def test_term_weights_must_be_finite_and_not_negative(weight, message):
    with pytest.raises(ConfigError, match=message):
        load_terms(YAML.replace("weight: 2", f"weight: {weight}"))


def test_nan_inside_a_term_argument_is_named():
    with pytest.raises(ConfigError, match=r"distillation\[3\].args.temperature: found nan"):
        load_terms(YAML.replace("temperature: 3.0", "temperature: .nan"))


def test_checks_name_real_fields_only():
    with pytest.raises(TypeError, match="no field"):
        register_checks(DistillTerm, wieght=Range(0))


def test_an_int_written_as_a_float_is_refused_with_the_integer_to_write():
    with pytest.raises(ConfigError, match=r"train.steps: expected int, found 1000.0; write it "
                                          r"as an integer \(1000\)"):
        run_config_from_mapping({"task": "t", "model": {}, "out_dir": "o",
                                 "train": {"steps": 1e3}})
