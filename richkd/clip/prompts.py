"""Prompt sets as data: built-in and user YAML template lists, validation, class-name cleaning, stable hashes."""
from __future__ import annotations

import difflib
import functools
import hashlib
import importlib.resources
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import yaml

from richkd.schema import read_yaml

log = logging.getLogger(__name__)

PLACEHOLDER = "{}"
# Built-in sets. All but openai_imagenet80 are YAML files in richkd/clip/prompt_sets/; openai_imagenet80 is read
# from open_clip's own zero_shot_metadata at run time so it always matches the installed open_clip.
OPENAI_IMAGENET80 = "openai_imagenet80"
PROMPT_SETS: tuple[str, ...] = ("richkd12", OPENAI_IMAGENET80, "simple", "single")
_ALLOWED_KEYS = ("name", "templates", "description")


class PromptSetError(ValueError):
    """A prompt set is unknown or malformed; the message names the set or file and the fix."""


@dataclass(frozen=True)
class PromptSet:
    """A named tuple of templates, each with exactly one "{}" where the class name goes."""
    name: str
    templates: tuple[str, ...]

    @property
    def hash(self) -> str:
        return prompt_set_hash(self.templates)

    def __len__(self) -> int:
        return len(self.templates)


def clean_class_name(name: str) -> str:
    """"aquarium_fish" -> "aquarium fish": underscores to spaces, whitespace collapsed.

    The official RichKD code feeds torchvision's raw CIFAR-100 names (underscores kept,
    docs/method.md#the-official-code); cleaning is the `clip.clean_class_names` option.
    """
    return " ".join(name.replace("_", " ").split())


def prompt_set_hash(templates: Sequence[str]) -> str:
    """Short stable hash (16 hex chars) of an ordered list of templates (or class names), for cache keys and MLflow
    params."""
    return hashlib.sha256("\n".join(templates).encode("utf-8")).hexdigest()[:16]


def validate_templates(templates: object, source: str) -> tuple[str, ...]:
    """Check a template list and return it as a tuple; PromptSetError names `source` and the bad entry."""
    if isinstance(templates, (str, bytes)) or not isinstance(templates, Iterable):
        raise PromptSetError(f"prompt set {source}: `templates` must be a list of strings, got "
                             f"{type(templates).__name__}")
    out = tuple(templates)
    if not out:
        raise PromptSetError(f"prompt set {source}: the template list is empty; give at least one template "
                             f"such as 'a photo of a {{}}.'")
    for i, template in enumerate(out):
        if not isinstance(template, str):
            raise PromptSetError(f"prompt set {source}: template #{i + 1} is {type(template).__name__} "
                                 f"({template!r}), not a string")
        if "\n" in template or not template.strip():
            raise PromptSetError(f"prompt set {source}: template #{i + 1} ({template!r}) must be one non-empty line")
        count = template.count(PLACEHOLDER)
        if count != 1:
            raise PromptSetError(f"prompt set {source}: template #{i + 1} ({template!r}) contains {count} '{{}}' "
                                 "placeholders; it needs exactly one, where the class name goes")
    if len(set(out)) != len(out):
        log.warning("prompt set %s has duplicate templates; duplicates weigh more in the class average", source)
    return out


def format_prompts(class_names: Sequence[str], templates: Sequence[str], clean: bool = True) -> list[str]:
    """All prompts, class-major: [t0(c0), t1(c0), ..., t0(c1), ...] (length C*T).

    The placeholder is replaced literally (not str.format), so other braces in a template stay as written.
    """
    names = [clean_class_name(n) if clean else n for n in class_names]
    return [t.replace(PLACEHOLDER, n, 1) for n in names for t in templates]


def _read_yaml(text: str, source: str, default_name: str) -> PromptSet:
    try:
        data = read_yaml(text)
    except yaml.YAMLError as exc:
        raise PromptSetError(f"prompt set {source}: not valid YAML ({exc})") from None
    except RecursionError:
        raise PromptSetError(f"prompt set {source}: nested too deeply (hundreds of levels); a prompt set is a "
                             "mapping with `name:` and a flat `templates:` list") from None
    if not isinstance(data, dict):
        raise PromptSetError(f"prompt set {source}: expected a mapping with `name:` and `templates:` (a list of "
                             f"strings with one '{{}}' each), got {type(data).__name__}")
    unknown = sorted(set(data) - set(_ALLOWED_KEYS))
    if unknown:
        raise PromptSetError(f"prompt set {source}: unknown key(s) {unknown}; allowed: {list(_ALLOWED_KEYS)}")
    if "templates" not in data:
        raise PromptSetError(f"prompt set {source}: missing `templates:` list")
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name.strip():
        raise PromptSetError(f"prompt set {source}: `name` must be a non-empty string")
    return PromptSet(name.strip(), validate_templates(data["templates"], source))


@functools.lru_cache(maxsize=None)
def _builtin(name: str) -> PromptSet:
    if name == OPENAI_IMAGENET80:   # open_clip's lambdas `lambda c: f'a bad photo of a {c}.'`, called with "{}"
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        templates = (t(PLACEHOLDER) if callable(t) else str(t) for t in OPENAI_IMAGENET_TEMPLATES)
        return PromptSet(name, validate_templates(templates, name))
    resource = importlib.resources.files("richkd.clip").joinpath("prompt_sets").joinpath(f"{name}.yaml")
    return _read_yaml(resource.read_text(encoding="utf-8"), f"{name!r} (built-in)", name)


def load_prompt_set(name_or_path: str | os.PathLike) -> PromptSet:
    """A built-in set by name (see PROMPT_SETS) or a user YAML file with `name:` and `templates:`.

    Raises PromptSetError for an unknown name (with close matches), a missing file, or bad templates.
    """
    key = os.fspath(name_or_path)
    if key in PROMPT_SETS:
        return _builtin(key)
    path = Path(key).expanduser()
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PromptSetError(f"prompt set file {str(path)!r} cannot be read: {exc}") from None
        return _read_yaml(text, repr(str(path)), path.stem)
    if os.sep in key or "/" in key or key.endswith((".yaml", ".yml")):
        raise PromptSetError(f"prompt set file {str(path)!r} does not exist; give a YAML file with `name:` and "
                             f"`templates:`, or a built-in set: {', '.join(PROMPT_SETS)}")
    close = difflib.get_close_matches(key, PROMPT_SETS, n=2, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise PromptSetError(f"unknown prompt set {key!r}; built-in sets: {', '.join(PROMPT_SETS)}, or the path of a "
                         f"YAML file with `templates:`.{hint}")
