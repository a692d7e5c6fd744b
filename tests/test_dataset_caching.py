"""Every cached dataset of every bundle config caches all of its deterministic pre-processing.

MONAI's ``CacheDataset`` caches the transforms before the first random one, and a nested ``Compose`` counts as
random: a config that nests the pre-processing (``Compose([@preprocessing, *@augmentation])``) silently caches
nothing and re-reads and re-normalises every NIfTI file in every epoch (attr_constraint 0.4.0 spent 20 of its 72 s
per epoch there). The configs flatten such chains; this test finds every cached dataset in every config.
"""

import json
from pathlib import Path

import pytest
from monai.bundle import ConfigParser
from monai.transforms import Compose, Transform
from monai.transforms.transform import RandomizableTrait

from tests.bundle_runner import REPO

CACHED_DATASETS = ("CacheDataset", "PersistentDataset", "ClassPairDataset")
NOT_RUN_CONFIGS = ("metadata.json", "pipeline.json")


def _datasets(node, path=()):
    """(id, ...) of every cached dataset in a parsed JSON config."""
    if isinstance(node, dict):
        target = node.get("_target_")
        if isinstance(target, str) and target.endswith(CACHED_DATASETS):
            yield "#".join(path)
        for key, value in node.items():
            yield from _datasets(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _datasets(value, (*path, str(index)))


def _cases():
    for config in sorted(REPO.glob("bundles/*/configs/*.json")):
        if config.name not in NOT_RUN_CONFIGS:
            for dataset_id in _datasets(json.loads(config.read_text())):
                yield pytest.param(config, dataset_id, id=f"{config.parent.parent.name}/{config.name}:{dataset_id}")


def _is_random(transform) -> bool:
    """The test ``CacheDataset`` applies to find where its cache stops."""
    return isinstance(transform, RandomizableTrait) or not isinstance(transform, Transform)


def _cached_prefix(transform: Compose) -> int:
    first = transform.get_index_of_first(_is_random)
    return len(transform.transforms) if first is None else first


def _transform(config: Path, dataset_id: str) -> Compose:
    """The dataset's transform, from the config alone or, for an overlay (evaluate.json, ...), over train.json."""
    error = None
    for files in ([config], [config.parent / "train.json", config]):
        parser = ConfigParser()
        try:
            parser.read_config([str(f) for f in files])
            if "mask_keys" in parser.config:  # attr_constraint derives it from the datalist; a literal avoids the data
                parser["mask_keys"] = ["mask"]
            transform = parser.get_parsed_content(f"{dataset_id}#transform")
        except Exception as exc:  # an overlay (its ids and references) resolves only over train.json
            error = exc
            continue
        return transform if isinstance(transform, Compose) else Compose(transform)
    raise AssertionError(f"{config}: cannot build {dataset_id}#transform: {error}")


@pytest.mark.parametrize("config, dataset_id", list(_cases()))
def test_the_cache_holds_every_deterministic_transform(config, dataset_id):
    transform = _transform(config, dataset_id)
    deterministic = _cached_prefix(transform.flatten())
    assert deterministic > 0, f"{dataset_id}: no deterministic pre-processing to cache"
    assert _cached_prefix(transform) == deterministic, (
        f"{config.name} {dataset_id}: CacheDataset would cache {_cached_prefix(transform)} of the {deterministic} "
        "deterministic transforms (a nested Compose counts as random); flatten the chain (Compose(...).flatten())"
    )


def test_the_check_finds_a_nested_chain():
    """The failure this test guards against: a nested pre-processing Compose caches nothing."""
    from monai.transforms import RandFlipd, ScaleIntensityd

    nested = Compose([Compose([ScaleIntensityd("image")]), RandFlipd("image", prob=0.5)])
    assert _cached_prefix(nested) == 0 and _cached_prefix(nested.flatten()) == 1
