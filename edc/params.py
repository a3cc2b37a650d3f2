"""The params.yaml schema and its loader.

Every model forbids unknown keys and every number has a range, so a typo or an out-of-range value
stops a stage before it touches any output, with one line per problem naming the dotted key::

    params.yaml: observers.epochs: must be >= 1 (got 0)

The YAML is read the way DVC reads it (ruamel.yaml, YAML 1.2: ``1e-3`` is a float), and validation
is strict: a quoted ``"0.1"`` where a number belongs is an error, not silently converted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from edc.errors import ParamsError


class Section(BaseModel):
    # One base class, so that extra="forbid" and strict typing reach every nested model.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class DatasetParams(Section):
    name: Literal["mnist5k", "cifar10", "cifar100", "imagefolder", "npz"] = "mnist5k"
    root: Optional[str] = Field(default=None, validate_default=True,
                                description="source location; required for all but mnist5k")
    test_size: int = Field(default=1000, ge=1, description="mnist5k: images held out, stratified by class")
    val_size: int = Field(default=0, ge=0, description="train images held out as a validation split (stratified, "
                                                       "seeded) for choosing recipes; 0 = none")
    image_size: Optional[int] = Field(default=None, ge=8, le=1024, description="imagefolder: resize side")
    storage: Literal["arrays", "files"] = Field(
        default="arrays", description="arrays: prepare copies the pixels into .npy arrays; files (imagefolder "
                                      "with image_size): prepare lists the files, stages decode them on the fly")

    @field_validator("root")
    @classmethod
    def _root_needed(cls, v: Optional[str], info: ValidationInfo) -> Optional[str]:
        name = info.data.get("name")
        if name is not None and name != "mnist5k" and not v:
            raise ValueError(f"required for dataset {name!r}")
        return v

    @field_validator("storage")
    @classmethod
    def _files_need_a_folder(cls, v: str, info: ValidationInfo) -> str:
        if v == "files":
            if info.data.get("name") not in (None, "imagefolder"):
                raise ValueError(f"files reads image folders only (dataset.name: imagefolder), not "
                                 f"{info.data.get('name')!r}")
            if "image_size" in info.data and info.data["image_size"] is None:
                raise ValueError("files needs dataset.image_size (every image is resized to it when read)")
        return v


class ObserverSpec(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$", description="file stem under models/observers/")
    arch: str
    kwargs: dict[str, int | float | str | bool] = Field(default_factory=dict)
    weights: Literal["train", "imagenet"] = Field(
        default="train", description="train on the prepared data, or load torchvision's ImageNet checkpoint "
                                     "from the torch hub cache (tv_* architectures, observers only)")

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        from edc.models import list_models

        if v not in list_models():
            raise ValueError(f"unknown architecture {v!r} (known: {', '.join(list_models())})")
        return v

    @field_validator("kwargs")
    @classmethod
    def _known_kwargs(cls, v: dict, info: ValidationInfo) -> dict:
        from edc.models import model_kwargs

        arch = info.data.get("arch")
        if arch is None:  # the arch itself was invalid and is reported already
            return v
        allowed = model_kwargs(arch)
        unknown = sorted(set(v) - set(allowed))
        if unknown:
            raise ValueError(f"{', '.join(unknown)} not accepted by {arch} "
                             f"(accepts: {', '.join(sorted(allowed)) or 'nothing'})")
        return v


class AugmentParams(Section):
    crop_padding: int = Field(default=2, ge=0, le=64, description="random shift of up to this many pixels")
    flip: bool = Field(default=False, description="random horizontal flip (off for digits)")


class ObserversParams(Section):
    models: list[ObserverSpec] = Field(min_length=1)
    epochs: int = Field(ge=1, le=10_000)
    batch_size: int = Field(ge=1, le=65_536)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(gt=0, le=10)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=5e-4, ge=0, le=1)
    schedule: Literal["cosine", "constant"] = "cosine"
    augment: AugmentParams = Field(default_factory=AugmentParams)

    @field_validator("models")
    @classmethod
    def _unique_names(cls, v: list[ObserverSpec]) -> list[ObserverSpec]:
        names = [m.name for m in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"observer names must be unique, repeated: {', '.join(dup)}")
        return v


class StatsParams(Section):
    batch_size: int = Field(default=500, ge=1, le=65_536)
    augment: bool = Field(default=True, description="targets from views under synth.aug (the crops synthesis "
                                                     "matches) instead of the un-augmented images")
    draws: int = Field(default=2, ge=1, le=64, description="augment: views of each train image")


class InitParams(Section):
    method: Literal["rded", "real", "noise"] = "rded"
    observers: list[str] = Field(min_length=1, description="rded: observers whose mean logits score crops")
    candidates: int = Field(default=50, ge=1, description="rded: real images drawn per class")
    crops: int = Field(default=5, ge=1, le=1000, description="rded: random crops scored per candidate")
    factor: int = Field(default=2, ge=1, le=8,
                        description="rded: best crops downsampled to tiles of side H/factor, stitched factor x factor")
    scale_min: float = Field(default=1.0, gt=0, le=1,
                             description="rded: crop area lower bound (RandomResizedCrop); 1 = whole images")
    batch_size: int = Field(default=500, ge=1, le=65_536, description="rded: crops scored per forward pass")


class FlatnessParams(Section):
    mode: Literal["off", "logits", "stats"] = Field(default="logits", description="Eq. 7 (logits) or Eq. 6 (stats)")
    weight: float = Field(default=1.0, ge=0)
    beta: float = Field(default=0.99, ge=0, lt=1, description="EMA rate of the teacher images X_ema")
    tau: float = Field(default=4.0, gt=0, description="softmax temperature of Eq. 7")


class CropAugParams(Section):
    """RandomResizedCrop + horizontal flip, as synthesis and the relabel plan draw them."""

    scale_min: float = Field(default=0.5, gt=0, le=1, description="RandomResizedCrop area lower bound")
    flip: bool = False


class SynthAugParams(CropAugParams):
    """The views synthesis matches: RandomResizedCrop + flip (``crop``), or one random roll of the whole
    batch by up to ``jitter`` pixels each way + flip (``jitter``, SRe2L's small-image recover)."""

    kind: Literal["crop", "jitter"] = Field(default="crop", description="crop: RandomResizedCrop (scale_min); "
                                                                        "jitter: a random roll (jitter)")
    jitter: int = Field(default=4, ge=0, le=64, description="jitter: largest roll in pixels along each axis")


class SynthParams(Section):
    observers: list[str] = Field(min_length=1, description="used one per iteration, round-robin")
    iterations: int = Field(ge=0, le=1_000_000, description="steps per batch; 0 keeps the initial images")
    lr: float = Field(default=0.05, gt=0, le=100)
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    batch_size: int | Literal["all"] = Field(default="all", description="images per batch, or all")
    r_bn: float = Field(default=0.1, ge=0, description="weight of the statistics-matching loss")
    layers: Literal["mean", "sum"] = Field(default="mean", description="matching combined over an observer's "
                                                                        "BatchNorm layers: mean (paper Eq. 16) or sum")
    class_var: Literal["pooled", "within"] = Field(
        default="pooled", description="per-class variance matched: pooled over the class's values, or the mean of "
                                      "each image's own spatial variance (the released EDC code)")
    first_layer_weight: float = Field(default=1.0, ge=0, description="weight of the first matched BatchNorm "
                                                                     "layer's term (SRe2L and the released EDC: 10)")
    targets: Literal["data", "running"] = Field(
        default="data", description="global targets: the exact statistics collect_stats measured (data), or each "
                                    "BatchNorm layer's running estimates in the observer (running, SRe2L)")
    ce_weight: float = Field(default=1.0, ge=0, description="weight of the cross-entropy term")
    class_views: int = Field(default=1, ge=1, le=256, description=(
        "crops of each class per iteration, at least: each image is cropped ceil(class_views / its class's images "
        "in the batch) times and all crops are matched together; 1 = one crop per image (the paper)"))
    flatness: FlatnessParams = Field(default_factory=FlatnessParams)
    aug: SynthAugParams = Field(default_factory=SynthAugParams)

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch(cls, v: Any) -> Any:
        if v == "all" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        raise ValueError(f"must be a positive integer or 'all' (got {v!r})")


class RelabelAugParams(CropAugParams):
    """The students' views: RandomResizedCrop + flip, then RandAugment where ``randaugment`` > 0."""

    randaugment: int = Field(default=0, ge=0, le=8, description="RandAugment operations per view (the paper's "
                                                                "Tables 7-10); 0 = off. Stored in the plan")
    magnitude: int = Field(default=9, ge=0, le=30, description="RandAugment magnitude bin (of 0-30)")


class RelabelParams(Section):
    teachers: list[str] = Field(min_length=1, description="observers whose mean logits become the soft labels")
    epochs: int = Field(ge=1, le=100_000, description="post-evaluation epochs the plan covers (at least)")
    min_steps: int = Field(default=0, ge=0, le=10_000_000,
                           description="more epochs when needed for this many optimiser steps (planned_epochs)")
    batch_size: int = Field(ge=1, le=65_536, description="post-evaluation batch size")
    topk: int = Field(default=0, ge=0, description="store the k largest logits per image; 0 = all")
    codec: Literal["float16", "int8", "hard"] = Field(
        default="float16", description="how the stored logits are written: float16, int8 (per-row scale and "
                                       "offset), or hard (none: the students train on the classes)")
    shard_bytes: int = Field(default=64 * 2**20, ge=1, le=2**40,
                             description="target size of a label shard: it holds as many stored epochs as fit")
    label_epochs: int = Field(default=0, ge=0, le=100_000,
                              description="epochs of views and labels stored, replayed in order by the training "
                                          "epochs (epoch e replays e % label_epochs); 0 = by label_views")
    label_views: int = Field(default=0, ge=0, le=10**9,
                             description="with label_epochs 0: store the epochs that give each class at least this "
                                         "many labelled views, ceil(label_views / ipc) (0 = every epoch)")
    cutmix: bool = False
    aug: RelabelAugParams = Field(default_factory=RelabelAugParams)


class EvaluateParams(Section):
    students: list[ObserverSpec] = Field(min_length=1, description="architectures trained on the condensed set")
    seeds: int = Field(default=3, ge=1, le=100, description="repeats per student, reported as mean and std")
    labels: Literal["soft", "hard"] = "soft"
    loss: Literal["kl", "mse_ce"] = "kl"
    temperature: float = Field(default=4.0, gt=0)
    lr: float = Field(default=1e-3, gt=0, le=10)
    weight_decay: float = Field(default=0.01, ge=0, le=1)
    schedule: Literal["smoothing", "ssrs", "multistep", "cosine"] = "smoothing"
    milestones: list[float] = Field(default_factory=lambda: [0.8, 0.9, 0.95], description="multistep, fractions")
    gamma: float = Field(default=0.5, gt=0, le=1, description="multistep decay")
    ema: bool = Field(default=True, description="evaluate the EMA of the weights (EDC) instead of the raw model")
    ema_rate: float = Field(default=0.99, ge=0, lt=1)
    ema_warmup: int = Field(default=10, ge=0, description="EMA decay after n updates: min(ema_rate, (1 + n) / "
                                                          "(ema_warmup + n)); 0 = constant ema_rate")
    eval_every: int = Field(default=25, ge=1, description="epochs between validation points on the curves")
    variants: list[Literal["hard", "noaug"]] = Field(
        default_factory=list, description="further evaluations of the same set beside the main one: hard = the "
                                          "planned views with class labels; noaug = the un-augmented images")

    @field_validator("variants")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"each variant at most once (got {v})")
        return v

    @field_validator("milestones")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(not 0 < m < 1 for m in v):
            raise ValueError(f"must be fractions of training in (0, 1) (got {v})")
        return v


class ReferenceParams(Section):
    enabled: bool = Field(default=False, description="run the reference stage (it writes an empty report when off)")
    epochs: int = Field(default=20, ge=1, le=10_000, description="epochs over the whole train split per student")


class ContinualParams(Section):
    enabled: bool = Field(default=False, description="run the continual stage (it writes an empty report when off)")
    steps: int = Field(default=5, ge=1, le=1000, description="class groups arriving one after the other")
    labels: list[Literal["soft", "hard"]] = Field(default_factory=lambda: ["soft", "hard"], min_length=1)
    seeds: int = Field(default=2, ge=1, le=100, description="students per step and label kind")


class SlimmingParams(Section):
    enabled: bool = Field(default=False, description="run the slimming stage (it writes an empty report when off)")
    model: str | None = Field(default=None, description="observer to prune (default: the first observer)")
    ratios: list[float] = Field(default_factory=lambda: [0.3, 0.5, 0.7], min_length=1)
    criteria: list[Literal["bn", "magnitude"]] = Field(default_factory=lambda: ["bn", "magnitude"], min_length=1)
    epochs: int = Field(default=50, ge=1, description="planned epochs of the set used for recovery (at most all)")
    lr: float = Field(default=1e-3, gt=0, le=10)

    @field_validator("ratios")
    @classmethod
    def _shares(cls, v: list[float]) -> list[float]:
        if any(not 0 < r < 1 for r in v):
            raise ValueError(f"must be shares of the channels or weights in (0, 1) (got {v})")
        return v


class Params(Section):
    seed: int = Field(ge=0, le=2**32 - 1)
    trial: int = Field(default=0, ge=0, le=2**32 - 1,
                       description="redraws the initial images, synthesis, the relabel plan and the student seeds; "
                                   "the split, observers and statistics stay (they follow seed)")
    ipc: int = Field(ge=1, description="images per class of the condensed set")
    alpha: float = Field(ge=0, le=1, description="weight of global (Form 1) vs per-class (Form 2) matching")
    zeta: float = Field(gt=0, description="slowdown of the smoothing LR schedule in post-evaluation")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto: CUDA when present")
    bf16: bool = Field(default=True, description="bf16 autocast on CUDA for observer/student training and "
                                                  "teachers (never on the CPU, never for statistics)")
    workers: int = Field(default=4, ge=0, le=64, description="DataLoader processes decoding image files "
                                                            "(dataset.storage: files); speed only")
    eval_jobs: int = Field(default=1, ge=1, le=64, description="post_evaluate's student seeds trained side by "
                                                                "side, torch's threads divided between them; "
                                                                "speed only")
    launcher: str = Field(default="python", min_length=1,
                          description="runs the training and synthesis stages, e.g. "
                                      "'torchrun --standalone --nproc_per_node 2'")
    dataset: DatasetParams
    observers: ObserversParams
    stats: StatsParams
    init: InitParams
    synth: SynthParams
    relabel: RelabelParams
    evaluate: EvaluateParams
    reference: ReferenceParams = Field(default_factory=ReferenceParams)
    continual: ContinualParams = Field(default_factory=ContinualParams)
    slimming: SlimmingParams = Field(default_factory=SlimmingParams)

    @model_validator(mode="after")
    def _cross_checks(self) -> Params:
        names = [m.name for m in self.observers.models]
        problems = []
        for section, used in (("init.observers", self.init.observers), ("synth.observers", self.synth.observers),
                              ("relabel.teachers", self.relabel.teachers)):
            for i, name in enumerate(used):
                if name not in names:
                    problems.append(f"{section}[{i}]: {name!r} is not among observers.models "
                                    f"({', '.join(names)})")
        need = self.ipc * self.init.factor ** 2
        if self.init.method == "rded" and self.init.candidates < need:
            problems.append(f"init.candidates: must be >= ipc * init.factor^2 = {need} (got {self.init.candidates})")
        if self.evaluate.loss == "mse_ce" and self.relabel.topk:
            problems.append("evaluate.loss: mse_ce regresses all logits; it needs relabel.topk: 0")
        if self.evaluate.loss == "mse_ce" and self.relabel.codec == "hard":
            problems.append("evaluate.loss: mse_ce regresses logits; relabel.codec: hard stores none")
        if self.relabel.codec == "hard" and self.relabel.topk:
            problems.append("relabel.topk: must be 0 with relabel.codec: hard (no logits are stored)")
        for i, m in enumerate(self.observers.models):
            if m.weights == "imagenet" and not m.arch.startswith("tv_"):
                problems.append(f"observers.models[{i}].weights: imagenet weights exist only for the tv_* "
                                f"architectures (got arch {m.arch!r})")
        for i, s in enumerate(self.evaluate.students):
            if s.weights != "train":
                problems.append(f"evaluate.students[{i}].weights: students are trained from the condensed set; "
                                "remove the key")
        students = [s.name for s in self.evaluate.students]
        if len(set(students)) != len(students):
            problems.append("evaluate.students: names must be unique")
        if self.slimming.model is not None and self.slimming.model not in names:
            problems.append(f"slimming.model: {self.slimming.model!r} is not among observers.models "
                            f"({', '.join(names)})")
        if problems:
            raise ValueError("\n".join(problems))
        return self


# pydantic puts the member type of a failed union into the location: width.int, width.float, ...
_UNION_TAGS = ("int", "float", "str", "bool")


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _describe(err: dict[str, Any]) -> str:
    t, ctx, got = err["type"], err.get("ctx") or {}, err.get("input")
    messages = {
        "greater_than_equal": lambda: f"must be >= {ctx.get('ge')}",
        "greater_than": lambda: f"must be > {ctx.get('gt')}",
        "less_than_equal": lambda: f"must be <= {ctx.get('le')}",
        "less_than": lambda: f"must be < {ctx.get('lt')}",
        "missing": lambda: "missing",
        "extra_forbidden": lambda: "unknown key",
        "int_type": lambda: "must be an integer",
        "float_type": lambda: "must be a number",
        "bool_type": lambda: "must be true or false",
        "string_type": lambda: "must be a string",
        "list_type": lambda: "must be a list",
        "model_type": lambda: "must be a mapping (a section of keys)",
        "dict_type": lambda: "must be a mapping",
        "literal_error": lambda: f"must be one of {ctx.get('expected')}",
        "too_short": lambda: f"must have at least {ctx.get('min_length')} item(s)",
        "string_pattern_mismatch": lambda: "may contain only letters, digits, '_' and '-'",
    }
    if t in messages:
        msg = messages[t]()
    else:
        msg = err["msg"].removeprefix("Value error, ")
    if t in ("missing", "extra_forbidden", "value_error"):
        return msg
    return f"{msg} (got {got!r})"


def _problems(exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors(include_url=False):
        loc = err["loc"]
        if len(loc) > 1 and loc[-1] in _UNION_TAGS:
            # A scalar union reports one error per member; report the union once.
            key, msg = _dotted(loc[:-1]), f"must be a number, string or true/false (got {err.get('input')!r})"
        else:
            key, msg = _dotted(loc), _describe(err)
        # A cross-field check names its own keys, one problem per line.
        for line in (f"{key}: {msg}" if key else msg).splitlines():
            if line not in lines:
                lines.append(line)
    return lines


def parse_params(data: Any, path: str = "params.yaml") -> Params:
    """Validate an already-loaded mapping; raises :class:`ParamsError` listing every problem."""
    if not isinstance(data, dict):
        raise ParamsError(path, [f"top level must be a mapping of keys, got {type(data).__name__}"])
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        raise ParamsError(path, _problems(exc)) from None


def read_yaml(path: str | Path) -> Any:
    """Load YAML exactly as DVC does (ruamel.yaml safe loader, YAML 1.2)."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import MarkedYAMLError, YAMLError

    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ParamsError(str(path), ["file not found"]) from None
    try:
        return YAML(typ="safe").load(text) or {}
    except MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ParamsError(str(path), [f"YAML syntax error at {where}{exc.problem}"]) from None
    except YAMLError as exc:
        raise ParamsError(str(path), [f"YAML syntax error: {exc}"]) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    return parse_params(read_yaml(path), str(path))


def load_section(path: str | Path, section: str) -> Section:
    """Section ``section`` of the params file alone (its defaults where absent), checked as
    :func:`load_params` checks it, problems named by their dotted keys. What a stage that may be off
    reads first: the whole file's checks build the model registry, and with it import torch, which
    an idle stage should not pay for (the stages that read the other sections check them)."""
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ParamsError(str(path), [f"top level must be a mapping of keys, got {type(data).__name__}"])
    field = Params.model_fields[section]
    only = create_model(f"Only_{section}", __base__=Section, **{section: (field.annotation, field)})
    try:
        return getattr(only.model_validate({k: v for k, v in data.items() if k == section}), section)
    except ValidationError as exc:
        raise ParamsError(str(path), _problems(exc)) from None


def get_dotted(tree: Any, key: str, default: Any = None) -> Any:
    """``tree["synth"]["flatness"]["weight"]`` for the params key ``synth.flatness.weight``;
    ``default`` when a part is absent or not a mapping. The one walker of dotted params keys."""
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return default
        tree = tree[part]
    return tree


def set_dotted(tree: dict, key: str, value: Any) -> None:
    """``tree["relabel"]["epochs"] = value`` for the params key ``relabel.epochs``, creating the
    sections on the way that ``tree`` lacks. The one writer of dotted params keys."""
    *parents, last = key.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value
