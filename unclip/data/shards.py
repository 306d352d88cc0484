"""Shard specifications: expand brace patterns, lists and URLs into a list of shard URLs.

A spec is a string or a list of strings. Each string may hold brace patterns
(``dir/{00000..00009}.tar``), several specs joined by ``::`` (webdataset's convention), local paths
or any URL that webdataset/fsspec opens (``s3://``, ``https://``, ``pipe:``). Local paths are checked
when the spec is expanded so that a typo fails before training starts, naming the config key.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence

import braceexpand


def is_remote(url: str) -> bool:
    """True for URLs that webdataset opens itself (a scheme, or a ``pipe:`` command)."""
    return url.startswith("pipe:") or "://" in url


class ShardSpecError(ValueError):
    """A shard spec that names no usable shard; the message names the config key."""


def expand_shards(spec: str | Sequence[str] | None, key: str = "data.train_shards",
                  check_exists: bool = True) -> list[str]:
    """Expand a shard spec into an ordered list of shard URLs.

    :param spec: a string (brace patterns, ``::``-joined, local glob ``*``) or a list of such strings.
    :param key: the config key the spec came from, used in error messages.
    :param check_exists: refuse local shards that do not exist.
    :return: shard URLs in the order given (duplicates kept: a list may repeat a shard on purpose).
    :raises ShardSpecError: when the spec is empty, or names local files that do not exist.
    """
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        raise ShardSpecError(f"{key} is empty: give a shard pattern such as 'dir/{{00000..00009}}.tar'")
    parts = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    missing: list[str] = []
    for part in parts:
        for piece in str(part).split("::"):
            piece = os.path.expandvars(os.path.expanduser(piece.strip()))
            for url in braceexpand.braceexpand(piece):
                if is_remote(url):
                    urls.append(url)
                elif any(ch in url for ch in "*?["):
                    matched = sorted(glob.glob(url))
                    if not matched:
                        missing.append(url)
                    urls.extend(matched)
                elif check_exists and not os.path.isfile(url):
                    missing.append(url)
                else:
                    urls.append(url)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ShardSpecError(f"{key}: {len(missing)} shard(s) not found: {shown}")
    if not urls:
        raise ShardSpecError(f"{key}={spec!r} matched no shards")
    return urls
