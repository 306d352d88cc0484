"""OmegaConf resolvers and config checks shared by the Hydra entry points."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def conf_dir() -> str:
    """The folder of unclip's Hydra configs, as an absolute path (Hydra reads a relative one as a package).

    An installed wheel ships them inside the package (``unclip/conf``, mapped from the repo's top-level ``conf/``
    by pyproject.toml); a checkout or an editable install reads the repo's ``conf/`` beside the package.
    """
    package = Path(__file__).resolve().parent
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"unclip's configs are neither in {package / 'conf'} (installed wheel) nor in "
                            f"{package.parent / 'conf'} (source checkout); reinstall unclip")


def _demo_shards(split: str, image_size: int = 64) -> str:
    """``${demo_shards:train}``: the built-in demo set's shard pattern, generated on first use."""
    from unclip.data.demo_shapes import DemoShapesConfig, ensure_demo_shards

    if split not in ("train", "val"):
        raise ValueError(f"demo_shards takes 'train' or 'val', got {split!r}")
    return ensure_demo_shards(DemoShapesConfig(image_size=int(image_size)))[split]


def register_resolvers() -> None:
    """Register unclip's resolvers once (Hydra apps and tests call this before composing)."""
    if not OmegaConf.has_resolver("demo_shards"):
        OmegaConf.register_new_resolver("demo_shards", _demo_shards)


class ConfigError(ValueError):
    """A config that cannot work; raised before any compute, naming the key."""


def require_keys(cfg: DictConfig, *keys: str) -> None:
    """Fail naming the first of ``keys`` (dotted) that is missing or still ``???``."""
    for key in keys:
        if OmegaConf.select(cfg, key, throw_on_missing=False) is None and not _is_explicit_null(cfg, key):
            raise ConfigError(f"config key '{key}' must be set")


def _is_explicit_null(cfg: DictConfig, key: str) -> bool:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return isinstance(node, DictConfig) and leaf in node and not OmegaConf.is_missing(node, leaf)
