"""Config errors stop with exit code 2 and name the key, the value and what was expected."""
from __future__ import annotations

import pytest

from config import ConfigError, load_config, parse_overrides, validate
from main_2D_DP import main


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("override, expected", [
    ("training.epoch=3", "training.epoch: unknown key"),
    ("bogus.key=1", "bogus: unknown key"),
    ("training.epochs=many", "training.epochs"),
    ("dp.epsilon=0", "dp.epsilon"),
    ("dp.epsilon=-1", "dp.epsilon"),
    ("dp.delta=1.5", "dp.delta"),
    ("training.physical_batch_size=64", "must not exceed training.logical_batch_size"),
    ("data.labels=[cardiomegaly,fracture]", "['fracture'] not in the synthetic dataset"),
    ("model.name=resnet7", "model.name"),
    ("dp.noise_multiplier=1.0", "exactly one of dp.epsilon"),
    ("evaluation.recalibration=isotonic", "evaluation.recalibration: Input should be 'none', 'temperature' or 'platt'"),
])
def test_bad_values_exit_2_and_name_the_key(tiny_config, capsys, override, expected):
    code, err = run_cli(capsys, "train", "--config", str(tiny_config()), "--set", override)
    assert code == 2
    assert expected in err


def test_wrong_type_message_shows_value(tiny_config, capsys):
    code, err = run_cli(capsys, "train", "--config", str(tiny_config()), "--set", "training.lr=fast")
    assert code == 2 and "training.lr" in err and "'fast'" in err


def test_yaml_syntax_error_names_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  epochs: 2\n  lr: [0.1\n")
    code, err = run_cli(capsys, "train", "--config", str(bad))
    assert code == 2 and str(bad) in err and "line" in err


def test_missing_config_file(tmp_path, capsys):
    code, err = run_cli(capsys, "train", "--config", str(tmp_path / "nope.yaml"))
    assert code == 2 and "nope.yaml" in err


def test_delta_must_be_below_one_over_n(tiny_config, capsys):
    code, err = run_cli(capsys, "train", "--config", str(tiny_config()), "--set", "dp.delta=0.2")
    assert code == 2
    assert "dp.delta = 0.2 must be below 1/N = 1/" in err and " patients" in err
    code, err = run_cli(capsys, "train", "--config", str(tiny_config()), "--set", "dp.delta=0.005")
    assert code == 2 and "dp.allow_large_delta" in err


def test_overrides_are_parsed_as_yaml(tiny_config):
    cfg = load_config(tiny_config(), ["dp.epsilon=4", "training.epochs=3", "data.labels=[cardiomegaly,congestion]",
                                      "dp.delta=1e-7"])
    assert cfg.dp.epsilon == 4.0 and cfg.training.epochs == 3 and cfg.dp.delta == 1e-7
    assert cfg.data.labels == ["cardiomegaly", "congestion"]


def test_override_syntax_error():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["dp.epsilon"])


def test_compile_is_refused_with_opacus_hooks(tiny_config, capsys):
    code, err = run_cli(capsys, "train", "--config", str(tiny_config()), "--set", "training.compile=true",
                        "dp.grad_sample_mode=hooks", "dp.unit=image")
    assert code == 2 and "training.compile" in err and "'hooks'" in err


def test_patient_units_need_bookkeeping(tiny_config, capsys):
    code, err = run_cli(capsys, "train", "--config", str(tiny_config()), "--set", "dp.grad_sample_mode=ew")
    assert code == 2 and "dp.unit: patient" in err and "dp.unit: image" in err


def test_an_error_quotes_a_value_without_building_its_whole_repr():
    value = ["x"]
    for _ in range(30):  # 2^30 strings in a shared tree: its repr would take gigabytes
        value = [value, value]
    with pytest.raises(ConfigError) as caught:
        validate({"data": {"labels": value}})
    assert "data.labels.0" in str(caught.value) and len(str(caught.value)) < 1000
