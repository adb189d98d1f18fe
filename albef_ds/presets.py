"""The shipped presets (``configs/*.yaml``) and DeepSpeed configs (``ds_configs/*.json``),
found by name from any directory.

The checkout's top-level ``configs/`` and ``ds_configs/`` are the only copies in git; a
wheel carries them inside the package (``albef_ds/_shipped/``, copied by setup.py's
build_py), an editable install or a checkout reads them where they are.
"""
from __future__ import annotations

from pathlib import Path

from .errors import ConfigError

_PACKAGE = Path(__file__).resolve().parent


def _folders(kind: str) -> list[Path]:
    return [_PACKAGE / "_shipped" / kind, _PACKAGE.parent / kind]


def shipped(kind: str, suffix: str) -> dict[str, Path]:
    """name -> file of every shipped ``kind`` (configs or ds_configs); the wheel's first."""
    out: dict[str, Path] = {}
    for folder in reversed(_folders(kind)):
        out.update({p.name[: -len(suffix)]: p for p in sorted(folder.glob(f"*{suffix}"))})
    return out


def _find(name_or_path: str, kind: str, suffix: str, key: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    # A bare name, or the old spelling relative to the checkout (ds_configs/zero2_bf16.json):
    # never a path into some other folder, so a typo there is not silently a shipped file.
    if str(path.parent) in (".", kind):
        stem = path.name[: -len(suffix)] if path.name.endswith(suffix) else path.name
        found = shipped(kind, suffix).get(stem)
        if found is not None:
            return found
    raise ConfigError(f"{key}: {name_or_path} is neither a file nor a shipped name "
                      f"(shipped: {', '.join(sorted(shipped(kind, suffix)))})")


def config_path(name_or_path: str) -> Path:
    """A YAML path, or a preset name: tiny, mid, albef-base (``.yaml`` optional)."""
    return _find(str(name_or_path), "configs", ".yaml", "--config")


def ds_config_path(name_or_path: str) -> Path:
    """A DeepSpeed JSON path, or a shipped name: zero2_bf16, zero3_bf16.json, ..."""
    return _find(str(name_or_path), "ds_configs", ".json", "config key 'distributed.ds_config'")
