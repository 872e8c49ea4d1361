"""The translations shipped with pop3proto, one JSON data file per language.

``load("de")`` gives the ``Catalog`` to add to ``Config.languages`` (the
English ``i-default`` and ``en`` are built in and need no file).  A file is
``{"tag": ..., "description": ..., "texts": {message id: text}}``; the ids
are those of ``pop3proto._texts.MESSAGES``.  An embedder's own file is read
with ``Catalog.from_json(path.read_bytes())``.
"""

from __future__ import annotations

from importlib import resources

from .._texts import Catalog

__all__ = ["available", "load"]


def available() -> list[str]:
    """The tags of the shipped translations, sorted."""
    return sorted(
        entry.name[: -len(".json")]
        for entry in resources.files(__name__).iterdir()
        if entry.name.endswith(".json")
    )


def load(tag: str) -> Catalog:
    """The shipped catalog for *tag* (as ``available()`` names it).

    Raises:
        LookupError: no translation of that tag is shipped.
        ValueError: the data file is broken.
    """
    if tag not in available():
        raise LookupError(f"no shipped translation for {tag!r}; have {available()}")
    catalog = Catalog.from_json(resources.files(__name__).joinpath(f"{tag}.json").read_bytes())
    if catalog.tag != tag:
        raise ValueError(f"{tag}.json declares the tag {catalog.tag!r}")
    return catalog
