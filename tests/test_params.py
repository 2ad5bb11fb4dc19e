"""params.yaml is validated by one schema before any work: errors name the key."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from workspace import REPO

from refinery.params import Params, ParamsError, load_params, parse_params
from refinery.profiles import apply_profile, available


def test_the_shipped_params_file_is_valid() -> None:
    params = load_params(REPO / "params.yaml")
    assert params.download.source == "builtin"
    assert params.images.side == 8 and params.images.channels == 1
    assert 0 < params.prepare.label_fraction < 0.5


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"download": {"sorce": "builtin"}}, "download.sorce: unknown key"),
        ({"tracking": {"experimnt": "x"}}, "tracking.experimnt: unknown key"),
        ({"images": {"side": "big"}}, "images.side: Input should be a valid integer"),
        ({"images": {"channels": 2}}, "images.channels: Input should be 1 or 3"),
        ({"download": {"http": {"retries": -1}}}, "download.http.retries: Input should be greater"),
        ({"prepare": {"label_fraction": 0}}, "prepare.label_fraction: Input should be greater"),
        ({"prepare": {"val_fraction": 1.5}}, "prepare.val_fraction: Input should be less"),
        ({"download": {"source": "ftp"}}, "download.source: Input should be 'builtin'"),
        ({"download": {"source": "image-folder"}}, "download.url: an image-folder source needs"),
        ({"download": {"checksum": "sha1:abc"}}, "download.checksum: expected 'sha256:"),
        ({"validate": {"pixel_mean": [200, 10]}}, "validate.pixel_mean: bounds must be"),
        ({"finetune": {"optim": {"lr": 0}}}, "finetune.optim.lr: Input should be greater"),
        ({"model": {"student": {"depth": []}}}, "model.student.depth: "),
        ({"augment": {"ssl": {"blur_kernel": 4}}}, "augment.ssl.blur_kernel: expected an odd"),
    ],
)
def test_bad_values_name_the_key(raw: dict, expected: str) -> None:
    with pytest.raises(ParamsError) as info:
        parse_params(raw)
    assert expected in str(info.value)


def test_every_error_is_reported_at_once() -> None:
    with pytest.raises(ParamsError) as info:
        parse_params({"images": {"side": 0}, "seed": -1, "bogus": 1})
    text = str(info.value)
    assert "images.side" in text and "seed" in text and "bogus: unknown key" in text


def test_cli_refuses_bad_params_before_any_work(tmp_path: Path) -> None:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["download"]["timeout"] = 5
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    result = subprocess.run([sys.executable, "-m", "refinery", "download"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "download.timeout: unknown key" in result.stderr
    assert not (tmp_path / "data").exists()  # nothing was started


def test_profiles_switch_the_data_set_and_keep_comments(tmp_path: Path) -> None:
    target = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", target)
    assert {"cifar10", "cifar10-jpeg", "image-folder"} <= set(available())
    params, _ = apply_profile(target, "cifar10")
    assert params.download.source == "cifar10-binary"
    assert (params.images.side, params.images.channels) == (32, 3)
    params, _ = apply_profile(target, "image-folder", [
        "download.url=https://example.com/flowers.tar.gz", "images.side=48"])
    assert params.download.url == "https://example.com/flowers.tar.gz"
    assert params.images.side == 48
    text = target.read_text()
    assert "# builtin | cifar10-binary | image-folder" in text  # comments survive
    assert load_params(target) == params


def test_every_change_is_shown_and_the_file_keeps_its_shape(tmp_path: Path) -> None:
    """Re-applying a profile resets what an earlier --set changed: it must say so."""
    target = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", target)
    first = run_cli(tmp_path, "profile", "image-folder", "--set", "download.url=/x.tar",
                    "--set", "download.test_split=val", "--set", "images.side=32")
    assert '  download.source: "builtin" -> "image-folder"' in first.stdout
    assert '  download.test_split: "test" -> "val"' in first.stdout
    assert "  images.side: 8 -> 32" in first.stdout
    again = run_cli(tmp_path, "profile", "image-folder", "--set", "images.side=64")
    assert '  download.test_split: "val" -> "test"' in again.stdout  # the profile's own value
    assert "  images.side: 32 -> 64" in again.stdout
    assert "download.url" not in again.stdout  # unchanged keys are not listed
    text = target.read_text()
    assert "  optim:\n    optimizer: sgd         # sgd | adamw | lars" in text  # still block
    assert "  checksum: null " in text and max(len(line) for line in text.splitlines()) < 110
    assert "no change" in run_cli(tmp_path, "profile", "image-folder",
                                  "--set", "images.side=64").stdout


def run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "refinery", *args], cwd=cwd,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


def test_a_bad_override_leaves_params_untouched(tmp_path: Path) -> None:
    target = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", target)
    before = target.read_bytes()
    with pytest.raises(ParamsError, match=r"images\.side"):
        apply_profile(target, None, ["images.side=2"])
    with pytest.raises(ParamsError, match="no profile 'imagenet'"):
        apply_profile(target, "imagenet")
    assert target.read_bytes() == before


def test_params_yaml_states_the_schema_defaults() -> None:
    """A default is said once: params.yaml is the schema's defaults, written out."""
    assert load_params(REPO / "params.yaml") == Params()
