import dataclasses
import os
from dataclasses import dataclass, field

import pytest
import yaml

from vl.atomic import atomic_output
from vl.config import ConfigError, from_dict, load_config, save_config, to_dict
from vl.encoders.text import TextEncoderConfig


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    model: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    objectives: dict[str, float] = field(default_factory=lambda: {"mlm": 1.0})
    max_steps: int | None = None


def write(tmp_path, data, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_yaml_loads_into_nested_frozen_dataclasses(tmp_path):
    path = write(tmp_path, {"model": {"hidden_size": 64, "num_heads": 4}, "optim": {"lr": "3e-4", "betas": [0.8, 0.9]}})
    cfg = load_config(RunConfig, path)
    assert cfg.model.hidden_size == 64 and cfg.model.num_layers == 12
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.optim.betas == (0.8, 0.9)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.hidden_size = 1


def test_round_trip_through_a_run_directory(tmp_path):
    cfg = load_config(RunConfig, write(tmp_path, {"name": "x", "objectives": {"mlm": 1.0, "sop": 0.5}}),
                      ["model.hidden_size=48", "model.num_heads=4", "max_steps=10"])
    path = save_config(cfg, tmp_path / "run")
    again = load_config(RunConfig, path)
    assert again == cfg
    assert to_dict(again)["model"]["hidden_size"] == 48


def test_overrides_parse_values_as_yaml(tmp_path):
    cfg = load_config(RunConfig, None, ["model.pre_ln=true", "optim.betas=[0.5, 0.6]", "max_steps=null"])
    assert cfg.model.pre_ln is True and cfg.optim.betas == (0.5, 0.6) and cfg.max_steps is None


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    path = write(tmp_path, {"model": {"hiden_size": 64}})
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, path)
    assert "model.hiden_size" in str(err.value) and str(path) in str(err.value)


def test_unknown_override_key_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        load_config(RunConfig, write(tmp_path, {}), ["optim.learning_rate=1"])


@pytest.mark.parametrize(
    "data, message",
    [
        ({"model": {"hidden_size": "big"}}, "model.hidden_size"),
        ({"model": {"pre_ln": "yes"}}, "model.pre_ln"),
        ({"optim": {"betas": [0.9]}}, "optim.betas"),
        ({"model": {"hidden_size": 30, "num_heads": 4}}, "divisible"),
        ({"model": 3}, "model"),
    ],
)
def test_bad_values_are_errors_naming_the_field(tmp_path, data, message):
    with pytest.raises(ConfigError, match=message):
        load_config(RunConfig, write(tmp_path, data))


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(RunConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(RunConfig, bad)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(RunConfig, None, ["model.hidden_size"])


def test_from_dict_rejects_non_mappings():
    with pytest.raises(ConfigError):
        from_dict(RunConfig, [1, 2])


def test_atomic_output_files_get_ordinary_permissions_and_failures_leave_nothing(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_config(RunConfig(), tmp_path / "run")
        assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's private 0600
        with pytest.raises(RuntimeError), atomic_output(tmp_path / "half.bin") as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("interrupted")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    finally:
        os.umask(old)


def test_run_config_model_file_and_its_override(tmp_path):
    @dataclasses.dataclass(frozen=True)
    class Run:
        model: dict = dataclasses.field(default_factory=dict)
        train: dict = dataclasses.field(default_factory=dict)

    write(tmp_path, {"model": {"fusion": "single_stream", "text": {"hidden_size": 8}}}, "small.yaml")
    write(tmp_path, {"model": {"fusion": "dual_stream", "text": {"hidden_size": 16}}}, "other.yaml")
    run = write(tmp_path, {"model": "small.yaml", "train": {"steps": 3}}, "run.yaml")
    assert load_config(Run, run).model["fusion"] == "single_stream"
    # --set model=FILE swaps the architecture, and later overrides still apply to it
    cfg = load_config(Run, run, ["model=other.yaml", "model.text.hidden_size=32", "train.steps=5"])
    assert cfg.model == {"fusion": "dual_stream", "text": {"hidden_size": 32}} and cfg.train["steps"] == 5
    with pytest.raises(ConfigError, match="'missing.yaml' named by --set model= not found"):
        load_config(Run, run, ["model=missing.yaml"])
    with pytest.raises(ConfigError, match="needs a run config file"):
        load_config(Run, None, ["model=other.yaml"])
