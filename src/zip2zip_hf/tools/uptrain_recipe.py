"""The uptrain recipe: everything that decides the trained adapter (`UptrainRecipe`), read from
``--recipe`` with every field checked (`parse_recipe`), checked again against the base model once its
config is read (`check_recipe_fits_base`), and compared with the recipe a checkpoint was trained with
(`recipe_differences`), so that a resume with another recipe is refused, naming what differs."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field

from .report import CLIError, first_line


__all__ = ["UptrainRecipe", "check_recipe_fits_base", "parse_recipe", "recipe_differences"]

# The `Zip2ZipConfig` settings a recipe's "model" may hold (the compression ones come from K and M).
MODEL_KEYS = (
    "hyper_encoder",
    "hyper_encoder_hidden_size",
    "hyper_encoder_num_layers",
    "hyper_encoder_num_heads",
    "tie_hyper_encoders",
    "input_hyper_encoder_residual",
    "position_mode",
    "write_provisional_hypertokens",
)
CORPORA = ("stdlib", "broad")  # `zip2zip_hf.tools.corpus`: the standard library and pydoc, or everything installed
UPTRAIN_ENCODERS = ("attention", "mean")  # "reference" describes a converted checkpoint, not a fresh wrap


@dataclass
class UptrainRecipe:
    """Everything that decides the shipped model (saved in ``uptrain.json``)."""

    max_codebook_size: int = 2048
    max_subtokens: int = 4
    model: dict = field(default_factory=lambda: {"hyper_encoder": "attention", "position_mode": "base"})
    lora_r: int = 32
    learning_rate: float = 5e-4
    encoder_learning_rate: float = 1e-4
    warmup_ratio: float = 0.05
    window: int = 512
    eval_window: int = 1024  # held-out text is scored in windows of this many base tokens
    batch_size: int = 2
    prose_repeats: int = 2  # the prose windows are seen this many times per pass over the code (both corpora)
    max_chars: int | None = None  # of each kind of training text (None: all of it); the stdlib corpus
    corpus: str = "stdlib"  # or "broad": code and prose of everything installed (`build_corpus`)
    corpus_budgets: dict | None = None  # the broad corpus: bytes of the kinds it names (None: `DEFAULT_BUDGETS`)
    # The loss terms (`DistillationConfig`). Cross-entropy alone: at equal wall-clock on 2 CPU cores
    # (benchmarks/bench_quality.py) no teacher term has yet paid for the teacher's forward.
    distillation: dict = field(default_factory=lambda: {"ce": 1.0, "span": 0.0, "marginal": 0.0, "hidden": 0.0})
    seed: int = 0


def _json(value) -> str:
    return json.dumps(value)


def _int_field(name: str, value, least: int, most: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CLIError(f"--recipe: {name} must be an integer, got {_json(value)}")
    if value < least or (most is not None and value > most):
        bound = f"from {least} to {most}" if most is not None else f"at least {least}"
        raise CLIError(f"--recipe: {name} must be {bound}, got {value}")


def _number_field(name: str, value, least: float = 0.0, most: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CLIError(f"--recipe: {name} must be a finite number, got {_json(value)}")
    if value < least or (most is not None and value > most):
        bound = f"from {least} to {most}" if most is not None else f"at least {least}"
        raise CLIError(f"--recipe: {name} must be {bound}, got {value}")


def parse_recipe(text: str | None) -> UptrainRecipe:
    """The `UptrainRecipe` that ``--recipe`` (a JSON object of its fields) describes, every field checked:
    a `CLIError` naming the field otherwise (nothing is converted: ``"64"`` is not 64)."""
    if text is None:
        return UptrainRecipe()
    try:
        given = json.loads(text)
    except json.JSONDecodeError as error:
        raise CLIError(f"--recipe: not valid JSON ({error})") from None
    if not isinstance(given, dict):
        raise CLIError(f"--recipe: a JSON object of recipe fields, e.g. '{{\"lora_r\": 16}}', got {_json(given)}")
    names = [f.name for f in dataclasses.fields(UptrainRecipe)]
    unknown = [key for key in given if key not in names]
    if unknown:
        raise CLIError(f"--recipe: unknown field {', '.join(map(repr, unknown))} (the fields: {', '.join(names)})")
    recipe = UptrainRecipe(**given)
    _check_numbers(recipe)
    _check_corpus(recipe)
    _check_model(recipe)
    _check_distillation(recipe)
    return recipe


def _check_numbers(recipe: UptrainRecipe) -> None:
    from ..lzw_codebook import MAX_CODEBOOK_SIZE, MAX_SUBTOKENS

    _int_field("max_codebook_size", recipe.max_codebook_size, 0, MAX_CODEBOOK_SIZE)
    _int_field("max_subtokens", recipe.max_subtokens, 1, MAX_SUBTOKENS)
    _int_field("lora_r", recipe.lora_r, 1)
    _number_field("learning_rate", recipe.learning_rate)
    _number_field("encoder_learning_rate", recipe.encoder_learning_rate)
    _number_field("warmup_ratio", recipe.warmup_ratio, 0.0, 1.0)
    _int_field("window", recipe.window, 1)
    _int_field("eval_window", recipe.eval_window, 1)
    _int_field("batch_size", recipe.batch_size, 1)
    _int_field("prose_repeats", recipe.prose_repeats, 0)
    if recipe.max_chars is not None:
        _int_field("max_chars", recipe.max_chars, 1)
    _int_field("seed", recipe.seed, 0, 2**32 - 1)  # the Trainer seeds numpy too, which takes 32 bits


def _check_corpus(recipe: UptrainRecipe) -> None:
    if recipe.corpus not in CORPORA:
        raise CLIError(f"--recipe: corpus must be one of {', '.join(map(repr, CORPORA))}, got {_json(recipe.corpus)}")
    if recipe.corpus_budgets is not None:
        from .sources import KINDS

        if not isinstance(recipe.corpus_budgets, dict):
            raise CLIError(
                f"--recipe: corpus_budgets must be an object of bytes per kind, got {_json(recipe.corpus_budgets)}"
            )
        unknown = [key for key in recipe.corpus_budgets if key not in KINDS]
        if unknown:
            raise CLIError(
                f"--recipe: corpus_budgets: unknown kind {', '.join(map(repr, unknown))} "
                f"(the kinds: {', '.join(KINDS)})"
            )
        for key, value in recipe.corpus_budgets.items():
            _int_field(f"corpus_budgets.{key}", value, 0)


def _check_model(recipe: UptrainRecipe) -> None:
    if not isinstance(recipe.model, dict):
        raise CLIError(f"--recipe: model must be an object of model settings, got {_json(recipe.model)}")
    unknown = [key for key in recipe.model if key not in MODEL_KEYS]
    if unknown:
        raise CLIError(
            f"--recipe: model: unknown setting {', '.join(map(repr, unknown))} (the settings: {', '.join(MODEL_KEYS)})"
        )
    encoder = recipe.model.get("hyper_encoder", "attention")
    if encoder not in UPTRAIN_ENCODERS:
        raise CLIError(
            f"--recipe: model: hyper_encoder must be one of {', '.join(map(repr, UPTRAIN_ENCODERS))}, "
            f"got {_json(encoder)}"
        )
    # The other model settings are checked by `check_recipe_fits_base` once the base model's config is read.


def _check_distillation(recipe: UptrainRecipe) -> None:
    """The loss terms, completed by the recipe's defaults: at least one of them on."""
    from ..finetuning.distillation import DistillationConfig

    if not isinstance(recipe.distillation, dict):
        raise CLIError(f"--recipe: distillation must be an object of loss terms, got {_json(recipe.distillation)}")
    terms = [f.name for f in dataclasses.fields(DistillationConfig)]
    unknown = [key for key in recipe.distillation if key not in terms]
    if unknown:
        raise CLIError(
            f"--recipe: distillation: unknown term {', '.join(map(repr, unknown))} (the terms: {', '.join(terms)})"
        )
    for key, value in recipe.distillation.items():
        if key == "correction":
            if not isinstance(value, bool):
                raise CLIError(f"--recipe: distillation.correction must be true or false, got {_json(value)}")
        else:
            _number_field(f"distillation.{key}", value)
    # A term the recipe leaves out keeps the recipe's default weight (not `DistillationConfig`'s, whose
    # span term is on): '{"distillation": {"span": 0.5}}' adds the span term to cross-entropy.
    recipe.distillation = {**UptrainRecipe().distillation, **recipe.distillation}
    weights = asdict(DistillationConfig(**recipe.distillation))
    if not any(weights[key] > 0 for key in terms if key != "correction"):
        raise CLIError("--recipe: distillation: every loss term is 0, there is nothing to train")


def check_recipe_fits_base(recipe: UptrainRecipe, base_config) -> None:
    """Refuse (a `CLIError` naming the field) a recipe the base model (its ``base_config``) cannot
    train: a window longer than its positions, or model settings `Zip2ZipConfig` rejects for it."""
    from ..configuration_zip2zip import Zip2ZipConfig

    positions = getattr(base_config.get_text_config(), "max_position_embeddings", None)
    for name in ("window", "eval_window"):
        window = getattr(recipe, name)
        if positions is not None and window + 1 > positions:
            raise CLIError(
                f"--recipe: {name} {window} needs {window + 1} positions (a BOS token, then the window) but the "
                f"base model has {positions}: use {name} {positions - 1} or less"
            )
    try:
        Zip2ZipConfig(
            text_config=base_config,
            max_codebook_size=recipe.max_codebook_size,
            max_subtokens=recipe.max_subtokens,
            **recipe.model,
        )
    except (TypeError, ValueError) as error:
        raise CLIError(f"--recipe: model: {first_line(error)}") from None


def _comparable(recipe: dict) -> dict:
    """A recipe's fields with the model settings and the loss terms completed by their defaults, so
    that two recipes meaning the same training compare equal."""
    import inspect

    from ..configuration_zip2zip import Zip2ZipConfig
    from ..finetuning.distillation import DistillationConfig

    defaults = inspect.signature(Zip2ZipConfig.__init__).parameters
    out = dict(recipe)
    # Fields a recipe of an earlier version lacks, at the value that version trained with.
    out.setdefault("corpus", "stdlib")
    out.setdefault("corpus_budgets", None)
    if isinstance(out.get("model"), dict):
        given = out["model"]
        model = {key: given.get(key, defaults[key].default) for key in MODEL_KEYS}
        if "input_hyper_encoder_residual" not in given and model["hyper_encoder"] == "attention":
            if not model["tie_hyper_encoders"]:  # what `Zip2ZipForCausalLM.from_base` picks then
                model["input_hyper_encoder_residual"] = "last"
        out["model"] = model
    if isinstance(out.get("distillation"), dict):
        try:
            out["distillation"] = asdict(DistillationConfig(**out["distillation"]))
        except TypeError:  # a record of another version: compared as it is
            pass
    return out


# What a user knows these fields as.
FIELD_NAMES = {"max_codebook_size": "max_codebook_size (K)", "max_subtokens": "max_subtokens (M)"}


def recipe_differences(saved: dict, recipe: dict) -> list[str]:
    """``field (RUN in the run, NOW now)`` for each recipe field that differs."""
    saved, recipe = _comparable(saved), _comparable(recipe)
    differences = []
    for key in dict.fromkeys([*recipe, *saved]):
        before, now = saved.get(key), recipe.get(key)
        if isinstance(before, dict) and isinstance(now, dict):
            pairs = [(f"{key}.{k}", before.get(k), now.get(k)) for k in dict.fromkeys([*now, *before])]
        else:
            pairs = [(FIELD_NAMES.get(key, key), before, now)]
        differences += [f"{name} ({_json(a)} in the run, {_json(b)} now)" for name, a, b in pairs if a != b]
    return differences
