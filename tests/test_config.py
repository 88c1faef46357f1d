"""Config loading: defaults inheritance, dotted overrides, and errors that name key and file."""

from pathlib import Path

import pytest

from nemo_rlsr.config import ConfigError, RLSRConfig, load_config

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_every_bundled_config_loads():
    configs = sorted((REPO / "conf").glob("*.yaml"))
    assert configs, "conf/ has no YAML files"
    for path in configs:
        assert isinstance(load_config(path), RLSRConfig)


def test_defaults_chain_and_overrides(tmp_path):
    write(tmp_path / "base.yaml", "grpo:\n  num_generations: 16\n  kl_coef: 0.01\nmodel:\n  num_layers: 4\n")
    child = write(tmp_path / "child.yaml", "defaults: [base.yaml]\ngrpo:\n  kl_coef: 0.002\n")
    cfg = load_config(child, ["grpo.num_generations=4", "optimizer.lr=3e-6", "data.path=/x.jsonl"])
    assert cfg.grpo.num_generations == 4  # command line beats the parent
    assert cfg.grpo.kl_coef == 0.002  # child beats the parent
    assert cfg.model.num_layers == 4  # inherited
    assert cfg.optimizer.lr == 3e-6
    assert cfg.data.path == "/x.jsonl"
    assert cfg.grpo.clip_high == RLSRConfig().grpo.clip_high  # untouched defaults stay


def test_int_is_accepted_for_float_and_interpolation_resolves(tmp_path):
    path = write(tmp_path / "c.yaml", "optimizer:\n  lr: 1\ngrpo:\n  micro_batch_size: ${grpo.num_generations}\n")
    cfg = load_config(path)
    assert cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)
    assert cfg.grpo.micro_batch_size == cfg.grpo.num_generations


def test_unknown_key_names_key_and_file(tmp_path):
    write(tmp_path / "base.yaml", "grpo:\n  num_generatoins: 4\n")
    child = write(tmp_path / "child.yaml", "defaults: base.yaml\n")
    with pytest.raises(ConfigError) as err:
        load_config(child)
    assert "grpo.num_generatoins" in str(err.value)
    assert str(tmp_path / "base.yaml") in str(err.value)  # the file that set it, not the child


def test_unknown_section_and_wrong_type_name_key_and_file(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key `grop`.*"):
        load_config(write(tmp_path / "a.yaml", "grop:\n  kl_coef: 0.1\n"))
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path / "b.yaml", "grpo:\n  num_generations: eight\n"))
    assert "grpo.num_generations" in str(err.value) and "b.yaml" in str(err.value) and "int" in str(err.value)
    with pytest.raises(ConfigError, match="must be bool"):
        load_config(write(tmp_path / "c.yaml", "trainer:\n  heldout_eval: 1\n"))


def test_bad_override_is_attributed_to_the_command_line(tmp_path):
    path = write(tmp_path / "c.yaml", "grpo:\n  kl_coef: 0.1\n")
    with pytest.raises(ConfigError, match=r"<command line>.*grpo.kl_coef"):
        load_config(path, ["grpo.kl_coef=lots"])
    with pytest.raises(ConfigError, match="<command line>.*unknown key `grpo.nope`"):
        load_config(path, ["grpo.nope=1"])
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(path, ["grpo.kl_coef"])


def test_missing_file_and_cycle(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    write(tmp_path / "a.yaml", "defaults: [b.yaml]\n")
    write(tmp_path / "b.yaml", "defaults: [a.yaml]\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "a.yaml")
