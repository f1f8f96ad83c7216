"""Experiment configs: OmegaConf YAML in the latent-diffusion ``target``/``params`` convention.

A config file may list ``defaults:`` (files merged before it, paths relative to the file);
several files and ``key=value`` overrides merge left to right. Before anything is built,
:func:`load_config` checks every key against what it configures — a ``target``'s constructor
signature, the dataclass a parameter is typed with, ``lightning.Trainer`` — so an unknown key,
a missing required key or a value outside a ``Literal`` fails at once, naming the key and the
file (or "command line") that set it.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import importlib
import inspect
import math
import types
import typing
from pathlib import Path

import lightning as L
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


@dataclasses.dataclass(frozen=True)
class Schema:
    """What a kind of config holds at its top level, and how each section is checked."""

    keys: dict[str, str]  # key -> what it is
    required: tuple[str, ...]
    targets: tuple[str, ...] = ()  # sections holding one target/params
    target_maps: tuple[str, ...] = ()  # sections holding name -> target/params (null disables)
    typed: tuple[tuple[str, str], ...] = ()  # (section, "module.Dataclass") checked by fields


EXPERIMENT = Schema(
    keys={
        "name": "run name: logs/<name>/ holds its TensorBoard runs and checkpoints",
        "seed": "global seed (lightning.seed_everything, data shuffling)",
        "ckpt_path": "checkpoint to resume from: a path, 'last', or null",
        "export_dir": "where `export` writes the diffusers-format model",
        "model": "target/params of the LightningModule",
        "data": "target/params of the LightningDataModule",
        "trainer": "keyword arguments of lightning.Trainer",
        "logger": "target/params of the logger",
        "callbacks": "name -> target/params (null disables one)",
    },
    required=("name", "model", "data", "trainer"),
    targets=("model", "data", "logger"),
    target_maps=("callbacks",),
)
EVALUATION = Schema(
    keys={
        "name": "evaluation name: results/<name>/ and logs/<name>/ hold its outputs",
        "seed": "sampling seed of every method (each image: seed + a hash of its key)",
        "eval_set": "the poses, prompts and real images (experiments.evaluate.EvalSet)",
        "methods": "method name -> target/params of its predictor (null leaves one out)",
        "metrics": "target/params of the Evaluator that scores every method",
        "train_overrides": "key=value overrides for methods trained on the fly",
        "trainer": "keyword arguments of lightning.Trainer (generation and scoring)",
        "logger": "target/params of the TensorBoard logger (one run per method)",
    },
    required=("name", "eval_set", "methods", "metrics", "trainer"),
    targets=("metrics", "logger"),
    target_maps=("methods",),
    typed=(("eval_set", "experiments.evaluate.EvalSet"),),
)
COMMAND_LINE = "command line"


class ConfigError(ValueError):
    """A config that cannot work; the message names the key and where it was set."""


class Provenance(dict):
    """Dotted key -> the file (or "command line") that set it last."""

    def where(self, key: str) -> str:
        if key in self:
            return self[key]
        below = sorted({src for k, src in self.items() if k.startswith(key + ".")})
        if below:
            return ", ".join(below)
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        return self.where(parent) if parent else "?"


def _leaves(node, prefix: str = ""):
    if isinstance(node, dict) and node:
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else str(k))
    else:
        yield prefix


def _one_line(exc: Exception) -> str:
    """A parser's multi-line message as one line."""
    return " ".join(str(exc).split())


def _load_file(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[str, DictConfig]]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'defaults' include themselves")
    if not path.is_file():
        if path.suffix not in (".yaml", ".yml"):
            raise ConfigError(f"{path.name!r} is neither a config file nor a key=value override")
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        cfg = OmegaConf.load(path)
    except (OmegaConfBaseException, OSError, ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot parse: {_one_line(exc)}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: a config file must be a mapping")
    sources = []
    defaults = cfg.pop("defaults", None) or []
    for entry in defaults:
        sources += _load_file(path.parent / str(entry), (*seen, path))
    sources.append((_display(path), cfg))
    return sources


def _display(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def load_config(
    paths: list[str | Path], overrides: list[str] = (), schema: Schema | None = None
) -> tuple[DictConfig, Provenance]:
    """Merge config files and ``key=value`` overrides, then validate (raises ConfigError)
    against ``schema`` (default: :data:`EVALUATION` when the config lists ``methods``, else
    :data:`EXPERIMENT`).

    Returns the merged config and where each key was set.
    """
    sources: list[tuple[str, DictConfig]] = []
    for p in paths:
        sources += _load_file(Path(p))
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"{COMMAND_LINE}: overrides must be key=value, got {bad}")
    unset = [o for o in overrides if o.split("=", 1)[1].strip() == "???"]
    if unset:
        raise ConfigError(
            f"{COMMAND_LINE}: {unset[0]!r}: '???' marks a required value in a config file; "
            "give the value itself"
        )
    if overrides:
        try:
            sources.append((COMMAND_LINE, OmegaConf.from_dotlist(list(overrides))))
        except (OmegaConfBaseException, ValueError, yaml.YAMLError) as exc:
            raise ConfigError(
                f"{COMMAND_LINE}: cannot parse the overrides: {_one_line(exc)}"
            ) from None
    provenance = Provenance()
    for name, cfg in sources:
        for key in _leaves(OmegaConf.to_container(cfg, resolve=False)):
            provenance[key] = name
    merged = OmegaConf.merge(*[cfg for _, cfg in sources]) if sources else OmegaConf.create()
    if schema is None:
        schema = EVALUATION if "methods" in merged else EXPERIMENT
    validate(merged, provenance, schema)
    return merged, provenance


def validate(cfg: DictConfig, provenance: Provenance, schema: Schema = EXPERIMENT) -> None:
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", "?")
        reason = str(exc).splitlines()[0]
        raise ConfigError(f"{key} (in {provenance.where(str(key))}): {reason}") from None
    if missing:
        raise ConfigError(
            "missing required value(s): "
            + ", ".join(f"{k} (in {provenance.where(k)})" for k in missing)
        )
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", "?")
        raise ConfigError(f"{key} (in {provenance.where(str(key))}): {exc}") from None
    for key in container:
        if key not in schema.keys:
            _unknown(str(key), schema.keys, provenance, "a config's top level")
    for key in schema.required:
        if container.get(key) is None:
            raise ConfigError(f"missing required key '{key}' ({schema.keys[key]})")
    for key in schema.targets:
        if container.get(key) is not None:
            check_target(key, container[key], provenance)
    for section in schema.target_maps:
        for name, node in (container.get(section) or {}).items():
            if node is not None:
                check_target(f"{section}.{name}", node, provenance)
    for section, dataclass_name in schema.typed:
        check_kwargs(import_target(dataclass_name), container[section], section, provenance)
    trainer = container["trainer"]
    if not isinstance(trainer, dict):
        raise ConfigError(f"trainer (in {provenance.where('trainer')}) must be a mapping")
    for key in ("logger", "callbacks"):
        if key in trainer:
            raise ConfigError(
                f"trainer.{key} (in {provenance.where('trainer.' + key)}): set the top-level "
                f"'{key}' section instead"
            )
    check_kwargs(L.Trainer, trainer, "trainer", provenance, required=False)


def _unknown(key: str, known, provenance: Provenance, owner: str) -> typing.NoReturn:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(known), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ConfigError(
        f"unknown key '{key}' (in {provenance.where(key)}): not accepted by {owner}{hint}"
    )


def import_target(target: str):
    module, _, name = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"cannot import target {target!r}: {exc}") from None


def check_target(path: str, node, provenance: Provenance) -> None:
    if not isinstance(node, dict) or "target" not in node:
        raise ConfigError(f"{path} (in {provenance.where(path)}) needs a 'target' (and 'params')")
    for key in node:
        if key not in ("target", "params"):
            _unknown(f"{path}.{key}", ("target", "params"), provenance, f"{path}")
    try:
        obj = import_target(node["target"])
    except ConfigError as exc:
        raise ConfigError(
            f"{path}.target (in {provenance.where(path + '.target')}): {exc}"
        ) from None
    check_kwargs(obj, node.get("params") or {}, f"{path}.params", provenance)


def _dataclass_in(annotation):
    """The dataclass named in ``annotation`` (``X``, ``X | dict | None``), if any."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def _literal_in(annotation):
    """Allowed values when ``annotation`` is ``Literal[...]`` (optionally ``| None``)."""
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and typing.get_origin(args[0]) is typing.Literal:
            return (*typing.get_args(args[0]), None)
    return None


# Ranges of parameters whose name says what they are, wherever they appear (a datamodule's
# batch_size, an optimizer's lr, ...): (lowest, highest, lowest allowed itself).
RANGES: dict[str, tuple[float, float, bool]] = {
    "batch_size": (1, math.inf, True),
    "num_workers": (0, math.inf, True),
    "epoch_size": (1, math.inf, True),
    "shuffle_buffer": (0, math.inf, True),
    "resolution": (8, math.inf, True),
    "lr": (0, math.inf, False),
    "decay": (0, 1, True),
    "caption_dropout": (0, 1, True),
    "pose_dropout": (0, 1, True),
    "flip_prob": (0, 1, True),
    "num_inference_steps": (1, math.inf, True),
    "max_steps": (-1, math.inf, True),
    "accumulate_grad_batches": (1, math.inf, True),
    "every_n_train_steps": (0, math.inf, True),
    "every_n_steps": (1, math.inf, True),
    "log_every_n_steps": (0, math.inf, True),
    "subset": (1, math.inf, True),
    "timing_runs": (0, math.inf, True),
}


def _type_ok(value, annotation) -> bool:
    """Whether a YAML value can stand for ``annotation`` (types handdiff's parameters use;
    anything else is accepted unchecked)."""
    if annotation is None or annotation is typing.Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (list, tuple, collections.abc.Sequence) or annotation in (list, tuple):
        return isinstance(value, list | tuple)
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    if dataclasses.is_dataclass(annotation):
        return isinstance(value, dict | annotation)
    return True


def _describe(annotation) -> str:
    text = getattr(annotation, "__name__", None) or str(annotation)
    return text.replace("typing.", "")


def check_value(key_path: str, key: str, value, annotation, provenance: Provenance) -> None:
    """The value's type against the parameter's annotation, and its range by name."""
    where = provenance.where(key_path)
    if annotation is not None and not _type_ok(value, annotation):
        raise ConfigError(
            f"{key_path}={value!r} (in {where}): expected {_describe(annotation)}, "
            f"got {type(value).__name__}"
        )
    bounds = RANGES.get(key)
    if bounds is None or isinstance(value, bool) or not isinstance(value, int | float):
        return
    low, high, closed = bounds
    if value < low or value > high or (value == low and not closed):
        limit = f">= {low}" if closed else f"> {low}"
        if high != math.inf:
            limit += f" and <= {high}"
        raise ConfigError(f"{key_path}={value!r} (in {where}): must be {limit}")


def check_kwargs(obj, params, path: str, provenance: Provenance, required: bool = True) -> None:
    """Check ``params`` against ``obj``'s signature (a class, function or dataclass)."""
    if not isinstance(params, dict):
        raise ConfigError(f"{path} (in {provenance.where(path)}) must be a mapping")
    fn = obj.__init__ if inspect.isclass(obj) else obj
    signature = inspect.signature(obj)
    try:
        hints = typing.get_type_hints(fn)
        typed = True
    except Exception:  # unresolvable forward references in third-party code: skip types
        hints, typed = {}, False
    accepted = {
        n: p
        for n, p in signature.parameters.items()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    open_ended = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    owner = getattr(obj, "__qualname__", str(obj))
    for key, value in params.items():
        key_path = f"{path}.{key}"
        if key not in accepted:
            if open_ended:
                continue
            _unknown(key_path, accepted, provenance, owner)
        annotation = hints.get(key)
        unannotated = annotation is None and typed
        if unannotated and accepted[key].default not in (inspect.Parameter.empty, None):
            # unannotated: the default's type (lightning.Trainer's are annotated)
            annotation = type(accepted[key].default)
        choices = _literal_in(annotation)
        if choices is not None and value not in choices:
            raise ConfigError(
                f"{key_path}={value!r} (in {provenance.where(key_path)}): choose one of "
                f"{[c for c in choices if c is not None]}"
            )
        check_value(key_path, key, value, annotation, provenance)
        nested = _dataclass_in(annotation)
        if nested is not None and isinstance(value, dict):
            check_kwargs(nested, value, key_path, provenance)
        elif isinstance(value, dict) and "target" in value:
            check_target(key_path, value, provenance)
    if required:
        for name, p in accepted.items():
            if p.default is p.empty and name not in params and name != "self":
                raise ConfigError(
                    f"missing required key '{path}.{name}' for {owner} (in "
                    f"{provenance.where(path)})"
                )


def instantiate(node: dict, **extra):
    """Build ``target(**params, **extra)`` from a validated node. A target with a
    ``build_node`` parameter is handed this function, to build the ``target``/``params`` nodes
    nested in its own parameters: the layers below ``experiments/`` never import it."""
    target = import_target(node["target"])
    if "build_node" in inspect.signature(target).parameters:
        extra.setdefault("build_node", instantiate)
    return target(**(node.get("params") or {}), **extra)


def flatten(node, prefix: str = "") -> dict[str, object]:
    """Flat ``{"model.params.lr": 1e-5, ...}`` for TensorBoard's hparams (scalars and strings)."""
    out: dict[str, object] = {}
    if isinstance(node, dict):
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(node, bool | int | float | str):
        out[prefix] = node
    else:
        out[prefix] = str(node)
    return out
