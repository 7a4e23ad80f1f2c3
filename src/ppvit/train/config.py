"""The run's settings as one typed schema: small sections plus the method's own config.

A :class:`TrainConfig` is composed of :class:`BackboneConfig`, :class:`DataConfig`,
:class:`CryptoConfig`, :class:`OptimConfig`, :class:`RunConfig` and a
:class:`~ppvit.models.methods.MethodConfig` (``full``, ``linear``, ``melo``, ``lora-pe``). No
section re-declares another's field, so every setting has one flat name (``lr``,
``rank``, ``img_size``): the name of its ``ppvit train`` flag, of ``reproduce --set``
and of the keys accepted by :meth:`TrainConfig.from_flat`. On disk (``config.yaml``) the
config is nested by section; flat files written before the sections existed still load.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml

from ppvit._schema import describe, matches
from ppvit.models.configs import METHODS, LoraPEConfig, MethodConfig, method_config
from ppvit.models.weights import WEIGHTS_ENV
from ppvit.train.sections import (
    DEFAULT_MODEL,
    NO_ENCRYPTION,
    SECTIONS,
    BackboneConfig,
    CryptoConfig,
    DataConfig,
    OptimConfig,
    RunConfig,
)

ALIASES = {"lora_targets": "targets", "lora_dropout": "dropout"}
IGNORED_ON_RESUME = (
    *("quiet", "dist_timeout_s", "report_to", "strict", "log_every_steps", "device_data", "compile"),
    "out",  # the run folder is where it is now: one moved or copied resumes (config.yaml records the new place)
)


def _method_fields() -> dict[str, dataclasses.Field]:
    """Every method setting by name (a union over the methods; the first declaration with a help text wins:
    a subclass that only changes a default, as ``full`` does, re-declares the field without one)."""
    out: dict[str, dataclasses.Field] = {}
    for cls in METHODS.values():
        for f in dataclasses.fields(cls):
            if f.name not in out or (f.metadata.get("help") and not out[f.name].metadata.get("help")):
                out[f.name] = f
    return out


def _section_of() -> dict[str, str]:
    """Flat name -> section name, checked unique: a setting lives in one place only."""
    out: dict[str, str] = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.name in out:
                raise AssertionError(f"setting {f.name} declared in {out[f.name]} and {section}")
            out[f.name] = section
    clash = set(out) & set(_method_fields())
    if clash:
        raise AssertionError(f"method settings re-declared by a section: {sorted(clash)}")
    return out


SECTION_OF = _section_of()
# Numbers whose type allows what a run cannot do: each one's least value ("above": more than it)
# or, for shares, [0, 1). Checked with the types by ``from_flat``, so a bad value is one line
# before anything runs (a server's job is refused at submission, not when it starts).
AT_LEAST = {
    **dict.fromkeys(("img_size", "block_size", "epochs", "batch_size", "grad_accum", "save_every_steps"), 1),
    **dict.fromkeys(("train_subset", "test_subset", "log_every_steps"), 1),
    **dict.fromkeys(("loader_workers", "mixup", "cutmix", "patch_embed_lr_scale", "weight_decay", "warmup_epochs"), 0),
    "clip_grad": 0,  # 0: no clipping (None is "the default", 1.0)
}
ABOVE_ZERO = ("lr", "dist_timeout_s")
SEEDS = ("seed", "data_seed")  # [0, 2**32): what numpy and torch both take
SHARES = ("val_fraction", "label_smoothing")


def _hints() -> dict[str, Any]:
    """Flat name -> its type hint, sections' and methods' (a method's first declaration)."""
    out: dict[str, Any] = {}
    for cls in (*SECTIONS.values(), *METHODS.values()):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out.setdefault(f.name, hints[f.name])
    return out


HINTS = _hints()


def check_setting(name: str, value: Any) -> None:
    """Raise ValueError unless ``value`` is of setting ``name``'s type and in its range (None: the default)."""
    hint = HINTS.get(name)
    structured = any(dataclasses.is_dataclass(a) for a in (hint, *typing.get_args(hint)))  # splits: parsed by its own
    if hint is not None and not structured and not matches(value, hint):
        shown = repr(value) if len(repr(value)) <= 40 else f"a {type(value).__name__}"
        raise ValueError(f"{name} {shown}: must be {describe(hint)}")
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return
    if name in AT_LEAST and value < AT_LEAST[name]:
        raise ValueError(f"{name} {value}: must be at least {AT_LEAST[name]}")
    if name in ABOVE_ZERO and value <= 0:
        raise ValueError(f"{name} {value}: must be above 0")
    if name in SEEDS and not 0 <= value < 2**32:
        raise ValueError(f"{name} {value}: must be at least 0 and below 2**32")
    if name in SHARES and not 0 <= value < 1:
        raise ValueError(f"{name} {value}: must be at least 0 and below 1")


class GeometrySource(NamedTuple):
    """An input that fixes some of a run's geometry: a key file's pin, an encrypted dataset's manifest."""

    owner: str  # as a refusal names it: "key file k.key pins"
    said: str  # as the first log line names it: "the manifest of DATA"
    fixed: dict[str, Any]  # flat name -> value (None: not fixed)


@dataclass
class TrainConfig:
    """Everything a run needs; saved as ``config.yaml`` (nested by section) in the run folder."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    crypto: CryptoConfig = field(default_factory=CryptoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    method: MethodConfig = field(default_factory=LoraPEConfig)

    def __post_init__(self) -> None:
        """Settings left unset take the method's recipe (lr, head, patch-embedding rate): see ``MethodConfig.recipe``.

        Resolved here, so ``config.yaml`` records the values a run used; :meth:`replace` with
        another method keeps them (give the new method's values, or build with :meth:`from_flat`).
        """
        for name, value in self.method.recipe.items():
            section = getattr(self, SECTION_OF[name])
            if getattr(section, name) is None:
                setattr(section, name, value)

    @classmethod
    def from_flat(cls, **settings: Any) -> TrainConfig:
        """A config from flat names (``lr=1e-3, rank=8, method="melo"``); ``None`` means the default."""
        sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        method_name, method_opts = "lora-pe", {}
        method_fields = _method_fields()
        for name, value in settings.items():
            name = ALIASES.get(name, name)
            if name != "method" and name not in SECTION_OF and name not in method_fields:
                raise ValueError(f"unknown setting {name[:40]!r}")  # null too: a misspelt `learning_rate:` left empty
            if value is None:
                continue
            if name == "method":
                if not (isinstance(value, str) and value in METHODS):
                    raise ValueError(f"method {str(value)[:40]!r}: choose from {', '.join(METHODS)}")
                method_name = value
            elif name in SECTION_OF:
                sections[SECTION_OF[name]][name] = value
            else:
                method_opts[name] = value
            check_setting(name, value)
        cfg = cls(
            **{s: SECTIONS[s](**v) for s, v in sections.items()},
            method=method_config(method_name, **method_opts),
        )
        for name, value in cfg.flat().items():  # the recipe's values too
            check_setting(name, value)
        return cfg

    def flat(self) -> dict[str, Any]:
        """Flat names and values; method settings only where they differ from the method's defaults."""
        out: dict[str, Any] = {}
        for section in SECTIONS:
            out.update(dataclasses.asdict(getattr(self, section)))
        defaults = type(self.method)()
        out["method"] = self.method.name
        for f in dataclasses.fields(self.method):
            if getattr(self.method, f.name) != getattr(defaults, f.name):
                out[f.name] = getattr(self.method, f.name)
        return out

    def replace(self, **settings: Any) -> TrainConfig:
        """A copy with flat settings changed (checked as in :meth:`from_flat`)."""
        return TrainConfig.from_flat(**{**self.flat(), **{ALIASES.get(k, k): v for k, v in settings.items()}})

    def to_dict(self) -> dict[str, Any]:
        """Nested by section, as written to ``config.yaml``."""
        doc = {section: dataclasses.asdict(getattr(self, section)) for section in SECTIONS}
        return {**doc, "method": {"name": self.method.name, **dataclasses.asdict(self.method)}}

    @classmethod
    def from_dict(cls, doc: dict[str, Any], where: str = "config") -> TrainConfig:
        """From :meth:`to_dict`'s nesting, or from the flat layout of ppvit 0.1 files."""
        try:
            nested = any(isinstance(doc[s], dict) for s in SECTIONS if s in doc)
            if nested and (doc.get("method") is None or isinstance(doc["method"], str)):  # `method: melo` by name
                doc = {**doc, "method": {} if doc.get("method") is None else {"name": doc["method"]}}
            if isinstance(doc.get("method", {}), dict) and set(doc) <= {*SECTIONS, "method"}:
                for section in SECTIONS:
                    if doc.get(section) is not None and not isinstance(doc[section], dict):
                        raise ValueError(f"section {section}: {doc[section]!r} is not a mapping of settings")
                unknown = [f"{s}.{k}" for s, v in doc.items() if s in SECTIONS for k in v if SECTION_OF.get(k) != s]
                if unknown:
                    raise ValueError(f"unknown settings {', '.join(unknown)}")
                method = dict(doc.get("method", {}))
                flat = {k: v for s in SECTIONS for k, v in (doc.get(s) or {}).items()}
                return cls.from_flat(**flat, method=method.pop("name", "lora-pe"), **method)
            if nested:  # sections, and a setting beside them
                extra = sorted(str(k)[:40] for k in doc if k not in {*SECTIONS, "method"})
                raise ValueError(f"unknown settings {', '.join(extra)} beside the sections (each belongs in one)")
            return cls.from_flat(**doc)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from None

    @classmethod
    def load(cls, path: str | os.PathLike, **overrides: Any) -> TrainConfig:
        """A config from YAML, with flat ``overrides`` (e.g. command-line flags) taking precedence."""
        try:
            doc = yaml.safe_load(Path(path).read_text())
        except yaml.MarkedYAMLError as exc:  # PyYAML's own message is several lines, quoting the file
            mark = exc.problem_mark
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            raise ValueError(f"config file {path}: not valid YAML ({where}{exc.problem or exc.context})") from None
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ValueError(f"config file {path}: cannot be read ({exc})") from None
        if doc is None:  # a run's config.yaml emptied: --resume started a default run (a download of CIFAR-10)
            raise ValueError(f"config file {path}: empty (no settings)")
        if not isinstance(doc, dict):
            raise ValueError(f"config file {path}: not a mapping of settings")
        cfg = cls.from_dict(doc, where=f"config file {path}")
        return cfg.replace(**overrides) if overrides else cfg

    def dump(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def resolved(self) -> TrainConfig:
        """As the run will use it, recorded in ``config.yaml``: local paths absolute (a resume from any
        folder finds them), the pretrained weights chosen (see ``pretrained``'s help), and the scheme, block
        size and input size settled (:meth:`settled_geometry`)."""
        from ppvit.models.backbones import SMALL_VITS  # timm: only when a run starts

        changes: dict[str, Any] = {
            name: str(Path(value).resolve())
            for name in ("data", "key", "weights", "out")
            if (value := self.flat()[name]) is not None and (name == "out" or Path(value).exists())
        }
        b = self.backbone
        if b.weights is None and b.pretrained is None:
            local = os.environ.get(WEIGHTS_ENV)
            if b.model in SMALL_VITS:
                changes["pretrained"] = False
            elif b.model == DEFAULT_MODEL and local:
                changes["weights"], changes["pretrained"] = str(Path(local).resolve()), False
            else:
                changes["pretrained"] = True
        cfg = self.replace(**changes)
        return cfg.replace(**cfg.settled_geometry())

    def geometry_sources(self) -> list[GeometrySource]:
        """What the run's inputs fix of its scheme, block size and input size: the key file's pin (when this run
        encrypts with it) and the encrypted data's manifest."""
        from ppvit.crypto.keys import Key
        from ppvit.data.manifest import MANIFEST_NAME, PLAIN, read_manifest

        out = []
        key, data = self.crypto.key, self.data.data
        if self.crypto.scheme != NO_ENCRYPTION and key and Path(key).is_file():
            pin = Key.load(key).pin
            if pin is not None:
                fixed = {"scheme": pin.scheme, "block_size": pin.block_size, "img_size": pin.input_size}
                out.append(GeometrySource(f"key file {key} pins", f"the pin of key file {key}", fixed))
        if data and (Path(data) / MANIFEST_NAME).is_file():
            m = read_manifest(data)
            if m.scheme != PLAIN:
                fixed = {"scheme": m.scheme, "block_size": m.block_size, "img_size": m.size}
                out.append(GeometrySource(f"encrypted dataset {data} records", f"the manifest of {data}", fixed))
        return out

    def settled_geometry(self) -> dict[str, Any]:
        """Scheme, block size and input size (flat names) as the run will use them: each as given, else as the key
        file's pin or the encrypted data's manifest fixes it (:func:`ppvit.crypto.keys.settle`: a value either
        contradicts is refused in one line), the scheme else ``shuffle``; the others else the model's."""
        from ppvit.crypto.ciphers import Scheme
        from ppvit.crypto.keys import settle

        scheme = self.crypto.scheme
        values = {
            "scheme": scheme if scheme in (None, NO_ENCRYPTION) else str(Scheme.parse(scheme)),
            "block_size": self.crypto.block_size,
            "img_size": self.backbone.img_size,
        }
        labels = {"scheme": "scheme", "block_size": "block size", "img_size": "input size"}
        for source in self.geometry_sources():
            for name, value in source.fixed.items():
                values[name] = settle(labels[name], values[name], value, source.owner)
        values["scheme"] = values["scheme"] or "shuffle"
        return values

    def describe_start(self) -> str:
        """One line saying what will train, from which weights (a newcomer's first check)."""
        b = self.backbone
        source = (
            f"weights {b.weights}"
            if b.weights
            else "timm's pretrained weights (downloaded)"
            if b.pretrained
            else "random initialisation"
        )
        size = f"{b.img_size} px" if b.img_size else "its own input size"
        c = self.crypto
        images = "plain images"
        if c.encrypted:
            images = f"{c.scheme} in blocks of {c.block_size or 'its patch size'}"
            origins = " and ".join(source.said for source in self.geometry_sources())
            images += f" (from {origins})" if origins else ""
        return f"training {self.method.name} on {b.model} from {source} at {size}, {images}, lr {self.optim.lr:g}"


@dataclass(frozen=True)
class Setting:
    """One flat setting as the CLI sees it: name, value type, choices, default and help."""

    name: str
    type: type
    choices: tuple[str, ...] | None
    default: Any
    help: str


def _setting(f: dataclasses.Field, hint: Any) -> Setting:
    if typing.get_origin(hint) is not Literal:  # unwrap ``X | None``
        hint = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    choices = typing.get_args(hint) if typing.get_origin(hint) is Literal else None
    text = choices or dataclasses.is_dataclass(hint)  # a structured value (splits): text, read by its section
    return Setting(f.name, str if text else hint, choices, f.default, f.metadata.get("help", ""))


def per_method_defaults(name: str) -> dict[str, Any]:
    """method -> default of setting ``name`` where that depends on the method (its recipe or its own
    field default); empty where it does not."""
    out: dict[str, Any] = {}
    for method, cls in METHODS.items():
        own = {f.name: f.default for f in dataclasses.fields(cls)}
        if name in cls.recipe or name in own:
            out[method] = cls.recipe.get(name, own.get(name))
    return out if len({repr(v) for v in out.values()}) > 1 else {}


def settings(sections: tuple[str, ...] = (*SECTIONS, "method")) -> Iterator[Setting]:
    """The flat settings of the given sections (``method``: every method's own settings)."""
    for section in sections:
        if section == "method":
            yield Setting("method", str, tuple(METHODS), "lora-pe", "full, linear, melo or lora-pe")
            for f in _method_fields().values():
                owner = next(c for c in METHODS.values() if f in dataclasses.fields(c))
                yield _setting(f, typing.get_type_hints(owner)[f.name])
        else:
            cls = SECTIONS[section]
            hints = typing.get_type_hints(cls)
            yield from (_setting(f, hints[f.name]) for f in dataclasses.fields(cls))
