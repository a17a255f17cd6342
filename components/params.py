"""The one params loader: params.yaml (or configs/*.yaml) -> typed, checked ``Params``.

Every verb, every DVC stage and every Kubeflow component reads its parameters through
:func:`load_params`. One frozen dataclass per params.yaml section holds the section's keys and
their defaults; the defaults live here only (they are the embedded demo's values, so a
params.yaml restates them or says why it differs). The loader

- refuses an unknown section or key by name, suggesting the closest known one
  ("params.yaml: train.learning_rate is not a parameter; did you mean train.lr?");
- checks types (an int where a float is expected is fine, a bool is never an int) and ranges,
  each error naming the file and the dotted key;
- treats a missing section or key as its default, and ``null`` as the default too. Where a
  field's type admits None, None is the default or a setting of its own that the field's
  comment names (``preprocess.target_spacing: null`` = the dataset's median spacing, nnU-Net's
  rule; ``model.*: null`` = MaskSAMConfig's default; ``loss.cost_*: null`` = the term's loss
  weight);
- applies ``section.key=value`` overrides (``--set`` on every verb, the pipeline's
  ``overrides``) before checking, values parsed as YAML.

Torch-free on purpose (yaml, dataclasses and difflib only): the pipeline compiler, the ONNX
serving image and ``masksam --help`` import it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import yaml

from masksam.errors import UserError

DATA_SOURCES = ("phantom", "nnunet", "msd", "amos", "synapse", "acdc")
AMOS_MODALITIES = ("ct", "mr", "all")
IMAGE_INTERPS = ("linear", "bspline")  # = components._resample.IMAGE_INTERPOLATORS (tested)
LABEL_INTERPS = ("nearest", "label_aware")  # = components._resample.LABEL_MODES (tested)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MATCHINGS = ("hungarian", "fixed")
FOREGROUND_RULES = ("batch", "coin")
HD_CONVENTIONS = ("medpy", "monai")  # = components.metrics.HD_CONVENTIONS (a test keeps them equal)
DEFAULT_TRACKING_TIMEOUT_S = 120.0   # = components._tracking.DEFAULT_TRACKING_TIMEOUT_S (tested)

DEFAULT_PATH = "params.yaml"


# ----------------------------------------------------------------------------------------------
# The sections
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DataParams:
    """``data:``: where the raw dataset comes from (``masksam data fetch|phantom|import``)."""

    source: str = "phantom"          # phantom | nnunet | msd | amos | synapse | acdc
    src: Optional[str] = None        # path of the public dataset to import (source != phantom)
    out: str = "data/raw"
    cases: int = 24                  # phantom cases
    seed: int = 0                    # phantom seed
    size: list[int] = field(default_factory=lambda: [160, 160, 40])  # phantom voxels x y z
    modality: str = "ct"             # amos only: ct | mr | all
    subset: Optional[int] = None     # synapse only: 8 = TransUNet's 8 organs, relabelled 1..8

    def check(self, where: str) -> None:
        _choice(self.source, DATA_SOURCES, where, "data.source")
        _choice(self.modality, AMOS_MODALITIES, where, "data.modality")
        _at_least(self.cases, 1, where, "data.cases")
        if len(self.size) != 3 or min(self.size) < 1:
            raise UserError(f"{where}: data.size must be three positive voxel counts [x, y, z], got {self.size}")
        if self.subset not in (None, 8):
            raise UserError(f"{where}: data.subset must be null or 8 (synapse), got {self.subset}")


@dataclass(frozen=True)
class PreprocessParams:
    """``preprocess:``: fingerprint, plan, resample and split (``masksam preprocess``)."""

    out: str = "data/preprocessed"
    # x y z mm; null = the dataset's median spacing (nnU-Net's rule). The demo's value: its
    # phantom organs are small (see params.yaml)
    # None = the dataset's median spacing (nnU-Net's rule, right for a real dataset); the demo's
    # params.yaml sets 1.5 x 1.5 x 3 mm for its small phantom organs (its comment says why)
    target_spacing: Optional[list[float]] = None
    image_interp: str = "linear"
    label_interp: str = "nearest"
    folds: int = 5
    test_fraction: float = 0.2
    seed: int = 0
    workers: Optional[int] = None    # parallel processes; null = min(8, CPUs)

    def check(self, where: str) -> None:
        if self.workers is not None:
            _at_least(self.workers, 1, where, "preprocess.workers")
        if self.target_spacing is not None and (len(self.target_spacing) != 3 or min(self.target_spacing) <= 0):
            raise UserError(f"{where}: preprocess.target_spacing must be null (median) or three positive "
                            f"mm values [x, y, z], got {self.target_spacing}")
        _choice(self.image_interp, IMAGE_INTERPS, where, "preprocess.image_interp")
        _choice(self.label_interp, LABEL_INTERPS, where, "preprocess.label_interp")
        _at_least(self.folds, 1, where, "preprocess.folds")
        if not 0.0 <= self.test_fraction < 1.0:
            raise UserError(f"{where}: preprocess.test_fraction must be in [0, 1), got {self.test_fraction}")


@dataclass(frozen=True)
class ModelParams:
    """``model:``: MaskSAMConfig's user-settable fields; None = MaskSAMConfig's own default.

    num_classes and in_channels come from the dataset. The names mirror
    ``masksam.model.config.MaskSAMConfig`` (a test fails when they drift apart); the values are
    checked by MaskSAMConfig itself when the network is built.
    """

    variant: Optional[str] = None
    img_size: Optional[int] = None
    patch_size: Optional[int] = None
    slab_depth: Optional[int] = None
    num_queries: Optional[int] = None
    adapter_ratio: Optional[float] = None
    use_depth_conv_adapter: Optional[bool] = None
    use_depth_mlp_adapter: Optional[bool] = None
    use_temporal_embedding: Optional[bool] = None
    use_aux_boxes: Optional[bool] = None
    use_aux_class_tokens: Optional[bool] = None
    freeze_sam: Optional[bool] = None
    sam_weights: Optional[str] = None      # path of sam_vit_{b,l,h}_*.pth (the official weights)
    decoder_mode: Optional[str] = None
    normalize_class_probs: Optional[bool] = None
    encoder_adapter: Optional[str] = None
    adapter_mlp_scale: Optional[float] = None
    pos_embed: Optional[str] = None
    stem: Optional[str] = None
    prompt_generator: Optional[str] = None
    mask_prompt: Optional[str] = None
    prompt_temporal_embedding: Optional[bool] = None
    decoder_adapters: Optional[str] = None
    mask_upsampler: Optional[str] = None

    def check(self, where: str) -> None:
        """Types only here; MaskSAMConfig checks the values (it knows the variants)."""

    def config_kwargs(self) -> dict[str, Any]:
        """The fields set (not None), as keyword arguments of MaskSAMConfig."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class TrainParams:
    """``train:``: the optimisation and its bookkeeping (``masksam train``)."""

    out: str = "data/train"
    fold: int = 0
    seed: int = 0
    device: str = "auto"             # auto | cpu | cuda | cuda:N
    precision: str = "auto"          # auto (bf16/fp16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    batch_size: int = 4              # slabs per micro-batch (per process)
    grad_accum: int = 1
    lr: float = 0.003                # AdamW peak, poly decay to 0
    weight_decay: float = 0.0001
    adam_eps: float = 1e-8           # AdamW epsilon
    poly_exponent: float = 0.9       # nnU-Net's poly schedule: lr * (1 - step/steps) ** 0.9
    warmup_steps: int = 30           # linear warm-up before the poly decay
    steps: int = 2200
    val_every: int = 500
    checkpoint_every: int = 0        # 0 = at every validation
    grad_clip: float = 1.0           # max gradient norm (nnU-Net: 12; 0 = off)
    foreground_oversample: float = 0.66   # fraction of slabs centred on a random foreground voxel
    # batch: nnU-Net's rule, the last ceil(B * p) samples of a batch are forced onto foreground;
    # coin: each sample independently with probability p
    foreground_rule: str = "batch"
    augment: bool = False
    matching: str = "fixed"          # hungarian (Mask2Former) | fixed (query c answers for class c)
    num_workers: int = 0
    val_overlap: float = 0.25        # sliding-window overlap in validation (fast setting)
    val_cases: int = 2               # validate on at most this many cases (0 = all of the fold's)
    overlay_cases: int = 3
    log_every: int = 1
    experiment: str = "masksam"
    mlflow: bool = True
    # longest wait for the MLflow server once training runs; then checkpoint, stop, --resume
    tracking_timeout_s: float = DEFAULT_TRACKING_TIMEOUT_S

    def check(self, where: str) -> None:
        _choice(self.precision, PRECISIONS, where, "train.precision")
        _choice(self.matching, MATCHINGS, where, "train.matching")
        _choice(self.foreground_rule, FOREGROUND_RULES, where, "train.foreground_rule")
        for name in ("batch_size", "grad_accum", "steps"):
            _at_least(getattr(self, name), 1, where, f"train.{name}")
        for name in ("fold", "warmup_steps", "val_every", "checkpoint_every", "num_workers", "val_cases",
                     "overlay_cases", "log_every"):
            _at_least(getattr(self, name), 0, where, f"train.{name}")
        if not 0.0 <= self.foreground_oversample <= 1.0:
            raise UserError(f"{where}: train.foreground_oversample must be in [0, 1], got {self.foreground_oversample}")
        if self.lr <= 0:
            raise UserError(f"{where}: train.lr must be positive, got {self.lr}")
        if self.adam_eps <= 0:
            raise UserError(f"{where}: train.adam_eps must be positive, got {self.adam_eps}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise UserError(f"{where}: train.weight_decay and train.grad_clip must be >= 0")
        if not 0.0 <= self.val_overlap < 1.0:
            raise UserError(f"{where}: train.val_overlap must be in [0, 1), got {self.val_overlap}")
        if not 0 < self.tracking_timeout_s < float("inf"):
            raise UserError(f"{where}: train.tracking_timeout_s must be a positive number of seconds, "
                            f"got {self.tracking_timeout_s!r}")
        device = self.device
        if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
            raise UserError(f"{where}: train.device must be auto, cpu, cuda or cuda:N, got {device!r}")


@dataclass(frozen=True)
class LossParams:
    """``loss:``: weights of the set criterion's terms and of the matcher's costs.

    A ``cost_*`` of None = the same term's loss weight (Mask2Former matches with the loss
    weights). ``num_points`` 0 = min(112 * 112, img_size ** 2 // 4) sampled points per mask.
    """

    class_weight: float = 2.0
    no_object_weight: float = 0.1
    mask_bce_weight: float = 5.0
    mask_dice_weight: float = 5.0
    aux_bce_weight: float = 5.0
    aux_dice_weight: float = 5.0
    box_l1_weight: float = 5.0
    giou_weight: float = 2.0
    cost_class: Optional[float] = None
    cost_mask_bce: Optional[float] = None
    cost_mask_dice: Optional[float] = None
    cost_aux_bce: Optional[float] = None
    cost_aux_dice: Optional[float] = None
    cost_box_l1: Optional[float] = None
    cost_giou: Optional[float] = None
    num_points: int = 0
    oversample_ratio: float = 3.0
    importance_ratio: float = 0.75

    def check(self, where: str) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if (f.name.endswith("_weight") or f.name.startswith("cost_")) and value is not None and value < 0:
                raise UserError(f"{where}: loss.{f.name} must be >= 0, got {value}")
        _at_least(self.num_points, 0, where, "loss.num_points")
        if not 0.0 <= self.importance_ratio <= 1.0:
            raise UserError(f"{where}: loss.importance_ratio must be in [0, 1], got {self.importance_ratio}")
        if self.oversample_ratio < 1.0:
            raise UserError(f"{where}: loss.oversample_ratio must be >= 1, got {self.oversample_ratio}")

    def cost(self, term: str) -> float:
        """The matcher's cost weight of ``term`` (class, mask_bce, ...): cost_TERM, else the loss weight."""
        value = getattr(self, f"cost_{term}")
        if value is not None:
            return float(value)
        return float(getattr(self, "class_weight" if term == "class" else f"{term}_weight"))


@dataclass(frozen=True)
class EvaluateParams:
    """``evaluate:``: scoring on the held-out test cases (``masksam evaluate``)."""

    out: str = "data/eval"
    nsd_tolerance_mm: float = 2.0
    mirror: bool = False             # test-time mirroring (slower, slightly better)
    overlap: float = 0.5             # sliding-window overlap (nnU-Net's step 0.5)
    hd_convention: str = "medpy"     # HD95 convention: medpy | monai

    def check(self, where: str) -> None:
        if self.nsd_tolerance_mm < 0:
            raise UserError(f"{where}: evaluate.nsd_tolerance_mm must be >= 0, got {self.nsd_tolerance_mm}")
        if not 0.0 <= self.overlap < 1.0:
            raise UserError(f"{where}: evaluate.overlap must be in [0, 1), got {self.overlap}")
        _choice(self.hd_convention, HD_CONVENTIONS, where, "evaluate.hd_convention")


@dataclass(frozen=True)
class ExportParams:
    """``export:``: ONNX export and its parity check (``masksam export``)."""

    out: str = "data/export"
    opset: int = 18
    fp16: bool = False
    atol: float = 0.001

    def check(self, where: str) -> None:
        _at_least(self.opset, 7, where, "export.opset")
        if self.atol <= 0:
            raise UserError(f"{where}: export.atol must be positive, got {self.atol}")


@dataclass(frozen=True)
class RegisterParams:
    """``register:``: the MLflow registry (``masksam register``)."""

    model_name: str = "masksam"
    alias: str = "champion"
    min_dice: float = 0.5            # a model below this mean Dice is never made champion

    def check(self, where: str) -> None:
        if not self.model_name or not self.alias:
            raise UserError(f"{where}: register.model_name and register.alias must not be empty")
        if not 0.0 <= self.min_dice <= 1.0:
            raise UserError(f"{where}: register.min_dice must be in [0, 1], got {self.min_dice}")


BASELINE_METHODS = ("nnunet",)  # what `masksam baseline` can train


@dataclass(frozen=True)
class CompareParams:
    """``compare:``: MaskSAM against reference methods on the same test cases (paired statistics).

    ``baselines`` lists the reference methods to train and compare with (``nnunet``); empty
    switches the comparison off. A list rather than a flag because dvc.yaml's baseline and compare
    stages run once per entry (``foreach``): DVC cannot switch a stage on a boolean."""

    baselines: list[str] = field(default_factory=list)
    out: str = "data/compare"
    bootstrap: int = 10000
    seed: int = 0

    def check(self, where: str) -> None:
        _at_least(self.bootstrap, 1, where, "compare.bootstrap")
        unknown = [b for b in self.baselines if b not in BASELINE_METHODS]
        if unknown or len(set(self.baselines)) != len(self.baselines):
            raise UserError(f"{where}: compare.baselines must list distinct methods out of "
                            f"{list(BASELINE_METHODS)} ([] = no comparison), got {self.baselines}")

    @property
    def enabled(self) -> bool:
        return bool(self.baselines)


@dataclass(frozen=True)
class BaselineParams:
    """``baseline:``: the nnU-Net baseline trained on the same preprocessed split."""

    out: str = "data/baseline"
    configuration: str = "3d_fullres"
    epochs: int = 1
    iterations_per_epoch: int = 5
    device: str = "auto"
    validate: bool = True

    def check(self, where: str) -> None:
        _at_least(self.epochs, 1, where, "baseline.epochs")
        _at_least(self.iterations_per_epoch, 1, where, "baseline.iterations_per_epoch")


SECTIONS: dict[str, type] = {
    "data": DataParams, "preprocess": PreprocessParams, "model": ModelParams, "train": TrainParams,
    "loss": LossParams, "evaluate": EvaluateParams, "export": ExportParams, "register": RegisterParams,
    "compare": CompareParams, "baseline": BaselineParams,
}


@dataclass(frozen=True)
class Params:
    """Every section, typed; ``source`` names the file they came from (or "defaults")."""

    data: DataParams = field(default_factory=DataParams)
    preprocess: PreprocessParams = field(default_factory=PreprocessParams)
    model: ModelParams = field(default_factory=ModelParams)
    train: TrainParams = field(default_factory=TrainParams)
    loss: LossParams = field(default_factory=LossParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    export: ExportParams = field(default_factory=ExportParams)
    register: RegisterParams = field(default_factory=RegisterParams)
    compare: CompareParams = field(default_factory=CompareParams)
    baseline: BaselineParams = field(default_factory=BaselineParams)
    source: str = field(default="defaults", compare=False)

    def section(self, name: str) -> Any:
        """The dataclass of section ``name``; an unknown name is refused with a suggestion."""
        if name not in SECTIONS:
            raise UserError(f"{name} is not a params section{_suggest(name, SECTIONS)}")
        return getattr(self, name)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict of every effective value (MLflow logging, the pipeline's params)."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def to_yaml(self) -> str:
        """The effective params as params.yaml text (every key, defaults included)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

Overrides = Union[Mapping[str, Any], Sequence[str], None]


def load_params(path: str | os.PathLike | None = DEFAULT_PATH, overrides: Overrides = ()) -> Params:
    """Read, override, type-check and range-check a params file into :class:`Params`.

    ``path`` None = no file (every default). ``overrides``: a mapping ``{"train.steps": 2}`` or
    ``--set`` strings ``["train.steps=2"]`` (values parsed as YAML). A missing or malformed
    file, an unknown key, a wrong type or a value out of range is a UserError naming the file
    and the dotted key.
    """
    where = str(path) if path is not None else "defaults"
    raw = read_params_file(path) if path is not None else {}
    raw = apply_overrides(raw, overrides)
    return params_from_dict(raw, where)


def load_params_or_default(path: str | os.PathLike | None, overrides: Overrides = ()) -> Params:
    """A verb's ``--params``: an explicit path must exist; without one, ``params.yaml`` in the
    working directory is read when present (DVC runs the verbs there), else the defaults."""
    if path is None and Path(DEFAULT_PATH).is_file():
        path = DEFAULT_PATH
    return load_params(path, overrides)


def read_params_file(path: str | os.PathLike) -> dict[str, Any]:
    """The raw mapping of a params file; missing, unreadable or not a mapping is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"parameters file not found: {path} (run from the project root, or pass --params FILE)")
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UserError(f"{path} is not a readable YAML file: {exc}") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sections (data:, train:, ...), got {type(raw).__name__}")
    return raw


def params_from_dict(raw: Mapping[str, Any], where: str = "params") -> Params:
    """Build :class:`Params` from a nested mapping (a parsed params.yaml), checking everything."""
    if not isinstance(raw, Mapping):
        raise UserError(f"{where}: expected a mapping of sections, got {type(raw).__name__}")
    sections = {}
    for name, value in raw.items():
        if name not in SECTIONS:
            raise UserError(f"{where}: {name} is not a params section{_suggest(str(name), SECTIONS)}")
        sections[name] = _build_section(name, value, where)
    return Params(**sections, source=where)


def _build_section(name: str, value: Any, where: str) -> Any:
    cls = SECTIONS[name]
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise UserError(f"{where}: {name}: must be a mapping of keys, got {value!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, item in value.items():
        if key not in known:
            raise UserError(f"{where}: {name}.{key} is not a parameter"
                            f"{_suggest(str(key), known, prefix=name + '.')}")
        tp = hints[key]
        if item is None and not _optional(tp):
            continue  # null = the default
        kwargs[key] = _coerce(item, tp, where, f"{name}.{key}")
    section = cls(**kwargs)
    section.check(where)
    return section


def _choice(value: str, allowed: Sequence[str], where: str, key: str) -> None:
    if value not in allowed:
        raise UserError(f"{where}: {key} must be one of {', '.join(allowed)}, got {value!r}")


def _at_least(value: int, low: int, where: str, key: str) -> None:
    if value < low:
        raise UserError(f"{where}: {key} must be >= {low}, got {value}")


# keys that moved to another section: the old place names the new one
MOVED = {"train.num_points": "loss.num_points", "model.checkpoint": "model.sam_weights"}


def _suggest(name: str, known: Iterable[str], prefix: str = "") -> str:
    """"; did you mean X?" for the closest known key (by spelling, else by initials:
    learning_rate -> lr), else the list of known keys."""
    known = list(known)
    if prefix + name in MOVED:
        return f"; it moved: write {MOVED[prefix + name]}"
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    initials = "".join(word[:1] for word in name.split("_"))
    close = close or [k for k in known if len(initials) > 1 and k == initials]
    if close:
        return f"; did you mean {prefix}{close[0]}?"
    return f" (known: {', '.join(prefix + k for k in sorted(known))})"


def _optional(tp: Any) -> bool:
    return _is_union(tp) and type(None) in typing.get_args(tp)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) is Union or isinstance(tp, types.UnionType)


def _type_name(tp: Any) -> str:
    if _is_union(tp):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        item = typing.get_args(tp)[0]
        return f"a list of {({int: 'integers', float: 'numbers', str: 'strings'}.get(item) or _type_name(item))}"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, where: str, key: str) -> Any:
    """``value`` checked against the annotation ``tp`` (int -> float widened; bool never a number)."""
    if _is_union(tp):
        if value is None and type(None) in typing.get_args(tp):
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(inner[0]) is list and not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: {key} must be {_type_name(tp)}, got {value!r}")
        return _coerce(value, inner[0], where, key)
    if typing.get_origin(tp) is list:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: {key} must be {_type_name(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, where, f"{key}[{i}]") for i, v in enumerate(value)]
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(tp)
    if ok is None:
        raise TypeError(f"params.py: unsupported annotation {tp!r} for {key}")
    if not ok:
        raise UserError(f"{where}: {key} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return float(value) if tp is float else value


# ----------------------------------------------------------------------------------------------
# Overrides
# ----------------------------------------------------------------------------------------------

def parse_set_options(items: Iterable[str]) -> dict[str, Any]:
    """``["train.steps=2", "data.size=[32,32,8]"]`` -> ``{"train.steps": 2, ...}`` (YAML values)."""
    result: dict[str, Any] = {}
    for item in items:
        key, sep, text = str(item).partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r}: expected section.key=value (e.g. train.steps=2)")
        try:
            result[key.strip()] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise UserError(f"--set {item!r}: the value is not valid YAML ({exc})") from exc
    return result


def apply_overrides(raw: Mapping[str, Any], overrides: Overrides) -> dict[str, Any]:
    """A copy of the raw params mapping with each ``section.key`` override set.

    ``overrides`` is a mapping of dotted keys or a list of ``section.key=value`` strings. The
    section and key must exist in the schema (refused by name with a suggestion, whether or not
    the file mentions them); the value's type is checked when the result is loaded.
    """
    if isinstance(overrides, (str, bytes)):
        overrides = [overrides]
    if overrides is None:
        overrides = {}
    if not isinstance(overrides, Mapping):
        overrides = parse_set_options(overrides)
    merged = json.loads(json.dumps(dict(raw), default=list))
    for dotted, value in overrides.items():
        name, key = _split_dotted(str(dotted))
        node = merged.get(name)
        if node is None:
            node = merged[name] = {}
        if not isinstance(node, dict):
            raise UserError(f"override {dotted}: {name}: is not a mapping in the params file")
        node[key] = value
    return merged


def _split_dotted(dotted: str) -> tuple[str, str]:
    name, sep, key = dotted.partition(".")
    if not sep or not name or not key:
        raise UserError(f"override {dotted!r}: expected section.key (e.g. train.steps)")
    if name not in SECTIONS:
        raise UserError(f"override {dotted}: {name} is not a params section{_suggest(name, SECTIONS)}")
    known = [f.name for f in dataclasses.fields(SECTIONS[name])]
    if key not in known:
        raise UserError(f"override {dotted} is not a parameter{_suggest(key, known, prefix=name + '.')}")
    return name, key


def add_params_arguments(parser, params_help: str | None = None, default: str | None = None) -> None:
    """Add ``--params FILE`` and ``--set section.key=value`` (repeatable) to a verb's parser."""
    parser.add_argument("--params", metavar="FILE", default=default,
                        help=params_help or "params file (default: params.yaml in the working directory "
                        "when present, else the built-in defaults); command-line options win over it")
    parser.add_argument("--set", dest="set_overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one parameter of the params file (YAML value; repeatable), "
                        "e.g. --set train.steps=10")


def params_from_args(args: Any) -> Params:
    """The Params of a verb's ``--params``/``--set`` (see :func:`load_params_or_default`)."""
    return load_params_or_default(getattr(args, "params", None), getattr(args, "set_overrides", None) or ())


def pick(cli_value: Any, param_value: Any) -> Any:
    """One rule for every verb: an explicit command-line value wins over the params' value
    (which is already the default when the file leaves the key out or says null)."""
    return param_value if cli_value is None else cli_value
