"""The one typed configuration object: YAML file + ``--set`` overrides, validated once at load.

Errors are raised as :class:`ConfigError` (exit code 2) naming the dotted key, the value given and
what was expected.
"""
from __future__ import annotations

import math
import os
import re
import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from data.synthetic import LABELS as STUDY_LABELS


class InputError(Exception):
    """Bad input from the user (config, paths, data): the command line exits with code 2."""


class ConfigError(InputError):
    pass


NAME_PATTERN = re.compile(r"[A-Za-z0-9._=+-]{1,100}")
MAX_SEED = 2**31 - 1  # every seed fits numpy, torch and a C int
MAX_CONFIG_BYTES = 1_000_000
MAX_YAML_ALIASES = 100
MAX_YAML_DEPTH = 20  # a config nests 5 levels (pretraining.training.augment.crop)
MAX_ERRORS_SHOWN = 10  # validation errors listed; the rest counted


def check_name(name: str, what: str) -> str:
    """A folder name: letters, digits and ._=+- only (no path separator, control character or space),
    1 to 100 characters, and not '.' or '..'."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        raise ConfigError(f"{what}: {_shown(name)} is not a usable folder name; use 1-100 letters, digits and "
                          f"._=+- (no path separators), not '.' or '..'")
    return name


_BRIEF = reprlib.Repr()  # shortens long strings and long or deep containers instead of building their whole repr
_BRIEF.maxstring = _BRIEF.maxother = 200
_BRIEF.maxlist = _BRIEF.maxtuple = _BRIEF.maxdict = _BRIEF.maxset = 10
_BRIEF.maxlevel = 3


def _shown(value: Any, limit: int = 80) -> str:
    """repr of a value, cut to ``limit`` characters (an error never echoes a huge input back, nor builds
    its whole repr first)."""
    text = _BRIEF.repr(value)
    if len(text) <= limit:
        return text
    size = f" ({len(value)} characters)" if isinstance(value, str) else \
        f" ({len(value)} items)" if isinstance(value, (list, tuple, dict, set)) else ""
    return f"{text[:limit]}...{size}"


def _experiment_name(name: Optional[str]) -> Optional[str]:
    return None if name is None else check_name(name, "experiment.name")


# A path read from the config: '~' is expanded wherever a path is read.
UserPath = Annotated[str, AfterValidator(os.path.expanduser)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


class _Section(BaseModel):
    # NaN or infinite floats are never a setting (a learning rate, clipping norm or noise multiplier of inf/nan)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class Experiment(_Section):
    name: Annotated[Optional[str], AfterValidator(_experiment_name)] = None
    seed: Seed = 0


class SyntheticData(_Section):
    public_patients: int = Field(1500, ge=10)
    private_patients: int = Field(1600, ge=10)


class CsvColumns(_Section):
    """Column names of an in-house CSV (``data.dataset: csv``); optional ones may be null."""

    file: str = "labels.csv"
    path: str = "path"
    patient_id: str = "patient_id"
    sex: Optional[str] = "sex"
    age: Optional[str] = "age"
    split: Optional[str] = "split"
    view: Optional[str] = None


class MimicOptions(_Section):
    """MIMIC-CXR-JPG: which labeler's study labels to use and where MIMIC-IV demographics are."""

    labeler: Literal["chexpert", "negbio"] = "chexpert"
    patients_csv: Optional[str] = None  # MIMIC-IV patients.csv[.gz] (absolute or relative to data.root)


class CacheOptions(_Section):
    """The preprocessing cache written by ``main_2D_DP.py prepare`` and read by training."""

    dir: Optional[UserPath] = None  # null = ~/.cache/dp-cxr/prepared
    workers: int = Field(2, ge=1)
    max_bad_fraction: float = Field(0.01, ge=0, le=1)  # prepare exits with code 2 above this share of bad images


class Data(_Section):
    dataset: Literal["synthetic", "uka", "chexpert", "mimic", "nih", "padchest", "vindr", "csv"] = "synthetic"
    root: Optional[UserPath] = None
    site: Literal["public", "private", "all"] = "private"
    image_size: int = Field(64, ge=32, le=1024)
    labels: list[str] = Field(default_factory=lambda: list(STUDY_LABELS), min_length=1)
    histogram_equalization: bool = True
    fit: Literal["pad", "crop"] = "pad"  # non-square images: keep the aspect, pad the short side or centre-crop
    num_workers: int = Field(0, ge=0)
    uncertain: Literal["ignore", "zero", "one"] = "ignore"
    blank: Literal["zero", "ignore"] = "zero"
    views: list[str] = Field(default_factory=lambda: ["PA", "AP"], min_length=1)
    label_map: dict[str, str] = Field(default_factory=dict)
    merge_sides: bool = False  # X_right + X_left -> X (positive if either side is)
    reader_vote: Literal["majority", "any"] = "majority"  # several readers per image (VinDr-CXR)
    valid_fraction: float = Field(0.1, gt=0, lt=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    split_seed: Optional[Seed] = None  # seed of the patient split and built-in data; null = experiment.seed
    csv: CsvColumns = Field(default_factory=CsvColumns)
    mimic: MimicOptions = Field(default_factory=MimicOptions)
    cache: CacheOptions = Field(default_factory=CacheOptions)
    synthetic: SyntheticData = Field(default_factory=SyntheticData)

    @model_validator(mode="before")
    @classmethod
    def _flip_moved(cls, raw):
        if isinstance(raw, dict) and "augment_flip" in raw:
            raise ValueError("data.augment_flip moved to training.augment.flip, which also swaps the right/left labels")
        return raw


PUBLIC_PRETRAINING = "public"  # model.pretrained_checkpoint: pretrain on the public site (``pretraining``)


class Model(_Section):
    name: Literal["resnet9", "resnet18", "resnet34", "resnet50", "vit"] = "resnet9"
    activation: Literal["mish", "relu"] = "mish"
    # 'public' (pretrain non-privately, cached), a local .pt/.pth or experiment folder, or None (from scratch)
    pretrained_checkpoint: Optional[UserPath] = PUBLIC_PRETRAINING
    # start a DP run from a checkpoint whose runs trained some of its training patients (refused otherwise):
    # its statement and model card then compose those runs for them (unbounded if non-private: not DP)
    allow_same_patients: bool = False


class Augment(_Section):
    """Random changes of each training image (``data/augment.py``); 0 / false turns a part off."""

    crop: float = Field(0.0, ge=0, lt=1)  # random resized crop keeping an area share drawn from [1 - crop, 1]
    rotate: float = Field(0.0, ge=0, le=30)  # degrees, drawn from [-rotate, rotate]
    translate: float = Field(0.0, ge=0, le=0.25)  # share of the side, drawn per axis from [-translate, translate]
    brightness: float = Field(0.0, ge=0, lt=1)  # factor drawn from [1 - b, 1 + b]
    contrast: float = Field(0.0, ge=0, lt=1)
    flip: bool = False  # horizontal flip that swaps every X_right/X_left label pair


class Training(_Section):
    epochs: int = Field(8, ge=1)
    logical_batch_size: int = Field(256, ge=1)
    physical_batch_size: int = Field(32, ge=1)
    optimizer: Literal["nadam", "adam", "sgd"] = "nadam"
    # BCE positive-class weight per label: counts (negatives/positives of the training labels: exact
    # without DP, noised and accounted under DP), none (1), or one public value per label
    pos_weight: Union[Literal["counts", "none"], list[float]] = "counts"
    lr: float = Field(1e-2, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    checkpoint_every_steps: int = Field(100, ge=0)  # also write last.pt every N logical steps (0 = per epoch only)
    compile: bool = False  # torch.compile the training forward pass; batches padded to a fixed shape
    distributed_timeout_s: int = Field(900, ge=10)  # torchrun: a rank waiting longer on the others fails
    # autocast of forward/backward; under DP the per-unit norms, clipping, noise and optimizer stay fp32
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = False  # model and images in channels-last memory format (faster convolutions on GPUs)
    loader_workers: Union[Literal["auto"], Annotated[int, Field(ge=0)]] = "auto"  # training DataLoader processes
    # which parameters train: auto (norms_and_head from a pretrained model, else all), all, the normalisation
    # layers and the head, the head, or modules by name prefix
    trainable: Union[Literal["auto", "all", "norms_and_head", "head"],
                     Annotated[list[str], Field(min_length=1)]] = "auto"
    schedule: Literal["constant", "cosine"] = "constant"  # learning rate after the warm-up
    warmup_steps: int = Field(0, ge=0)  # linear warm-up of the learning rate over this many logical steps
    ema: Optional[float] = Field(0.99, gt=0, lt=1)  # decay of the weights' moving average (null = none)
    augment: Augment = Field(default_factory=Augment)

    @model_validator(mode="after")
    def _physical_fits_logical(self):
        if self.physical_batch_size > self.logical_batch_size:
            raise ValueError(
                f"training.physical_batch_size ({self.physical_batch_size}) must not exceed "
                f"training.logical_batch_size ({self.logical_batch_size})")
        return self


MAX_EPSILON = 1000.0  # dp.epsilon above this is refused: e^1000 is no bound on anything
MIN_NOISE_MULTIPLIER = 0.01  # below it one Gaussian step alone spends epsilon > 500 (delta 1e-6)


class DP(_Section):
    enabled: bool = True
    unit: Literal["patient", "image"] = "patient"  # what one (epsilon, delta) protects
    epsilon: Optional[float] = Field(8.0, gt=0)
    noise_multiplier: Optional[float] = Field(None, ge=0)
    delta: Optional[float] = Field(None, gt=0, lt=1)
    allow_large_delta: bool = False  # accept delta * N > 0.1
    max_grad_norm: float = Field(1.5, gt=0)
    accountant: Literal["rdp", "prv"] = "rdp"
    grad_sample_mode: Literal["bookkeeping", "hooks", "functorch", "ew"] = "bookkeeping"
    # refuse a run that, as planned, takes any of its patients past this epsilon (per patient, every run in the
    # ledger that trained them composed: privacy/ledger.py); may not change on --resume
    total_budget: Optional[float] = Field(None, gt=0)
    reproducible_noise: bool = False  # noise and sampling seeded from experiment.seed (tests, debugging only)
    secure_mode: bool = True  # Opacus' noise robust to floating-point attacks (a sum of Gaussian draws)
    label_count_share: float = Field(0.05, gt=0, lt=1)  # of the budget (as zCDP rho), for the counts behind pos_weight
    augmult: int = Field(1, ge=1, le=64)  # augmented views of each image per step, averaged before the clip

    @model_validator(mode="after")
    def _one_noise_source(self):
        if self.enabled and (self.epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("set exactly one of dp.epsilon (target) and dp.noise_multiplier, the other to null")
        if self.epsilon is not None and not self.epsilon <= MAX_EPSILON:
            raise ValueError(f"dp.epsilon = {self.epsilon:g} is above {MAX_EPSILON:g}: a factor e^{MAX_EPSILON:g} bounds "
                             f"nothing (and the noise search cannot resolve it); use dp.enabled: false for "
                             f"non-private training")
        if self.enabled and self.noise_multiplier is not None and 0 < self.noise_multiplier < MIN_NOISE_MULTIPLIER:
            raise ValueError(f"dp.noise_multiplier = {self.noise_multiplier:g} is below {MIN_NOISE_MULTIPLIER:g}: a "
                             f"single step spends an epsilon in the hundreds or more (beyond what the accountants "
                             f"compute reliably); raise it, set dp.epsilon instead, or dp.enabled: false")
        if self.enabled and self.noise_multiplier == 0:
            raise ValueError("dp.noise_multiplier: 0 adds no noise, so epsilon is infinite: no differential "
                             "privacy; set a positive noise multiplier (or dp.epsilon), or dp.enabled: false to "
                             "train without noise")
        return self

    @model_validator(mode="after")
    def _patients_need_bookkeeping(self):
        if self.enabled and self.unit == "patient" and self.grad_sample_mode != "bookkeeping":
            raise ValueError(f"dp.unit: patient clips each patient's summed gradient, which only "
                             f"dp.grad_sample_mode: bookkeeping computes; Opacus' '{self.grad_sample_mode}' clips "
                             f"each image alone (use it with dp.unit: image)")
        return self


class Evaluation(_Section):
    bootstrap: int = Field(1000, ge=0, le=100_000)
    bootstrap_unit: Literal["patient", "image"] = "patient"
    permutations: int = Field(1000, ge=0, le=100_000)
    seed: Seed = 0
    age_bins: list[float] = Field(default_factory=lambda: [0, 30, 60, 70, 80, 100], min_length=3)
    min_subgroup_size: int = Field(10, ge=1)
    min_positives: int = Field(10, ge=1)
    min_negatives: int = Field(10, ge=1)
    no_finding_label: Optional[str] = None
    calibration_bins: int = Field(10, ge=2, le=1000)  # equal-mass bins of the ECE and reliability diagrams
    # threshold probabilities of the decision curves; null = 0.01, 0.02, ..., 0.99
    decision_thresholds: Optional[list[Annotated[float, Field(gt=0, lt=1)]]] = Field(None, min_length=1)
    # map fit per label on the validation split whenever best.pt is written, applied by predict --calibrated
    recalibration: Literal["none", "temperature", "platt"] = "platt"

    @model_validator(mode="after")
    def _increasing_bins(self):
        if not all(math.isfinite(b) for b in self.age_bins) or any(b <= a for a, b in zip(self.age_bins, self.age_bins[1:])):
            raise ValueError(f"evaluation.age_bins must be strictly increasing edges, got {self.age_bins}")
        return self


class Pretraining(_Section):
    """``model.pretrained_checkpoint: public``: a non-private run on another site of the same dataset (the
    data, model and device settings of the config, its own training settings), trained once and cached by
    its settings' fingerprint (``Train_Valid_DP.public_pretraining``)."""

    site: Literal["public", "private", "all"] = "public"
    dir: Optional[UserPath] = None  # cache of pretrained runs; null = ~/.cache/dp-cxr/pretrained
    training: Training = Field(default_factory=lambda: Training(
        epochs=20, logical_batch_size=128, lr=2e-3, trainable="all", schedule="cosine", ema=0.99,
        augment=Augment(crop=0.2, rotate=5, translate=0.05, brightness=0.1, contrast=0.1)))


class Output(_Section):
    target_dir: UserPath = "experiments"
    # the privacy ledger's folder, one ledger per dataset and data folder inside; null = per user,
    # $XDG_DATA_HOME/dp-cxr/ledger (~/.local/share/dp-cxr/ledger); may not change on --resume
    ledger: Optional[UserPath] = None


class Audit(_Section):
    """Privacy audit settings that change training (see ``privacy/canaries.py``)."""

    canaries: int = Field(0, ge=0)  # train --audit-canaries M: M training patients become canaries
    reference: Optional[int] = Field(None, ge=0)  # set by `audit --reference-models` on its reference runs


class Config(_Section):
    experiment: Experiment = Field(default_factory=Experiment)
    data: Data = Field(default_factory=Data)
    model: Model = Field(default_factory=Model)
    training: Training = Field(default_factory=Training)
    pretraining: Pretraining = Field(default_factory=Pretraining)
    dp: DP = Field(default_factory=DP)
    evaluation: Evaluation = Field(default_factory=Evaluation)
    output: Output = Field(default_factory=Output)
    audit: Audit = Field(default_factory=Audit)
    # Values derived at run time (noise multiplier, sample rate, dataset sizes...): written into the
    # resolved config of an experiment, never read as settings.
    derived: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _compile_needs_hookless_dp(self):
        if self.training.compile and self.dp.enabled and self.dp.grad_sample_mode != "bookkeeping":
            raise ValueError(f"training.compile: true works non-private or with dp.grad_sample_mode bookkeeping, "
                             f"not with Opacus' '{self.dp.grad_sample_mode}' hooks")
        return self

    @model_validator(mode="after")
    def _precision_fits(self):
        precision, dp = self.training.precision, self.dp
        if precision == "fp16" and self.training.device == "cpu":
            raise ValueError("training.precision: fp16 needs CUDA (float16 autocast with a gradient scaler); on the "
                             "CPU use bf16 or fp32")
        if precision == "fp16" and dp.enabled:
            raise ValueError("training.precision: fp16 is refused under DP: its gradient scaler skips steps whose "
                             "gradients overflow, and whether a step overflows depends on the sampled patients, a "
                             "release the accountant does not cover; use bf16 (fp32's range, no scaler)")
        if precision != "fp32" and dp.enabled and dp.grad_sample_mode != "bookkeeping":
            raise ValueError(f"training.precision: {precision} under DP needs dp.grad_sample_mode bookkeeping, which "
                             f"computes the per-unit norms and the clipped sum in fp32; Opacus' "
                             f"'{dp.grad_sample_mode}' computes them in {precision}")
        return self

    @model_validator(mode="after")
    def _no_finding_is_a_label(self):
        label = self.evaluation.no_finding_label
        if label is not None and label not in self.data.labels:
            raise ValueError(f"evaluation.no_finding_label '{label}' is not one of data.labels {self.data.labels}")
        return self

    @model_validator(mode="after")
    def _one_audit_role(self):
        if self.audit.canaries and self.audit.reference is not None:
            raise ValueError("audit.canaries is for the audited run; a reference run (audit.reference) has none")
        return self


SIDES = ("_right", "_left")


def side_partner(label: str) -> str | None:
    """``x_left`` for ``x_right`` and vice versa; None for a label without a side."""
    for own, other in (SIDES, SIDES[::-1]):
        if label.endswith(own):
            return label[: -len(own)] + other
    return None


def flip_permutation(labels: list[str]) -> list[int]:
    """Where each label's value goes when the image is mirrored: its side partner, or itself. A sided
    label whose partner is not among ``labels`` cannot follow the flip: refused."""
    unpaired = [label for label in labels if side_partner(label) not in (None, *labels)]
    if unpaired:
        raise ConfigError(f"training.augment.flip: a horizontal flip swaps the patient's sides, but {_shown(unpaired)} "
                          f"would keep their side while the image changes it (their partners are not in data.labels); "
                          f"add the partner labels or set training.augment.flip: false")
    return [labels.index(side_partner(label) or label) for label in labels]


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    node = raw
    keys = dotted.split(".")
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{key}' is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(pairs: list[str]) -> dict:
    """``["dp.epsilon=4", "data.labels=[a,b]"]`` -> nested dict, values parsed as YAML."""
    raw: dict = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {_shown(pair)}")
        try:
            value = yaml.load(text, Loader=_StrictLoader) if text.strip() else None
        except (yaml.YAMLError, ValueError) as exc:
            raise ConfigError(f"--set {key}: value {_shown(text)} is not valid YAML "
                              f"({str(getattr(exc, 'problem', None) or exc)[:120]})") from None
        _set_dotted(raw, key.strip(), value)
    return raw


def merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class YamlTooLarge(yaml.YAMLError):
    """A YAML text that nests or expands beyond any config (not a syntax error)."""


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a document that, each alias replaced by the node it names, nests deeper than
    ``MAX_YAML_DEPTH`` or holds more than ``MAX_CONFIG_BYTES`` characters (one per node, plus its
    scalars'): aliases that each repeat the one before stand for gigabytes in a few hundred bytes.
    Each node's expanded size and height are computed once, so the walk is as long as the text; an
    alias inside its own anchor nests without end and is refused for its depth."""
    known: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded size, height)

    def walk(node: yaml.Node, depth: int) -> tuple[int, int]:
        if depth > MAX_YAML_DEPTH:
            raise YamlTooLarge(f"its aliases (*name) nest it deeper than {MAX_YAML_DEPTH} levels")
        if id(node) not in known:
            if isinstance(node, yaml.ScalarNode):
                known[id(node)] = (1 + len(node.value), 0)
            else:
                children = node.value if isinstance(node, yaml.SequenceNode) else [n for kv in node.value for n in kv]
                below = [walk(child, depth + 1) for child in children]
                known[id(node)] = (1 + sum(size for size, _ in below), 1 + max((h for _, h in below), default=0))
        size, height = known[id(node)]
        if depth + height > MAX_YAML_DEPTH:
            raise YamlTooLarge(f"its aliases (*name) nest it deeper than {MAX_YAML_DEPTH} levels")
        return size, height

    if walk(root, 1)[0] > MAX_CONFIG_BYTES:
        raise YamlTooLarge(f"its aliases (*name) expand it beyond {MAX_CONFIG_BYTES:,} characters (each repeats "
                           f"what it names), more than a config may hold")


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a key given twice in one mapping (PyYAML keeps the last one
    silently), more than ``MAX_YAML_ALIASES`` aliases, nesting deeper than ``MAX_YAML_DEPTH`` and a
    document that its aliases expand beyond ``MAX_CONFIG_BYTES`` (:func:`_check_expansion`), before
    anything is built from it."""

    aliases = 0
    depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_YAML_ALIASES:
                raise YamlTooLarge(f"more than {MAX_YAML_ALIASES} YAML aliases (*name); a config needs few")
        if self.depth >= MAX_YAML_DEPTH:  # the composer recurses per level: refused before Python's stack runs out
            mark = self.peek_event().start_mark
            raise YamlTooLarge(f"nests deeper than {MAX_YAML_DEPTH} levels at line {mark.line + 1}")
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _check_expansion(node)
        return node

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {_shown(key)}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> dict:
    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size:,} bytes; a config is expected below {MAX_CONFIG_BYTES:,}")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save the config as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except YamlTooLarge as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: e.g. an integer of more digits than Python converts
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: YAML syntax error{where}: {str(getattr(exc, 'problem', None) or exc)[:200]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    return raw


def validate(raw: dict, source: str = "config") -> Config:
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        errors, lines = exc.errors(), []
        for err in errors[:MAX_ERRORS_SHOWN]:
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                lines.append(f"{key}: unknown key")
            else:
                shown = f" (got {_shown(err['input'])})" if not isinstance(err["input"], dict) else ""
                message = err["msg"] if len(err["msg"]) <= 400 else f"{err['msg'][:400]}..."  # ours may quote a value
                lines.append(f"{key or '<section>'}: {message}{shown}")
        if len(errors) > MAX_ERRORS_SHOWN:
            lines.append(f"... and {len(errors) - MAX_ERRORS_SHOWN} more")
        raise ConfigError(f"{source}: invalid configuration\n  " + "\n  ".join(lines)) from None
    merged = [label.rsplit("_", 1)[0] for label in STUDY_LABELS if label.endswith("_right")]
    known = list(STUDY_LABELS) + (merged if cfg.data.merge_sides else [])
    unknown = [label for label in cfg.data.labels if label not in known]
    if cfg.data.dataset == "synthetic" and unknown:
        raise ConfigError(f"{source}: data.labels: {_shown(unknown, 400)} not in the {cfg.data.dataset} dataset, "
                          f"expected some of {known}")
    if cfg.data.dataset != "synthetic" and not cfg.data.root:
        raise ConfigError(f"{source}: data.root: data.dataset '{cfg.data.dataset}' needs the dataset folder")
    if len(set(cfg.data.labels)) != len(cfg.data.labels):
        raise ConfigError(f"{source}: data.labels: duplicate labels in {_shown(cfg.data.labels, 400)}")
    if cfg.training.augment.flip:
        flip_permutation(cfg.data.labels)
    if cfg.model.pretrained_checkpoint == PUBLIC_PRETRAINING and cfg.pretraining.site == cfg.data.site:
        raise ConfigError(f"{source}: pretraining.site: the public pretraining must use another site than data.site "
                          f"('{cfg.data.site}'), whose patients it would train on without privacy")
    weights = cfg.training.pos_weight
    if isinstance(weights, list) and (len(weights) != len(cfg.data.labels) or min(weights) <= 0):
        raise ConfigError(f"{source}: training.pos_weight: expected counts, none or {len(cfg.data.labels)} positive "
                          f"values (one per label of data.labels), got {_shown(weights)}")
    return cfg


def load_config(path: Path, overrides: list[str] = ()) -> Config:
    """Read the YAML file, apply ``--set`` overrides and validate the result once."""
    raw = merge(read_yaml(path), parse_overrides(list(overrides)))
    return validate(raw, source=str(path))


def config_yaml(cfg: Config) -> str:
    """The resolved config as YAML, in the order of the file."""
    return yaml.safe_dump(cfg.model_dump(), sort_keys=False)
