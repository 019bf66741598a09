"""The package layout, settings and command entry behave as a user installing tunelens expects."""
import subprocess
import sys

import pytest

from tunelens.config import ConfigError, load_config


def test_defaults_load_and_user_file_overrides_one_key(tmp_path):
    user = tmp_path / "mine.yaml"
    user.write_text("analysis:\n  top_neurons: 5\n")
    merged = load_config(user)
    assert merged["analysis"]["top_neurons"] == 5
    assert merged["analysis"]["heatmap_size"] == load_config()["analysis"]["heatmap_size"]


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
