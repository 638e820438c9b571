"""``facetrain config list`` / ``facetrain config show``, run in-process."""

from __future__ import annotations

import yaml

from facetrain.config import list_presets, load_config


def test_list_prints_every_preset_with_description(run_cli):
    code, out, err = run_cli("config", "list")
    assert code == 0, err
    lines = out.splitlines()
    presets = list_presets()
    assert len(lines) == len(presets)
    for line, (name, description) in zip(lines, presets.items()):
        assert line.split()[0] == name
        assert line.endswith(description)


def test_show_prints_resolved_yaml_that_loads_back(run_cli, tmp_path):
    code, out, err = run_cli("config", "show", "ms1mv3_r50", "optim.lr=0.05", "data.val_bins=[a.bin,b.bin]")
    assert code == 0, err
    shown = yaml.safe_load(out)
    assert shown["optim"]["lr"] == 0.05 and shown["data"]["val_bins"] == ["a.bin", "b.bin"]
    assert shown["model"]["backbone"] == "r50"
    path = tmp_path / "shown.yaml"
    path.write_text(out)
    assert load_config(path) == load_config("ms1mv3_r50", ["optim.lr=0.05", "data.val_bins=[a.bin,b.bin]"])


def test_show_without_preset_uses_defaults_and_accepts_overrides(run_cli):
    code, out, _ = run_cli("config", "show", "train.max_steps=7")
    assert code == 0
    shown = yaml.safe_load(out)
    assert shown["train"]["max_steps"] == 7 and shown["optim"]["lr"] == 0.1


def test_show_accepts_a_yaml_path_and_writes_output(run_cli, tmp_path):
    preset = tmp_path / "mine.yaml"
    preset.write_text("description: mine\noptim:\n  lr: 0.02\n")
    target = tmp_path / "out" / "resolved.yaml"
    code, out, err = run_cli("config", "show", str(preset), "train.batch_size=16", "-o", str(target))
    assert code == 0, err
    assert str(target) in err
    assert yaml.safe_load(target.read_text()) == yaml.safe_load(out)
    assert load_config(target).train.batch_size == 16 and load_config(target).optim.lr == 0.02


def test_show_help_keys_lists_values_types_and_help(run_cli):
    code, out, _ = run_cli("config", "show", "tiny_cpu", "optim.lr=0.05", "--help-keys")
    assert code == 0
    lines = {line.split(" = ", 1)[0]: line for line in out.splitlines()}
    assert lines["optim.lr"].startswith("optim.lr = 0.05  (float) Peak learning rate")
    assert "[> 0.0, <= 1.0]" in lines["loss.sample_rate"]
    assert "loss.margin" in lines and "data.synthetic.seed" in lines and "output.dir" in lines


def test_show_errors_are_one_line_with_exit_code_1(run_cli):
    code, out, err = run_cli("config", "show", "tiny_cpu", "optim.lrr=3")
    assert code == 1 and out == ""
    assert err.strip().count("\n") == 0
    assert "optim.lrr: unknown key (did you mean optim.lr?)" in err
    code, _, err = run_cli("config", "show", "ms1mv3_r5")
    assert code == 1 and "did you mean ms1mv3_r50?" in err and err.strip().count("\n") == 0
    code, _, err = run_cli("config", "show", "loss.sample_rate=1.5")
    assert code == 1 and "loss.sample_rate=1.5: must be <= 1 (from override" in err


def test_unknown_option_is_a_usage_error(run_cli):
    code, _, _ = run_cli("config", "show", "--no-such-flag")
    assert code == 2
