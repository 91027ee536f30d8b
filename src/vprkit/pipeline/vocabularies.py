"""Which vocabulary a map encodes with, and domain vocabularies shared by several maps.

A map's vocabulary is, in order: the one already in the map folder (an earlier or interrupted build's,
checked against the preset), a domain or file vocabulary the preset names (``vocabulary.source``;
``auto`` picks the nearest domain), or one clustered from the map's own images. The clustering itself
is :mod:`vprkit.aggregation.vocabulary`'s; domains are :mod:`vprkit.aggregation.domains`'.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

from ..aggregation import Vocabulary
from ..aggregation import domains
from ..aggregation.options import AggregationOptions, VocabularyOptions
from ..aggregation.vocabulary import build_vocabulary, descriptor_identity, resolve_vocabulary_source
from ..backbones import Backbone
from ..backbones.extract import ExtractionOptions, FeatureCache
from ..config import Config
from ..datasets import load_dataset
from ..errors import VocabularyMismatchError
from ..images import FolderImages, ImageSource, image_source
from ..maps import VOCAB_FILE, read_build_record, write_build_record
from .models import load_backbone, needs_vocabulary, resolve_config


def obtain_vocabulary(
    config: Config,
    backbone: Backbone,
    source: ImageSource,
    out: Path,
    progress: bool,
    log: Callable[[str], None],
    cache: FeatureCache | None = None,
) -> Vocabulary | None:
    """The map's vocabulary: the one already in ``out``, a domain/file vocabulary, or one built from ``source``."""
    if not needs_vocabulary(config):
        return None
    path = out / VOCAB_FILE
    if path.exists():  # an earlier (perhaps interrupted) build's: it must fit these settings too
        voc = Vocabulary.load(path)
        check_vocabulary(voc, config, backbone, path)
        return voc
    spec = config.vocabulary.source
    if spec == "auto":
        domain, dists = domains.pick_domain(backbone, ExtractionOptions.from_config(config), source)
        log(
            f"vocabulary: nearest domain is {domain!r} (distances {', '.join(f'{k} {v:.3f}' for k, v in dists.items())})"
        )
        spec = f"domain:{domain}"
    src = resolve_vocabulary_source(spec)
    if src is None:
        log(
            f"building vocabulary (K={config.vocabulary.k}) from "
            f"{min(len(source.keys), config.vocabulary.large_map_images)}+ images of the map"
        )
        voc = build_vocabulary(
            backbone,
            VocabularyOptions.from_config(config, backbone),
            [source],
            name=f"map:{out.name}",
            progress=progress,
            cache=cache,
        )
    else:
        voc = Vocabulary.load(src)
    check_vocabulary(voc, config, backbone, src or "built from the map")
    voc.save(path)
    return voc


def record_build_vocabulary(map_dir: Path, vocabulary: Vocabulary) -> None:
    """Add the vocabulary's K and checksum to ``build.json``; refuse one that differs from what the shards used."""
    found = read_build_record(map_dir)
    record = found.to_dict() if found is not None else {}
    before = record.get("vocabulary")
    now = {"k": vocabulary.k, "checksum": vocabulary.checksum}
    if before and before.get("checksum") != now["checksum"]:
        raise VocabularyMismatchError(
            f"{map_dir} was being built with vocabulary {before.get('checksum')} (K={before.get('k')}) but now "
            f"holds {now['checksum']} (K={now['k']}); the shards already written used the other one — build into "
            f"another --out"
        )
    if before != now:
        write_build_record(map_dir, {**record, "vocabulary": now})


def check_vocabulary(voc: Vocabulary, config: Config, backbone: Backbone, where) -> None:
    """The vocabulary encodes these descriptors (backbone, layer, size) with the preset's K and centre kind."""
    voc.check_compatible(
        descriptor_identity(AggregationOptions.from_config(config), backbone), source=f"preset {config.name}"
    )
    if voc.k != config.vocabulary.k:
        raise VocabularyMismatchError(f"vocabulary {where} has K={voc.k}, the preset asks for K={config.vocabulary.k}")


# ---- domain vocabularies -----------------------------------------------------------------------
def _database_sources(datasets: Sequence) -> dict[str, ImageSource]:
    loaded = [load_dataset(d) if isinstance(d, (str, os.PathLike)) else d for d in datasets]
    return {d.name: FolderImages(d.database_dir, d.database_images) for d in loaded}


def build_domain_vocabulary(
    name: str,
    datasets: Sequence,
    preset: str | Config | None = None,
    out: str | os.PathLike | None = None,
    progress: bool = True,
) -> Path:
    """Pool sub-sampled database descriptors of several datasets into one vocabulary ``name``."""
    config = resolve_config(preset)
    backbone = load_backbone(config)
    return domains.build_domain_vocabulary(
        backbone, VocabularyOptions.from_config(config, backbone), _database_sources(datasets), name, out, progress
    )


def analyse_dataset_domains(
    datasets: Sequence, preset: str | Config | None = None, plot: str | os.PathLike | None = None, progress: bool = True
):
    """GeM descriptors per dataset → PCA → suggested domains (+ scatter PNG). Saves the PCA for picking."""
    config = resolve_config(preset)
    return domains.analyse_dataset_domains(
        load_backbone(config), ExtractionOptions.from_config(config), _database_sources(datasets), plot, progress
    )


def pick_domain(
    images_dir: str | os.PathLike, preset: str | Config | None = None, keys: Sequence[str] | None = None
) -> tuple[str, dict[str, float]]:
    """The domain vocabulary nearest to the images of a new map."""
    config = resolve_config(preset)
    return domains.pick_domain(
        load_backbone(config), ExtractionOptions.from_config(config), image_source(images_dir, keys)
    )
