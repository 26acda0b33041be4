"""`--config FILE` of train and distill: JSON and TOML give the same config, preset < file < flags, and every
bad file is one line with exit status 2."""

import json

import pytest

from fastdiff.cli import main
from fastdiff.config import preset_config

TINY = ["--steps", "2", "--batch-size", "16", "--log-every", "1", "--ckpt-every", "2", "--sample-every", "0",
        "--no-progress"]


def dry_run(args, capsys):
    code = main([*args, "--dry-run"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


JSON = {"preset": "mnist5k", "train": {"lr": 0.005, "steps": 7, "channels_last": False},
        "model": {"base_channels": 16, "channel_mult": [1, 2, 4]}, "sample": {"guidance": 3.0}}
TOML = """preset = "mnist5k"
[train]
lr = 0.005
steps = 7
channels_last = false
[model]
base_channels = 16
channel_mult = [1, 2, 4]
[sample]
guidance = 3.0
"""


def test_json_and_toml_give_the_same_config_over_the_preset(tmp_path, capsys):
    (tmp_path / "c.json").write_text(json.dumps(JSON))
    (tmp_path / "c.toml").write_text(TOML)
    out = str(tmp_path / "run")
    from_json = dry_run(["train", "--out", out, "--config", str(tmp_path / "c.json")], capsys)
    from_toml = dry_run(["train", "--out", out, "--config", str(tmp_path / "c.toml")], capsys)
    assert from_json == from_toml
    preset = preset_config("mnist5k")
    assert from_json["preset"] == "mnist5k" and from_json["data"]["dataset"] == "mnist5k"
    assert from_json["train"]["lr"] == 0.005 and from_json["train"]["steps"] == 7
    assert from_json["model"]["base_channels"] == 16 and from_json["model"]["channel_mult"] == [1, 2, 4]
    assert from_json["train"]["batch_size"] == preset.train.batch_size  # not in the file: the preset's


def test_flags_override_the_file_and_the_file_the_preset(tmp_path, capsys):
    (tmp_path / "c.toml").write_text(TOML)
    cfg = dry_run(["train", "--out", str(tmp_path / "run"), "--config", str(tmp_path / "c.toml"), "--steps", "9",
                   "--preset", "digits", "--channels-last"], capsys)
    assert cfg["preset"] == "digits" and cfg["model"]["image_size"] == 8  # --preset beats the file's preset
    assert cfg["train"]["steps"] == 9 and cfg["train"]["channels_last"] is True  # flags beat the file
    assert cfg["train"]["lr"] == 0.005  # the file beats the preset (digits: 2e-3)


def test_dry_run_output_is_a_config_file(tmp_path, capsys):
    first = dry_run(["train", "--out", str(tmp_path / "run"), "--preset", "mnist", "--lr", "3e-3"], capsys)
    (tmp_path / "resolved.json").write_text(json.dumps(first))
    assert dry_run(["train", "--out", str(tmp_path / "run"), "--config", str(tmp_path / "resolved.json")],
                   capsys) == first


def test_toml_turns_clipping_off_as_the_sample_flag_does(tmp_path, capsys):
    """TOML has no null: clip = inf was out of range and clip = "none" a type error, so no TOML file could turn
    clipping off; they are --clip's words now (none, off, inf)."""
    for value in ("inf", '"none"', '"off"', '"inf"'):
        (tmp_path / "c.toml").write_text(f"[sample]\nclip = {value}\n")
        assert dry_run(["train", "--out", str(tmp_path / "run"), "--config", str(tmp_path / "c.toml")],
                       capsys)["sample"]["clip"] is None
    (tmp_path / "c.toml").write_text("[sample]\nclip = -inf\n")
    assert main(["train", "--out", str(tmp_path / "run"), "--config", str(tmp_path / "c.toml"), "--dry-run"]) == 2
    assert "sample.clip" in capsys.readouterr().err


def test_a_dry_runs_image_size_does_not_resize_another_flags_dataset(tmp_path, capsys):
    """A dry run's file holds model.image_size, which counted as a resize on purpose: --config digits.json
    --dataset mnist5k squashed MNIST to 8x8 without a word (--preset digits --dataset mnist5k is refused)."""
    out = ["--out", str(tmp_path / "run")]
    (tmp_path / "digits.json").write_text(json.dumps(dry_run(["train", *out], capsys)))
    assert main(["train", *out, "--config", str(tmp_path / "digits.json"), "--dataset", "mnist5k", "--dry-run"]) == 2
    assert "dataset mnist5k has 28x28 images but preset digits builds a model for 8x8" in capsys.readouterr().err
    # a size given for the new dataset, by the flag or by a file that names no dataset, is a choice
    cfg = dry_run(["train", *out, "--config", str(tmp_path / "digits.json"), "--dataset", "mnist5k",
                   "--image-size", "8"], capsys)
    assert (cfg["data"]["dataset"], cfg["model"]["image_size"]) == ("mnist5k", 8)
    (tmp_path / "size.json").write_text('{"model": {"image_size": 16}}')
    cfg = dry_run(["train", *out, "--config", str(tmp_path / "size.json"), "--dataset", "mnist5k", "--preset",
                   "digits"], capsys)
    assert (cfg["data"]["dataset"], cfg["model"]["image_size"]) == ("mnist5k", 16)


def test_a_json_null_is_a_value(tmp_path, capsys):
    # "clip": null (no clipping) was dropped, leaving the preset's 1.0; a null where none is allowed is refused
    (tmp_path / "n.json").write_text('{"sample": {"clip": null}, "train": {"sample_every": null}}')
    cfg = dry_run(["train", "--out", str(tmp_path / "run"), "--config", str(tmp_path / "n.json")], capsys)
    assert cfg["sample"]["clip"] is None and cfg["train"]["sample_every"] is None
    (tmp_path / "bad.json").write_text('{"train": {"lr": null}}')
    assert main(["train", "--out", str(tmp_path / "run"), "--config", str(tmp_path / "bad.json"), "--dry-run"]) == 2
    assert "train.lr must be a number, got None" in capsys.readouterr().err


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("config_file") / "teacher"
    assert main(["train", "--preset", "digits", "--out", str(run_dir), *TINY]) == 0
    return run_dir


def test_distill_config_file_names_the_teacher(teacher, tmp_path, capsys):
    (tmp_path / "d.toml").write_text(f'teacher = "{teacher}"\npreset = "default"\n[distill]\nr1_gamma = 0.5\n'
                                     "student_timesteps = [999, 499]\n[train]\nsteps = 11\n")
    cfg = dry_run(["distill", "--out", str(tmp_path / "s"), "--config", str(tmp_path / "d.toml"), "--steps", "5"],
                  capsys)
    # the teacher's checkpoint the run pins and records (the dry run printed the path as given)
    pinned = sorted((teacher / "checkpoints").glob("step-*"))[-1]
    assert cfg["distill"]["teacher"] == str(pinned) and cfg["distill"]["r1_gamma"] == 0.5
    assert cfg["distill"]["student_timesteps"] == [999, 499] and cfg["sample"]["steps"] == 2
    assert cfg["train"]["steps"] == 5 and cfg["train"]["lr"] == 1e-5  # the flag; the 'default' preset's lr
    assert cfg["preset"] == "default"  # the distillation preset it ran (it recorded the teacher's 'digits')
    # a preset's trained backbone can be frozen from the command line (--train-backbone could only turn it on)
    frozen = dry_run(["distill", "--teacher", str(teacher), "--out", str(tmp_path / "s"), "--no-train-backbone"],
                     capsys)
    assert frozen["distill"]["train_backbone"] is False
    # what the run refused after --dry-run passed (two of them after opening the run directory)
    for flags, says in ((["--backbone", str(tmp_path / "no.pt")], "no.pt does not exist; pass a timm/DINO ViT"),
                        (["--regress-weight", "1", "--regress-at", "all", "--student-timesteps", "999", "500"],
                         "never steps from student timesteps [500], so distill.regress_at 'all' has no state")):
        assert main(["distill", "--teacher", str(teacher), "--out", str(tmp_path / "s"), *flags, "--dry-run"]) == 2
        assert says in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("missing.json", None, "cannot read config file"),
        ("bad.json", '{"train": {"lr": 1e-3,}}', "is not valid JSON"),
        ("bad.toml", "[train\nlr = 1", "is not valid TOML"),
        ("c.yaml", "train: {}", "must end in .json or .toml"),
        ("list.json", "[1, 2]", "must hold an object of sections"),
        ("typo.json", '{"train": {"lrr": 1e-3}}', "unknown key 'train.lrr'; the keys of section 'train' are: steps, "),
        ("section.toml", "[optim]\nlr = 1", "unknown key 'optim'; the valid top-level keys are: preset, model, "),
        ("flat.json", '{"train": 3}', "section 'train' must be an object"),
        ("preset.json", '{"preset": 3}', "preset must be a string"),
        ("value.json", '{"train": {"steps": "many"}}', "value.json: train.steps must be an integer, got 'many'"),
        # tracebacks until 2026-12-07: a ZeroDivisionError, RecursionErrors
        ("groups.toml", "[model]\nnum_groups = 0", "model.num_groups must be a whole number of at least 1, got 0"),
        ("deep.json", "[" * 100000 + "]" * 100000, "deep.json is nested too deep to be a config"),
        ("deep.toml", "a = " + "[" * 100000 + "]" * 100000, "deep.toml is nested too deep to be a config"),
        # json.loads kept the last of two sections (the lr was lost); a dotted key named no fix; "" was "."
        ("twice.json", '{"train": {"lr": 0.001}, "train": {"steps": 5}}', "key(s) ['train'] given twice"),
        ("dotted.json", '{"train.lr": 0.001}', """unknown key 'train.lr' (a section's option goes inside it: """
                                              """{"train": {"lr": ...}})"""),
        ("empty.json", '{"data": {"data_dir": ""}}', "data.data_dir is empty; give a folder, or null"),
        ("mult.json", '{"model": {"channel_mult": "124"}}', "channel_mult must be a list of integers, got '124'"),
    ],
)
def test_bad_file_is_one_line_with_exit_2(name, text, message, tmp_path, capsys):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    code = main(["train", "--out", str(tmp_path / "run"), "--config", str(path), "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("text, message", [
    ('{"model": {"base_channels": 8}}', "unknown key 'model'; the valid top-level keys are: preset, teacher, train, "),
    ('{"distill": {"teacher": "elsewhere"}}', "unknown key 'distill.teacher'"),
    # distillation drops no labels: a p_uncond was recorded and had no effect
    ('{"train": {"p_uncond": 0.5}}', "unknown key 'train.p_uncond'"),
    # refused by the validation, so before the teacher pairs and the backbone (and by --dry-run)
    ('{"distill": {"disc_head": "foo"}}', "distill.disc_head 'foo' is not one of conv, mlp"),
    ('{"distill": {"distill_weighting": "bar"}}', "distill.distill_weighting 'bar' is not one of"),
    ('{"distill": {"augment": "zoom"}}', "unknown augmentation(s) ['zoom']"),
])
def test_distill_file_sets_only_the_students_own_sections(text, message, teacher, tmp_path, capsys):
    (tmp_path / "d.json").write_text(text)
    code = main(["distill", "--teacher", str(teacher), "--out", str(tmp_path / "s"), "--config",
                 str(tmp_path / "d.json"), "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_config_is_refused_on_resume(tmp_path, capsys, tiny_overrides):
    from fastdiff.config import apply_overrides
    from fastdiff.train import train_ddpm

    run = tmp_path / "run"
    train_ddpm(apply_overrides(preset_config("digits"), {**tiny_overrides, "train.steps": 2}), run, progress=False,
               echo=lambda s: None)
    (tmp_path / "c.json").write_text('{"train": {"lr": 1e-3}}')
    code = main(["train", "--out", str(run), "--resume", "--config", str(tmp_path / "c.json")])
    assert code == 2 and "drop --config" in capsys.readouterr().err
    # the command that started the run, repeated with --resume, names the run's own preset: that changes nothing
    assert main(["train", "--preset", "digits", "--out", str(run), "--resume", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["preset"] == "digits"
    assert main(["train", "--preset", "mnist5k", "--out", str(run), "--resume", "--dry-run"]) == 2
    assert "drop --preset" in capsys.readouterr().err


def test_a_data_dir_is_recorded_absolute_and_distill_and_refiner_take_their_own(teacher, tmp_path, capsys,
                                                                                 monkeypatch):
    """train recorded --data-dir as typed: relative, it stopped resolving for a distill or a refiner started from
    another folder, and neither had a flag to say where the data went."""
    monkeypatch.chdir(tmp_path)
    cfg = dry_run(["train", "--out", "run", "--data-dir", "data/here"], capsys)
    assert cfg["data"]["data_dir"] == str(tmp_path / "data" / "here")
    (tmp_path / "d.json").write_text('{"data": {"data_dir": "from-file"}}')
    assert dry_run(["train", "--out", "run", "--config", "d.json"], capsys)["data"]["data_dir"] == str(
        tmp_path / "from-file")
    student = dry_run(["distill", "--teacher", str(teacher), "--out", "s", "--data-dir", "moved"], capsys)
    assert student["data"]["data_dir"] == str(tmp_path / "moved")
    code = main(["train-refiner", "--checkpoint", str(teacher), "--out", "r", "--data-dir", "moved", "--dry-run"])
    assert code == 0 and json.loads(capsys.readouterr().out)["refiner"]["data_dir"] == str(tmp_path / "moved")
