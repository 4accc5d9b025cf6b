"""Every option of a prune, declared once.

:class:`PruneOptions` is the single declaration of what ``qsurgeon prune`` accepts: each
field carries its type, bounds, default, help text and the presets that set it. Everything
else is derived from it:

- the command line's arguments (:func:`qsurgeon.client.cli.arguments.add_model_arguments`),
- the REST request schema (:class:`JobOptions`: the same fields minus those the server
  decides itself, so ``/openapi.json`` shows every option with its bounds),
- the engine's configuration (the engine reads these fields; the iCBS loop's settings are
  a view of them),
- the presets (:data:`PRESETS`, gathered from the fields' ``presets`` entries).

It lives in the client portion (pydantic only) so that the SDK, the server and the engine
validate with the same code: an option the API accepts is an option the engine runs.
Checks that need the engine's registries (installed solvers and their parameters) are the
engine's (``qsurgeon.server.engine.options``) and run before a job is accepted.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from qsurgeon.client.errors import UsageError

Method = Literal["icbs", "wanda", "magnitude", "sparsegpt", "alps"]
Granularity = Literal["row", "column", "tensor"]
Objective = Literal["layerwise", "fisher", "layerwise+fisher"]
Init = Literal["wanda", "magnitude", "gradient", "random", "sparsegpt", "alps"]
Selection = Literal["score", "random"]
Preset = Literal["fast", "quality"]
PRESET_NAMES: tuple[str, ...] = ("fast", "quality")

#: a solver name: the registry decides which exist
SOLVER_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
#: The block solver wherever none is named: prune, jobs, `qsurgeon solve`, POST /v1/solve, the SDK and
#: the shadow composite's classical side (auto picks a solver and effort per block; docs/solvers.md).
DEFAULT_SOLVER = "auto"
PATTERN = re.compile(r"^(\d{1,3}):(\d{1,3})$")
#: calibration samples of the quality preset: the largest lever measured on MiniLM
#: (128 → 256 samples added 0.014 of cosine at density 0.5; docs/results.md)
QUALITY_SAMPLES = 256
#: the most entries a list option or ``solver_params`` may hold, and the longest string
MAX_ITEMS = 64
MAX_TEXT = 4096


def option(default: Any, help: str, *, group: str = "prune", cli: bool = True, server_owned: bool = False,
           presets: Mapping[str, Any] | None = None, metavar: str | None = None, **constraints: Any) -> Any:
    """A field of :class:`PruneOptions`, with what the derived interfaces need to know.

    ``group``: the ``--help`` section; ``cli``: whether ``qsurgeon prune`` has a flag for it;
    ``server_owned``: the service decides it (paths on its disk), so a REST request cannot
    set it; ``presets``: preset name → value.
    """
    extra: dict[str, Any] = {"group": group}
    if not cli:
        extra["cli"] = False
    if server_owned:
        extra["server_owned"] = True
    if presets:
        extra["presets"] = dict(presets)
    if metavar:
        extra["metavar"] = metavar
    return Field(default, description=help, json_schema_extra=extra, **constraints)


class OptionChecks(BaseModel):
    """The checks of every prune option that its type and bounds cannot say, shared by
    :class:`PruneOptions` and the REST request's :data:`JobOptions`."""

    model_config = ConfigDict(extra="forbid", validate_default=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: Any) -> Any:
        """JSON's true is not 1: a boolean given for a number is a mistake, not a value."""
        if isinstance(value, bool):
            annotation = cls.model_fields[info.field_name].annotation
            if annotation is not bool:
                raise ValueError("must be a number, not a boolean")
        return value

    @field_validator("density", "time_limit", "fixed_pruned", "fixed_kept", "coverage", "gamma", "ridge",
                     "fisher_weight", "damp", check_fields=False)
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("pattern", check_fields=False)
    @classmethod
    def _pattern(cls, value: str | None) -> str | None:
        if value is None:
            return None
        match = PATTERN.fullmatch(value)
        if not match:
            raise ValueError(f"must look like N:M (e.g. 2:4), got {value!r}")
        keep, group = int(match[1]), int(match[2])
        if not 0 < keep < group:
            raise ValueError(f"{value} must keep between 1 and M - 1 of every M")
        return value

    @field_validator("include", "exclude", check_fields=False)
    @classmethod
    def _globs(cls, value: list[str]) -> list[str]:
        if not all(pattern and len(pattern) <= 256 for pattern in value):
            raise ValueError("each glob must be 1 to 256 characters")
        return value

    @field_validator("solver_params", check_fields=False)
    @classmethod
    def _params(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name, item in value.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", name):
                raise ValueError(f"parameter name {name!r} is not an identifier")
            if isinstance(item, str) and len(item) > 256:
                raise ValueError(f"parameter {name} is longer than 256 characters")
            if isinstance(item, float) and not math.isfinite(item):
                raise ValueError(f"parameter {name} must be finite")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "OptionChecks":
        pattern, density = getattr(self, "pattern", None), getattr(self, "density", None)
        if pattern is not None:
            keep, group = (int(part) for part in pattern.split(":"))
            if density is not None and abs(density - keep / group) > 1e-9:
                raise ValueError(f"density {density} contradicts pattern {pattern} (density {keep / group:g})")
        k, block_size = getattr(self, "k", None), getattr(self, "block_size", 128)
        if k is not None and k >= block_size:
            raise ValueError(f"k must lie in 1..{block_size - 1} (block-size - 1), got {k}")
        return self


class UsageChecked(OptionChecks):
    """A model built from Python or the command line: an invalid value is a UsageError
    (one line naming the field) rather than pydantic's multi-line ValidationError."""

    def __init__(self, **values: Any):
        try:
            super().__init__(**values)
        except ValidationError as error:
            raise InvalidOptions(error) from None


class InvalidOptions(UsageError):
    """Invalid option values: one line naming each field; ``flags()`` names them as CLI flags."""

    def __init__(self, error: ValidationError):
        super().__init__(describe_error(error))
        self.validation_error = error

    def flags(self) -> str:
        return describe_error(self.validation_error, flag_style=True)


class PruneOptions(UsageChecked):
    """Every option of ``qsurgeon prune``; a service job carries the same fields."""

    model_config = ConfigDict(extra="forbid", validate_default=False, title="PruneOptions")

    model: str = option(..., "a local Hugging Face folder with safetensors weights, or builtin:minilm",
                        cli=False, server_owned=True, min_length=1, max_length=MAX_TEXT)
    preset: Preset | None = option(
        None, "fast: Wanda plus one iCBS epoch; quality: every layer fitted to the dense model's outputs, iCBS from "
        "ALPS's mask scored with refit weights, refit, keep the better per row (see docs/quality.md); options given "
        "explicitly override the preset's")
    method: Method = option("icbs", "pruning method", presets={"fast": "icbs", "quality": "icbs"})
    density: float | None = option(None, "fraction of weights kept, 0 < d < 1 (default 0.5, or what --pattern implies)",
                                   gt=0.0, lt=1.0)
    pattern: str | None = option(None, "keep N of every M consecutive input weights of a row (2:4, 4:8)",
                                 metavar="N:M", max_length=7)
    granularity: Granularity = option("row", "where the density holds")
    objective: Objective = option("layerwise", "what iCBS minimises (docs/icbs.md §4, §5)")
    block_output: bool = option(False, "judge iCBS's masks by the transformer block's output error on calibration "
                                "inputs: per tensor keep iCBS's mask or the initial one, whichever the block's "
                                "output prefers (with --refit, each with its refit weights; docs/icbs.md)")
    keep_better: bool = option(False, "after iCBS (and --refit), keep per row (per tensor under tensor or column "
                               "granularity) iCBS's result or the initial method's own (e.g. ALPS's mask and "
                               "weights), whichever has the lower calibration layer error: never worse than "
                               "either on that error (docs/quality.md)",
                               presets={"quality": True})
    search_on: Literal["original", "refit"] = option(
        "original", "the weights iCBS scores a mask with: original (w0, kept weights fixed; docs/icbs.md §5) or "
        "refit (the initial mask's refit weights, a restored weight at its best value: an upper bound of the "
        "error after the refit, exact at the start, so search plus refit never raises it; layerwise only; "
        "docs/quality.md)", presets={"quality": "refit"})
    init: Init = option("wanda", "initial mask for iCBS", presets={"fast": "wanda", "quality": "alps"})
    solver: str = option(DEFAULT_SOLVER, "block solver (see qsurgeon solvers; auto picks one per block)", pattern=SOLVER_NAME)
    solver_params: dict[str, int | float | str | bool] = option(
        {}, "parameters of the block solver, checked against the solver's declared parameters",
        metavar="NAME=VALUE", max_length=MAX_ITEMS)
    reference: str | None = option(
        None, "also solve every block with this classical solver (a shadow run): the better answer is merged "
        "(see --merge) and experiment.jsonl records both, block by block (docs/quantum.md)", metavar="SOLVER",
        pattern=SOLVER_NAME)
    merge: Literal["best", "quantum"] = option(
        "best", "with --reference: best merges the lower-energy answer; quantum merges --solver's answer alone "
        "(a pure-hardware run; the reference only measures it)")
    route: str | None = option(
        None, "send to --solver only the blocks this rule takes, the rest to --reference (or auto): all, size<=N, "
        "tensor=GLOB, fraction=F, comma-separated, all must hold (docs/quantum.md)", metavar="RULE",
        min_length=1, max_length=256)
    block_size: int = option(128, "weights per iCBS block (B)", ge=2, le=4096)
    epochs: int = option(1, "iCBS epochs", ge=0, le=1000, presets={"fast": 1, "quality": 1})
    steps_per_epoch: int | None = option(
        None, "iCBS blocks per epoch (default: one sweep over every row of every tensor; set it for the fisher "
        "objectives, whose rounds hold one block per tensor)", metavar="N", ge=1, le=10_000_000)
    calibration: str = option("builtin", "text models: a text file (one sample per line) or .npy/.safetensors token "
                              "ids; image classifiers: images:DIR or npz:FILE of pixels; builtin for both",
                              server_owned=True, metavar="FILE|images:DIR|npz:FILE|builtin", min_length=1,
                              max_length=MAX_TEXT)
    samples: int = option(128, "calibration samples", ge=1, le=65_536, presets={"quality": QUALITY_SAMPLES})
    seq_len: int = option(128, "tokens per calibration sample", ge=2, le=32_768)
    batch_size: int = option(16, "calibration samples per forward pass", ge=1, le=4096)
    seed: int = option(0, "random seed", ge=0, le=2**32 - 1)
    device: str = option("auto", "where each transformer block is captured, scored, searched and refit: auto (cuda "
                         "when available), cpu, cuda or cuda:N; the model itself stays in host memory (docs/scale.md)",
                         metavar="auto|cpu|cuda[:N]", pattern=r"^(auto|cpu|cuda(:[0-9]{1,2})?)$")
    out: str | None = option(None, "output folder (must not exist or be empty)", cli=False, server_owned=True,
                             max_length=MAX_TEXT)
    time_limit: float | None = option(None, "stop iCBS after the round running at S seconds (the masks stay valid)",
                                      metavar="S", gt=0.0, le=30 * 24 * 3600.0)
    max_failed_fraction: float = option(0.0, "a service job fails when more than this fraction of its blocks got "
                                        "no answer in every attempt (0: any such block fails the job)",
                                        metavar="F", ge=0.0, le=1.0)
    refit: bool = option(False, "refit kept weights by least squares after masking",
                         presets={"fast": False, "quality": True})
    damp: float = option(0.01, "damping of the refit and SparseGPT, a fraction of mean(diag H)", ge=0.0, le=10.0)
    match_dense: bool = option(False, "fit every layer to the dense model's output of that layer, not to its own "
                               "output on the pruned model's inputs, so the error earlier layers left is corrected; "
                               "a block's linears are then pruned group by group (q/k/v, o, ...), and calibration "
                               "costs about 2.5x (docs/quality.md)", presets={"quality": True})
    include: list[str] = option([], "prune only tensors matching this glob (repeatable)", metavar="PAT",
                                max_length=MAX_ITEMS)
    exclude: list[str] = option(["lm_head"], "never prune tensors matching this glob (repeatable; default lm_head)",
                                metavar="PAT", max_length=MAX_ITEMS)
    export_blocks: str | None = option(None, "also write every solved block QUBO to DIR (re-solve with qsurgeon "
                                       "solve DIR); the estimated size is printed first", server_owned=True,
                                       metavar="DIR", max_length=MAX_TEXT)
    export_sample: int | None = option(None, "with --export-blocks: write at most N blocks of each round (or of "
                                       "each tensor, --export-sample-per tensor), drawn with the seed",
                                       server_owned=True, metavar="N", ge=1, le=10_000_000)
    export_sample_per: Literal["round", "tensor"] = option("round", "what --export-sample counts per",
                                                          server_owned=True)
    # how iCBS searches: docs/icbs.md §3 (selection) and §6 (schedule)
    k: int | None = option(None, "pruned weights per block (default block-size / 2)", group="search", ge=1, le=4095)
    selection: Selection = option("score", "block selection", group="search")
    tabu_size: int = option(1, "recent blocks per row whose weights are skipped", group="search", metavar="N",
                            ge=0, le=1024)
    fixed_pruned: float = option(0.0, "fraction of each row's initial pruned set that stays pruned",
                                 group="search", metavar="F", ge=0.0, lt=1.0)
    fixed_kept: float = option(0.0, "fraction of each row's initial kept set that stays kept", group="search",
                               metavar="F", ge=0.0, lt=1.0)
    coverage: float = option(1 / 3, "blocks per row and sweep = max(1, round(coverage · width / block-size))",
                             group="search", ge=0.0, le=16.0, presets={"quality": 1 / 6})
    gamma: float = option(0.75, "fisher: gradient multiplier γ", group="search", ge=0.0, le=1000.0)
    ridge: float = option(1e-3, "fisher: ridge λ on weight changes", group="search", ge=0.0, le=1000.0)
    fisher_weight: float = option(1.0, "layerwise+fisher: weight of the fisher term", group="search", ge=0.0,
                                  le=1e6)

    # ------------------------------------------------------------------ derived views
    @property
    def effective_density(self) -> float:
        """The fraction of weights kept: the pattern's N/M, the density, or 0.5."""
        if self.pattern is not None:
            keep, group = (int(part) for part in self.pattern.split(":"))
            return keep / group
        return 0.5 if self.density is None else self.density

    def to_dict(self) -> dict[str, Any]:
        """The JSON form a job record or report.json stores."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "PruneOptions":
        """Options from their JSON form; UsageError names every invalid or unknown field."""
        try:
            return cls.model_validate(dict(values))
        except ValidationError as error:
            raise UsageError(describe_error(error)) from None

    def identity(self) -> dict[str, Any]:
        """The options that decide the masks (a checkpoint must match these to be resumed)."""
        return self.model_dump(mode="json", exclude={"out", "time_limit", "export_blocks", "batch_size", "preset",
                                                          "device", "max_failed_fraction",
                                                          "export_sample", "export_sample_per"})


def field_extra(name: str) -> dict[str, Any]:
    """The interface facts of one field (group, cli, server_owned, presets, metavar)."""
    extra = PruneOptions.model_fields[name].json_schema_extra
    return dict(extra) if isinstance(extra, dict) else {}


def _gather_presets() -> dict[str, dict[str, Any]]:
    presets: dict[str, dict[str, Any]] = {name: {} for name in PRESET_NAMES}
    for name in PruneOptions.model_fields:
        for preset, value in field_extra(name).get("presets", {}).items():
            presets[preset][name] = value
    return presets


#: ``--preset NAME``: values that explicit options override, gathered from the fields.
#: ``quality`` is the best iCBS combination measured on MiniLM (docs/quality.md): every layer
#: fitted to the dense model's outputs (``match_dense``), one epoch from ALPS's mask scored with
#: the refit weights (``search_on="refit"``), then refit and ``keep_better`` (per row, never
#: worse than ALPS on the calibration error of the same target), at coverage 1/6;
#: ``fast`` is Wanda plus one epoch. The same values serve every model kind: on the
#: benchmark's causal LM the former LM-only quality preset (blocks of 8 from Wanda's mask,
#: damping 0.001) lost to ALPS at every density, and these settings tie ALPS there.
PRESETS = _gather_presets()


def preset_values(preset: str | None) -> dict[str, Any]:
    """What ``preset`` sets (empty for no preset)."""
    if preset is None:
        return {}
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    return dict(PRESETS[preset])


def describe_error(error: ValidationError, flag_style: bool = False) -> str:
    """One line naming each invalid field: ``block_size: Input should be ...`` (or ``--block-size``)."""
    parts = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"]) or "options"
        if flag_style and item["loc"]:
            location = "--" + str(item["loc"][0]).replace("_", "-")
        message = str(item["msg"]).removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown option"
        elif item["type"] == "literal_error":
            message = f"unknown value {item['input']!r}; choose one of: {item['ctx']['expected']}"
        elif item["type"] in ("greater_than", "less_than", "greater_than_equal", "less_than_equal"):
            message = f"{message}, got {item['input']!r}"
        parts.append(f"{location}: {message}")
    return "; ".join(parts)


def build_options(values: Mapping[str, Any], preset: str | None = None, *, flag_style: bool = False) -> PruneOptions:
    """PruneOptions from explicit ``values`` over ``preset``'s over the defaults.

    Raises UsageError with one line naming every invalid option.
    """
    known = preset in PRESETS  # an unknown name is refused below, with the field's message
    merged = {**(preset_values(preset) if known else {}), **dict(values)}
    if preset is not None:
        merged["preset"] = preset
    try:
        return PruneOptions(**merged)
    except InvalidOptions as error:
        raise UsageError(error.flags() if flag_style else str(error)) from None


#: fields a REST request may set: every option except those the server decides itself
REQUEST_FIELDS: tuple[str, ...] = tuple(
    name for name in PruneOptions.model_fields if not field_extra(name).get("server_owned")
)


class _RequestChecks(OptionChecks):
    """A JSON request is typed: ``"2"`` is not a number (strict), and the server's own fields are named."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _server_owned(cls, values: Any) -> Any:
        if isinstance(values, Mapping):
            owned = sorted(name for name in values
                           if name in PruneOptions.model_fields and field_extra(name).get("server_owned"))
            if owned:
                raise ValueError(f"{', '.join(owned)} are set by the server, not by a request")
        return values


def _request_model() -> type[BaseModel]:
    fields: dict[str, Any] = {
        name: (PruneOptions.model_fields[name].annotation, PruneOptions.model_fields[name]) for name in REQUEST_FIELDS
    }
    model = create_model("JobOptions", __base__=_RequestChecks, **fields)
    model.__doc__ = ("The options of a prune job: the fields of `qsurgeon prune` that a request may set "
                     "(the server decides the model path, calibration file and output folder).")
    return model


#: the REST request's ``options`` object, derived from :class:`PruneOptions`
JobOptions = _request_model()

__all__ = [
    "JobOptions", "PRESETS", "PRESET_NAMES", "PruneOptions", "QUALITY_SAMPLES", "REQUEST_FIELDS",
    "build_options", "describe_error", "field_extra", "preset_values",
]
