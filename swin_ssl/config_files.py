"""The repository's top-level ``configs/`` directory as the importable package ``configs``, and one loader for
``configs/<file>.py:<preset>``.

Config files import their siblings (``from configs import common``); :func:`configs_package` makes that work from
any working directory (``train.py`` loaded by path, tests, benchmarks, the demo) without editing ``sys.path``.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types
from typing import Sequence

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def configs_package() -> types.ModuleType:
    """The ``configs`` package (already imported, or registered here over ``CONFIG_DIR``)."""
    if "configs" in sys.modules:
        return sys.modules["configs"]
    if not os.path.isdir(CONFIG_DIR):
        raise FileNotFoundError(f"config directory {CONFIG_DIR} not found (run from a checkout of the repository)")
    spec = importlib.machinery.ModuleSpec("configs", None, is_package=True)
    spec.submodule_search_locations = [CONFIG_DIR]
    package = importlib.util.module_from_spec(spec)
    sys.modules["configs"] = package
    return package


def config_module(name: str) -> types.ModuleType:
    """``configs/<name>.py`` as the module ``configs.<name>``."""
    configs_package()
    return importlib.import_module(f"configs.{name}")


def load_config(spec: str):
    """``"configs/moby_swin_tiny.py:smoke"`` (or ``"moby_swin_tiny:smoke"``; no preset = the file's default) ->
    the ``ml_collections.ConfigDict`` its ``get_config`` returns."""
    path, _, preset = spec.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    return config_module(name).get_config(preset or None)


def _config_arg(argv: Sequence[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None


def unknown_override(argv: Sequence[str], name: str = "config") -> str | None:
    """The one-line message for the first ``--config.a.b=...`` override whose key the config lacks (with the closest
    key of that block), or None if every override names an existing key."""
    path = _config_arg(argv, name)
    if path is None:
        return None
    file, _, preset = path.partition(":")
    spec = importlib.util.spec_from_file_location("_overridden_config", os.path.expanduser(file))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(preset or None)
    for arg in argv:
        if not arg.startswith(f"--{name}."):
            continue
        keys = arg[len(name) + 3:].split("=", 1)[0].split(".")
        block = config
        for depth, key in enumerate(keys):
            if not hasattr(block, "keys"):
                break
            if key not in block.keys():
                prefix = ".".join(keys[:depth])
                known = sorted(block.keys())
                close = difflib.get_close_matches(key, known, n=1) or [k for k in known if k.startswith(key)][:1]
                where = f"{name}.{prefix}" if prefix else name
                hint = f"; did you mean --{where}.{close[0]}?" if close else ""
                return f"--{name}.{'.'.join(keys)}: {where} has no key {key!r}{hint} (known: {', '.join(known)})"
            block = block[key]
    return None


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's flag parsing for the entry points (``app.run(main, flags_parser=parse_flags)``): a ``--config.x=y``
    override naming a key the config does not have exits with one line naming it, not a traceback."""
    from absl import flags

    try:
        return flags.FLAGS(list(argv))
    except (KeyError, AttributeError) as error:
        message = unknown_override(argv) or f"unknown config override: {str(error).splitlines()[0]}"
        raise SystemExit(f"FATAL Flags parsing error: {message}") from None
