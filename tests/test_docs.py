"""The README stays in step with the code and with CI."""

from pathlib import Path

from rnnlm.config import all_keys

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_every_config_key_is_documented():
    missing = [k for k in all_keys() if f"`{k}`" not in README]
    assert not missing, f"README's config table lacks {missing}"


def test_ci_runs_the_readme_commands():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/install.sh" in README and "bash scripts/install.sh" in ci
    assert "python3 -m pytest -q" in README and "python3 -m pytest -q" in ci


def test_every_config_file_loads():
    from rnnlm.config import build_config
    for cfg in sorted((ROOT / "configs").glob("*.yaml")):
        build_config(cfg)
