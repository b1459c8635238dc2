"""Config files with get_config() and key=value overrides."""
import textwrap

import pytest

from vlsafe_jax import config


@pytest.fixture()
def cfg_file(tmp_path):
  p = tmp_path / "toy.py"
  p.write_text(textwrap.dedent("""
      import ml_collections
      def get_config(arg=None):
        c = ml_collections.ConfigDict()
        c.lr = 1e-4
        c.steps = 10
        c.name = "toy" if arg is None else arg
        c.model = ml_collections.ConfigDict({"width": 32, "act": "quick_gelu", "betas": (0.9, 0.98)})
        return c
  """))
  return p


def test_load_with_arg_and_overrides(cfg_file):
  cfg = config.load(f"{cfg_file}:smoke", ["lr=3", "model.width=64", "model.act=gelu", "model.betas=[0.8,0.9]"])
  assert cfg.name == "smoke"
  assert cfg.lr == 3.0 and isinstance(cfg.lr, float)   # int literal accepted for a float field
  assert cfg.model.width == 64 and cfg.model.act == "gelu" and cfg.model.betas == (0.8, 0.9)


def test_unknown_key_names_the_key_and_suggests(cfg_file):
  with pytest.raises(KeyError, match=r"unknown config key 'model.widht'.*model.width"):
    config.load(str(cfg_file), ["model.widht=3"])


def test_type_change_is_rejected(cfg_file):
  with pytest.raises(TypeError, match="steps=abc"):
    config.load(str(cfg_file), ["steps=abc"])


def test_missing_file_lists_known_configs(tmp_path):
  with pytest.raises(FileNotFoundError, match="not found"):
    config.load(str(tmp_path / "nope.py"))


def test_split_cli():
  flags, overrides = config.split_cli(["--config", "x.py", "--workdir=/tmp/r", "a.b=1", "c=2"])
  assert flags == {"config": "x.py", "workdir": "/tmp/r"} and overrides == ["a.b=1", "c=2"]


def test_load_cli_command_workdir_and_errors(cfg_file):
  cfg, workdir, command = config.load_cli(["--config", str(cfg_file), "steps=3", "sweep"], "unused",
                                          commands=("extract", "sweep"))
  assert (cfg.steps, str(workdir), command) == (3, "runs/toy", "sweep")
  cfg, workdir, command = config.load_cli([f"--config={cfg_file}:run7", "--workdir", "/tmp/w"], "unused")
  assert (cfg.name, str(workdir), command) == ("run7", "/tmp/w", None)
  with pytest.raises(SystemExit, match="one command"):
    config.load_cli(["--config", str(cfg_file), "sweep", "extract"], "unused", commands=("extract", "sweep"))
  with pytest.raises(SystemExit, match="unknown option"):
    config.load_cli(["--config", str(cfg_file), "--wrkdir", "x"], "unused")
