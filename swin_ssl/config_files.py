"""The repository's top-level ``configs/`` directory as the importable package ``configs``, and one loader for
``configs/<file>.py:<preset>``.

Config files import their siblings (``from configs import common``); :func:`configs_package` makes that work from
any working directory (``train.py`` loaded by path, tests, benchmarks, the demo) without editing ``sys.path``.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types

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
