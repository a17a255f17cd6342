"""The one params loader (components/params.py): schema, types, null, overrides, the files."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from masksam.components import params as P
from masksam.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


# ---- the files ----------------------------------------------------------------------------------

def test_params_yaml_restates_the_defaults_or_says_why_it_differs():
    """Defaults live in params.py; params.yaml writes every key out for the reader. A value
    that differs from the default carries a comment on its line saying why (the model: section's
    default is MaskSAMConfig's)."""
    from masksam.model.config import MaskSAMConfig

    text = (ROOT / "params.yaml").read_text()
    raw = yaml.safe_load(text)
    assert list(raw) == list(P.SECTIONS), "params.yaml names every section, in the schema's order"
    loaded = P.load_params(ROOT / "params.yaml")
    assert loaded.train == P.TrainParams() and loaded.loss == P.LossParams()
    for name in P.SECTIONS:
        fields = {f.name for f in dataclasses.fields(P.SECTIONS[name])}
        if name != "model":
            assert set(raw[name]) == fields, f"params.yaml {name}: writes out every key"
        defaults = MaskSAMConfig() if name == "model" else P.SECTIONS[name]()
        lines = text[text.index(f"\n{name}:\n"):].splitlines()
        for key in raw[name]:
            if getattr(loaded.section(name), key) != getattr(defaults, key):
                line = next(ln for ln in lines if re.match(rf"\s+{key}:", ln))
                assert "#" in line, f"params.yaml {name}.{key} differs from the default without saying why"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads(path):
    params = P.load_params(path)
    assert params.model.variant in ("vit_b", "vit_h") and params.model.freeze_sam is True
    assert params.loss.num_points > 0  # the paper's sampled points moved from train: to loss:


def test_model_section_mirrors_masksamconfig():
    """Every MaskSAMConfig field but the dataset's (num_classes, in_channels) is settable; a
    field added to one and not the other fails here."""
    from masksam.model.config import MaskSAMConfig

    config_fields = {f.name for f in dataclasses.fields(MaskSAMConfig)} - {"num_classes", "in_channels"}
    assert {f.name for f in dataclasses.fields(P.ModelParams)} == config_fields
    assert all(f.default is None for f in dataclasses.fields(P.ModelParams))
    model = P.load_params(ROOT / "params.yaml").model
    cfg = MaskSAMConfig(num_classes=8, **model.config_kwargs())
    assert (cfg.variant, cfg.img_size, cfg.patch_size) == ("tiny", 64, 8)
    assert cfg.decoder_mode == MaskSAMConfig().decoder_mode  # left out = MaskSAMConfig's default


def test_mirrored_choices_equal_their_sources():
    """params.py mirrors a few constants so that it imports no torch/SimpleITK; they stay equal."""
    from masksam.components import _resample, _tracking, metrics

    assert P.HD_CONVENTIONS == tuple(metrics.HD_CONVENTIONS)
    assert P.DEFAULT_TRACKING_TIMEOUT_S == _tracking.DEFAULT_TRACKING_TIMEOUT_S
    assert set(P.IMAGE_INTERPS) == set(_resample.IMAGE_INTERPOLATORS)
    assert P.LABEL_INTERPS == tuple(_resample.LABEL_MODES)


def test_loader_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys; from masksam.components.params import load_params; load_params(None); "
            "assert 'torch' not in sys.modules and 'SimpleITK' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ---- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("train:\n  learning_rate: 0.1\n", "params.yaml: train.learning_rate is not a parameter; did you mean train.lr?"),
    ("train:\n  stpes: 3\n", "train.stpes is not a parameter; did you mean train.steps?"),
    ("trian:\n  steps: 3\n", "trian is not a params section; did you mean train?"),
    ("train:\n  num_points: 3\n", "train.num_points is not a parameter; it moved: write loss.num_points"),
    ("train:\n  steps: 2.5\n", "train.steps must be an integer, got 2.5"),
    ("train:\n  steps: true\n", "train.steps must be an integer, got True"),
    ("train:\n  lr: '0.1'\n", "train.lr must be a number, got '0.1'"),
    ("train:\n  augment: 1\n", "train.augment must be true/false, got 1"),
    ("data:\n  size: [1, 2, x]\n", "data.size[2] must be an integer"),
    ("preprocess:\n  target_spacing: 1.5\n", "preprocess.target_spacing must be a list of numbers or null, got 1.5"),
    ("model:\n  img_size: big\n", "model.img_size must be an integer, got 'big'"),
    ("loss:\n  giou_weight: -1\n", "loss.giou_weight must be >= 0"),
    ("loss:\n  importance_ratio: 1.5\n", "loss.importance_ratio must be in [0, 1]"),
    ("loss:\n  oversample_ratio: 0.5\n", "loss.oversample_ratio must be >= 1"),
    ("train:\n  foreground_rule: dice\n", "train.foreground_rule must be one of batch, coin"),
    ("train:\n  precision: fp8\n", "train.precision must be one of"),
    ("train:\n  batch_size: 0\n", "train.batch_size must be >= 1"),
    ("register:\n  min_dice: 2\n", "register.min_dice must be in [0, 1]"),
    ("evaluate:\n  hd_convention: scipy\n", "evaluate.hd_convention must be one of medpy, monai"),
    ("train: 3\n", "train: must be a mapping"),
    ("- a\n", "expected a mapping of sections"),
])
def test_bad_values_are_refused_by_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(UserError) as err:
        P.load_params(path)
    assert message in str(err.value)
    assert str(path) in str(err.value) or "params.yaml" in message


def test_missing_file_and_invalid_yaml(tmp_path):
    with pytest.raises(UserError, match="parameters file not found: .*missing.yaml"):
        P.load_params(tmp_path / "missing.yaml")
    with pytest.raises(UserError, match="not a readable YAML file"):
        P.load_params(write(tmp_path, "train: [1,\n"))


def test_unknown_section_name_in_section_lookup():
    with pytest.raises(UserError, match="did you mean evaluate"):
        P.Params().section("evaluation")


# ---- defaults, null, types ----------------------------------------------------------------------

def test_missing_sections_and_keys_and_null_are_the_defaults(tmp_path):
    params = P.load_params(write(tmp_path, "train:\n  steps: 5\n  lr: null\nloss:\nexport: null\n"))
    assert params.train.steps == 5
    assert params.train.lr == P.TrainParams().lr
    assert params.loss == P.LossParams() and params.export == P.ExportParams() and params.data == P.DataParams()
    assert P.load_params(None) == P.Params() == P.load_params(write(tmp_path, ""))


def test_null_is_a_setting_where_the_type_admits_it(tmp_path):
    params = P.load_params(write(tmp_path, "preprocess:\n  target_spacing: null\nmodel:\n  num_queries: null\n"))
    assert params.preprocess.target_spacing is None  # the dataset's median spacing
    assert P.PreprocessParams().target_spacing is None  # a real dataset: its median spacing
    assert params.model.num_queries is None


def test_int_widens_to_float_and_values_keep_their_types(tmp_path):
    params = P.load_params(write(tmp_path, "train:\n  lr: 1\nloss:\n  cost_class: 3\n"))
    assert params.train.lr == 1.0 and isinstance(params.train.lr, float)
    assert isinstance(params.loss.cost_class, float)
    assert params.loss.cost("class") == 3.0 and params.loss.cost("giou") == params.loss.giou_weight == 2.0


def test_to_dict_round_trips(tmp_path):
    params = P.load_params(ROOT / "params.yaml", ["train.steps=7"])
    again = P.load_params(write(tmp_path, params.to_yaml()))
    assert again == params and again.to_dict()["train"]["steps"] == 7
    assert set(params.to_dict()) == set(P.SECTIONS)


def test_sections_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        P.TrainParams().lr = 1.0  # type: ignore[misc]


# ---- overrides ----------------------------------------------------------------------------------

def test_overrides_as_set_strings_and_as_mapping(tmp_path):
    path = write(tmp_path, "train:\n  steps: 5\n")
    params = P.load_params(path, ["train.steps=2", "data.size=[32, 32, 8]", "model.sam_weights=null",
                                  "evaluate.mirror=true", "loss.cost_giou=1"])
    assert params.train.steps == 2 and params.data.size == [32, 32, 8] and params.model.sam_weights is None
    assert params.evaluate.mirror is True and params.loss.cost_giou == 1.0
    assert P.load_params(path, {"train.steps": 3, "register.min_dice": 0.7}).register.min_dice == 0.7
    assert path.read_text() == "train:\n  steps: 5\n"  # the file is not touched


@pytest.mark.parametrize("override, message", [
    ("train.learning_rate=1", "override train.learning_rate is not a parameter; did you mean train.lr?"),
    ("trian.steps=1", "trian is not a params section; did you mean train?"),
    ("steps=1", "expected section.key"),
    ("train.steps", "expected section.key=value"),
    ("train.steps=two", "train.steps must be an integer, got 'two'"),
])
def test_bad_overrides_are_refused_by_name(tmp_path, override, message):
    with pytest.raises(UserError) as err:
        P.load_params(write(tmp_path, ""), [override])
    assert message in str(err.value)


def test_apply_overrides_leaves_the_input_alone():
    raw = {"train": {"steps": 1}}
    merged = P.apply_overrides(raw, {"train.lr": 0.5, "loss.num_points": 10})
    assert raw == {"train": {"steps": 1}}
    assert merged == {"train": {"steps": 1, "lr": 0.5}, "loss": {"num_points": 10}}


# ---- the verbs ----------------------------------------------------------------------------------

def test_every_verb_with_params_takes_set():
    """`--set` reaches every step: each verb that reads --params also takes --set."""
    import argparse

    from masksam.cli import build_parser

    parser = build_parser(complete=True)
    verbs = {"data phantom", "data import", "data fetch", "preprocess", "evaluate", "export", "register"}
    for verb in verbs:
        sub = parser
        for word in verb.split():
            sub = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction)).choices[word]
        options = {o for a in sub._actions for o in a.option_strings}
        assert {"--params", "--set"} <= options, verb


def test_phantom_verb_reads_params_and_set(tmp_path, monkeypatch):
    """Flag > --set/params > default, on a real verb (a tiny phantom)."""
    from masksam.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("data:\n  out: from_params\n  cases: 3\n  size: [24, 24, 6]\n")
    assert main(["data", "phantom", "--set", "data.cases=2", "--no-progress"]) == 0
    assert len(list((tmp_path / "from_params" / "imagesTr").iterdir())) == 2
    assert main(["data", "phantom", "--cases", "1", "--out", "flag", "--no-progress"]) == 0
    assert len(list((tmp_path / "flag" / "imagesTr").iterdir())) == 1
    assert main(["data", "phantom", "--set", "data.cases=x", "--no-progress"]) == 2


def test_renamed_sam_weights_key_says_where_it_went(tmp_path):
    """"checkpoint" means only the resume state now: model.checkpoint (SAM's weights) is refused
    with its new name, and an old training directory's model_config.json still loads."""
    from masksam.model.config import MaskSAMConfig

    path = tmp_path / "p.yaml"
    path.write_text("model:\n  checkpoint: /models/sam_vit_b_01ec64.pth\n")
    with pytest.raises(UserError, match="model.sam_weights"):
        P.load_params(path)
    assert MaskSAMConfig.from_dict({"variant": "tiny", "checkpoint": None}).sam_weights is None
