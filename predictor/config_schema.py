"""Unknown config keys: a composed config checked against the keys the conf/ files define.

Hydra refuses `foo=1` for a key the config lacks, but `+foo=1` adds it, and nothing read it: a typo
such as `+trainer.max_epoch=3` or `+simulate.budgets=4` ran with the defaults. `check_config(cfg,
"train")` compares the composed config with the schema: the primary file's keys and, for each config
group it lists, the union of the keys of every option in that group. A node with `_target_` also
accepts its target's parameters (so `+trainer.accumulate_grad_batches=2` is fine) unless the target
takes **kwargs; `callbacks` and `logger` hold entries of any name (each checked by its target).
`model.net` is left to PredictorConfig, which names unknown keys itself (and drops legacy ones).
No Hydra import: collect_job (integrate/) uses it on a plain mapping.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Mapping
from pathlib import Path

CONF = Path(__file__).resolve().parents[1] / "conf"
INSTANTIATE_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
NAMED_ENTRIES = {"callbacks", "logger"}  # maps of instantiable entries whose names the user chooses
FREE_FORM = {"sim.links"}  # maps whose keys are names the user chooses (link -> GB/s)
SELF_CHECKED = {"predictor.model.PredictorConfig", "predictor.config.PredictorConfig"}
SKIP = {"hydra", "defaults"}


class ConfigKeyError(KeyError):
    """An unknown config key; the message names it (str() is the plain message, not KeyError's repr)."""

    def __str__(self) -> str:
        return str(self.args[0])


def _load(path: Path) -> dict:
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    return node if isinstance(node, dict) else {}


def _keys(node) -> dict:
    """Nested key tree of a plain mapping: key -> subtree (empty for leaves)."""
    return {k: _keys(v) if isinstance(v, dict) else {} for k, v in node.items() if k not in SKIP}


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out.get(k, {}), v)
    return out


@functools.cache
def schema(primary: str) -> dict:
    """Key tree of conf/<primary>.yaml plus, per group in its defaults list, every option's keys."""
    path = CONF / f"{primary}.yaml"
    raw = _load(path)
    tree = _keys(raw)
    for entry in raw.get("defaults") or []:
        if not isinstance(entry, dict):
            continue
        for key in entry:
            group = str(key).split()[-1]  # "optional local" -> local
            folder = path.parent / group
            if group in SKIP or not folder.is_dir():
                continue
            for option in sorted(folder.glob("*.yaml")):
                if "@package _global_" in option.read_text().split("\n", 1)[0]:
                    continue  # experiments only set keys of the groups above
                tree[group] = _merge(tree.get(group, {}), _keys(_load(option)))
    return tree


def _params(target: str) -> set[str] | None:
    """Parameter names of a `_target_` callable; None when it takes **kwargs or cannot be imported."""
    module, _, name = target.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), name)
        params = inspect.signature(obj).parameters.values()
    except (ImportError, AttributeError, ValueError, TypeError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


def unknown_keys(cfg: Mapping, tree: dict, prefix: str = "") -> list[str]:
    """Dotted paths of the keys of `cfg` that `tree` (or the node's `_target_`) does not define."""
    out: list[str] = []
    target = cfg.get("_target_")
    if target in SELF_CHECKED:
        return out
    params, resolved = None, False
    for key, value in cfg.items():
        path = f"{prefix}{key}"
        if key in SKIP and not prefix:
            continue
        if key not in tree and key not in INSTANTIATE_KEYS:
            if target and not resolved:  # imported only when the files do not know the key
                params, resolved = _params(str(target)), True
            if not target or (params is not None and key not in params):
                out.append(path)
                continue
        if not isinstance(value, Mapping) or path in FREE_FORM:
            continue
        if path in NAMED_ENTRIES:
            for name, entry in value.items():
                if isinstance(entry, Mapping):
                    out += unknown_keys(entry, tree.get(key, {}).get(name, {}), f"{path}.{name}.")
        elif not target or "_target_" in value:  # a target's plain mapping arguments are its own business
            out += unknown_keys(value, tree.get(key, {}), f"{path}.")
    return out


def check_config(cfg: Mapping, primary: str) -> None:
    """Raise ConfigKeyError naming every key of `cfg` that conf/<primary>.yaml and its groups lack."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=False)
    bad = unknown_keys(cfg, schema(primary))
    if bad:
        names = ", ".join(f"'{k}'" for k in bad)
        raise ConfigKeyError(
            f"{Path(primary).name} config: unknown key{'s' if len(bad) > 1 else ''} {names} (not in conf/{primary}.yaml "
            "or its config groups): a typo, or an override with '+' that nothing reads"
        )
