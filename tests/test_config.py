import pytest

from kdkit.config import ConfigError, from_mapping, load_terms, load_yaml
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
