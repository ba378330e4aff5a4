"""Typed config: YAML + --set overrides, type checks, unknown keys, round trip."""

import json

import pytest

from vidssl.config import ConfigError, apply_overrides, from_dict, to_dict
from vidssl.engine.config import RunConfig, resolve_run_config


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_defaults_yaml_and_overrides_layer(tmp_path):
    p = write(tmp_path, "optim: {lr: 1e-4}\ntrain: {steps: 7}\nobjectives: [{name: crw, temperature: 0.1}]\n")
    cfg = resolve_run_config(p, ["train.steps=9", "objectives.0.edge_dropout=0.2", "data.crop_scale=[0.5, 0.9]"])
    assert cfg.optim.lr == 1e-4 and cfg.train.steps == 9
    assert cfg.objectives[0].params["temperature"] == 0.1
    assert cfg.objectives[0].params["edge_dropout"] == 0.2
    assert cfg.objectives[0].params["patch_size"] == 64  # default filled in
    assert cfg.data.crop_scale == (0.5, 0.9)


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "optim.lrr: unknown key; allowed keys here: name, lr"),
    ("optim.lr=fast", "optim.lr: expected a number"),
    ("train.steps=2.5", "train.steps: expected an integer"),
    ("train.amp=turbo", "train.amp: 'turbo' is not allowed; expected one of 'auto', 'off', 'bf16', 'fp16'"),
    ("data.sampler=every", "data.sampler: 'every' is not allowed"),
    ("objectives.0.name=simclr", "objectives.0.name: unknown objective 'simclr'; available: corrflow, "),
    ("objectives.0.temp=1", "objectives.0.temp: unknown key; allowed keys here: embed_dim, temperature"),
    ("objectives.0.temperature=-1", "objectives.0.temperature: must be > 0"),
    ("objectives.4.weight=1", "objectives.4: list index '4' out of range"),
    ("train.steps", "expected KEY=VALUE"),
    ("model.eval_layer=layer4", None),
])
def test_bad_keys_and_types_name_the_key(override, message):
    base = ["model.out_layer=layer3"]
    if message is None:  # eval layer after the trained layer
        with pytest.raises(ConfigError, match="model.eval_layer"):
            resolve_run_config(None, base + [override])
        return
    with pytest.raises(ConfigError) as exc:
        resolve_run_config(None, base + [override])
    assert message in str(exc.value)


def test_unknown_objective_in_yaml(tmp_path):
    p = write(tmp_path, "objectives: [{name: moco}]\n")
    with pytest.raises(ConfigError, match="objectives.0.name: unknown objective 'moco'"):
        resolve_run_config(p)


def test_bad_yaml_names_the_file(tmp_path):
    p = write(tmp_path, "train: [1, 2\n")
    with pytest.raises(ConfigError, match=str(p)):
        resolve_run_config(p)
    with pytest.raises(ConfigError, match="not found"):
        resolve_run_config(tmp_path / "missing.yaml")


def test_round_trip_through_json():
    cfg = resolve_run_config(None, ["train.steps=3", "objectives.0.temperature=0.2"])
    again = resolve_run_config(base=json.loads(json.dumps(to_dict(cfg))))
    assert to_dict(again) == to_dict(cfg)


def test_several_objectives_and_flat_or_nested_params():
    cfg = resolve_run_config(base={"objectives": [{"name": "crw", "weight": 1.0},
                                                  {"name": "crw", "weight": 0.5, "params": {"temperature": 0.1}}]})
    assert [o.weight for o in cfg.objectives] == [1.0, 0.5]
    assert cfg.objectives[1].params["temperature"] == 0.1


def test_apply_overrides_creates_sections_and_rejects_scalars():
    assert apply_overrides({}, ["a.b=1"]) == {"a": {"b": 1}}
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"a": 1}, ["a.b=2"])


def test_from_dict_plain_dataclass():
    cfg = from_dict(RunConfig, {"train": {"seed": 3}})
    assert cfg.train.seed == 3 and to_dict(cfg)["train"]["seed"] == 3


def test_yaml_off_is_the_string_off_where_a_choice_allows_it():
    from vidssl.config import ConfigError, from_dict
    from vidssl.engine.config import TrainConfig

    assert from_dict(TrainConfig, {"amp": False}).amp == "off"  # `amp: off` in YAML 1.1 is a boolean
    with pytest.raises(ConfigError, match="train.amp: True is not allowed"):
        from_dict(TrainConfig, {"amp": True}, prefix="train")
