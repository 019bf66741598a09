"""The package layout, settings and command entry behave as a user installing tunelens expects."""
import subprocess
import sys

import pytest

from tunelens.config import ConfigError, load_config


def test_defaults_load_and_user_file_overrides_one_key(tmp_path):
    user = tmp_path / "mine.yaml"
    user.write_text("analysis:\n  top_neurons: 5\n")
    merged = load_config(user)
    assert merged.analysis.top_neurons == 5
    assert merged.analysis.heatmap_size == load_config().analysis.heatmap_size


def test_unknown_setting_is_named(tmp_path):
    user = tmp_path / "typo.yaml"
    user.write_text("analysis:\n  top_nerons: 5\n")
    with pytest.raises(ConfigError, match="analysis.top_nerons"):
        load_config(user)


def test_console_script_reports_version():
    out = subprocess.run([sys.executable, "-m", "tunelens.plugin.cli", "--version"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.startswith("tunelens ")


def test_code_folders_install_under_one_namespace():
    import tunelens.evaluators
    import tunelens.plugin
    import tunelens.registry_hooks

    for module in (tunelens.plugin, tunelens.registry_hooks, tunelens.evaluators):
        assert module.__name__.startswith("tunelens.")


@pytest.mark.parametrize("text, named", [
    ("analysis:\n  top_neurons: -3\n", "'analysis.top_neurons'"),
    ("verdict:\n  alpha: high\n", "'verdict.alpha'"),
    ("evaluation:\n  vllm:\n    dtype: float8\n", "'evaluation.vllm.dtype'"),
    ("full_diff:\n  power_iterations: 1\n", "'full_diff.power_iterations'"),
    ("evaluation:\n  generation:\n    prompt_template: 'no placeholder'\n",
     "'evaluation.generation.prompt_template'"),
    ("hooks:\n  base_models: [a, b]\n", "'hooks.base_models'"),
])
def test_a_wrong_value_is_refused_at_load_naming_the_key(tmp_path, text, named):
    user = tmp_path / "conf.yaml"
    user.write_text(text)
    with pytest.raises(ConfigError) as refused:
        load_config(user)
    message = str(refused.value)
    assert named in message and str(user) in message and "\n" not in message


def test_a_wrong_value_is_one_line_and_exit_2_from_the_cli(tmp_path):
    user = tmp_path / "conf.yaml"
    user.write_text("analysis:\n  heatmap_size: 0\n")
    done = subprocess.run([sys.executable, "-m", "tunelens.plugin.cli", "--config", str(user),
                           "analyze", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "'analysis.heatmap_size'" in done.stderr
