"""Every CLI mistake ends in one line on stderr naming the file or key and a non-zero exit;
``--debug`` (or SPATIAL_ENTROPY_DEBUG=1) shows the traceback instead."""

from __future__ import annotations

import pytest

from spatial_entropy.cli import main

# Small enough that a test that slips past the error it wants would still finish quickly.
TINY = ["--set", "max_steps=1", "--set", "num_workers=0", "--set", "device=cpu"]


def run_cli(capsys, argv: list[str]) -> tuple[int, str]:
    """Exit code and stderr of ``spatial-entropy ARGV`` (a SystemExit counts as its code)."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def assert_one_line_error(code, err: str, *named: str) -> str:
    assert code not in (0, None)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for name in named:
        assert name in lines[0], lines[0]
    return lines[0]


def test_misspelled_dataset(tmp_path, capsys):
    argv = ["train", "--output", str(tmp_path / "run"), *TINY, "--set", "dataset=fashon-mnist"]
    line = assert_one_line_error(*run_cli(capsys, argv), "fashon-mnist")
    assert "did you mean 'fashion-mnist'" in line


def test_missing_data_folder(tmp_path, capsys):
    missing = tmp_path / "no-cifar-here"
    argv = ["train", "--output", str(tmp_path / "run"), *TINY, "--set", "dataset=cifar10"]
    argv += ["--set", f"data_path={missing}"]
    assert_one_line_error(*run_cli(capsys, argv), str(missing))


def test_yaml_syntax_error_in_config(tmp_path, capsys):
    config = tmp_path / "broken.yaml"
    config.write_text("model: se_vit_tiny_patch4_32\nse:\n  weight: [0.01\nepochs: 3\n")
    argv = ["train", "--config", str(config), "--output", str(tmp_path / "run"), *TINY]
    line = assert_one_line_error(*run_cli(capsys, argv), str(config))
    assert "line" in line  # where the problem is


def test_missing_config_file(tmp_path, capsys):
    config = tmp_path / "nowhere.yaml"
    argv = ["train", "--config", str(config), "--output", str(tmp_path / "run"), *TINY]
    assert_one_line_error(*run_cli(capsys, argv), str(config))


def test_misspelled_model_suggests_close_names(tmp_path, capsys):
    argv = ["train", "--output", str(tmp_path / "run"), *TINY]
    line = assert_one_line_error(
        *run_cli(capsys, [*argv, "--set", "model=vit_smal_patch16_224"]), "vit_smal_patch16_224"
    )
    assert "unknown model" in line and "vit_small_patch16_224" in line
    line = assert_one_line_error(
        *run_cli(capsys, [*argv, "--set", "model=se_vit_smal_patch8_64"]), "se_vit_smal_patch8_64"
    )
    assert "se_vit_small_patch8_64" in line  # our presets are suggested too


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_corrupt_fine_tuning_checkpoint(tmp_path, capsys, suffix):
    checkpoint = tmp_path / f"weights{suffix}"
    checkpoint.write_bytes(b"\x00\x01 not a checkpoint at all" * 10)
    argv = ["train", "--output", str(tmp_path / "run"), *TINY, "--set", "dataset=fashion-mnist"]
    argv += ["--set", "model=se_vit_tiny_patch4_32", "--set", f"checkpoint={checkpoint}"]
    assert_one_line_error(*run_cli(capsys, argv), str(checkpoint))


def test_unknown_config_key(tmp_path, capsys):
    argv = ["train", "--output", str(tmp_path / "run"), "--set", "se.wieght=0"]
    assert_one_line_error(*run_cli(capsys, argv), "se.wieght", "se.weight")


def test_data_info_grid_count_zero(tmp_path, capsys):
    argv = ["data", "info", "fashion-mnist", "--grid", str(tmp_path / "g.png"), "--grid-count"]
    assert_one_line_error(*run_cli(capsys, [*argv, "0"]), "--grid-count")
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("how", ["flag", "subcommand flag", "environment"])
def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch, how):
    config = tmp_path / "nowhere.yaml"
    argv = ["train", "--config", str(config), "--output", str(tmp_path / "run")]
    if how == "flag":
        argv = ["--debug", *argv]
    elif how == "subcommand flag":
        argv = [*argv, "--debug"]
    else:
        monkeypatch.setenv("SPATIAL_ENTROPY_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="nowhere.yaml"):
        main(argv)


def test_debug_environment_variable_zero_means_off(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SPATIAL_ENTROPY_DEBUG", "0")
    argv = ["train", "--config", str(tmp_path / "nowhere.yaml"), "--output", str(tmp_path)]
    assert_one_line_error(*run_cli(capsys, argv), "nowhere.yaml")


def test_debug_shows_the_cause_where_a_command_words_its_own_message(tmp_path, capsys):
    argv = ["attention", str(tmp_path / "no-run"), "--out", str(tmp_path / "x.png")]
    line = assert_one_line_error(*run_cli(capsys, argv), "no-run")
    assert line.startswith("spatial-entropy attention: ")
    with pytest.raises((OSError, ValueError), match="no-run"):
        main([*argv, "--debug"])


def test_ctrl_c_ends_in_one_line_saying_how_to_continue(tmp_path, capsys, monkeypatch):
    import spatial_entropy.engine as engine

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "train", interrupted)
    run = tmp_path / "run"
    code, err = run_cli(capsys, ["train", "--output", str(run), *TINY])
    line = assert_one_line_error(code, err, "interrupted", f"--output {run} --resume auto")
    assert code == 130 and line.startswith("spatial-entropy train: ")
    monkeypatch.setenv("SPATIAL_ENTROPY_DEBUG", "1")
    with pytest.raises(KeyboardInterrupt):
        main(["train", "--output", str(run), *TINY])


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("opt", "adamx", ["'opt'", "'adamx'", "did you mean 'adamax'"]),
        ("sched", "cosin", ["'sched'", "cosin"]),
    ],
)
def test_unknown_optimiser_or_schedule_is_refused_before_the_data_is_read(
    tmp_path, capsys, key, value, named
):
    # the data folder does not exist: reading the data first would fail on it instead
    missing = tmp_path / "no-images-here"
    argv = ["train", "--output", str(tmp_path / "run"), *TINY, "--set", f"{key}={value}"]
    argv += ["--set", "dataset=imagefolder", "--set", f"data_path={missing}"]
    line = assert_one_line_error(*run_cli(capsys, argv), *named)
    assert str(missing) not in line and not (tmp_path / "run").exists()
