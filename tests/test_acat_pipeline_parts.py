"""The pieces around ACAT's networks: re-splitting by seed, the hemisphere flip, class weights,
multi-class rates, localisation targets, the saliency datalist and the stage runner."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, recall_score

from common import acat
from common.data import load_resplit, write_datalist
from common.data.transforms import RandHemisphereFlipd
from common.errors import InputError
from common.handlers import ClassificationRate
from common.losses import balanced_class_weights
from common.pipeline import main as pipeline_main


@pytest.fixture
def datalist(tmp_path):
    rng = np.random.default_rng(0)
    splits = {"training": [], "validation": [], "test": []}
    for i in range(60):
        nib.save(
            nib.Nifti1Image(rng.normal(size=(4, 4, 2)).astype(np.float32), np.eye(4)), tmp_path / f"{i:02d}.nii.gz"
        )
        split = ("training", "validation", "test")[i % 3]
        splits[split].append({"image": f"{i:02d}.nii.gz", "label": [0, 0, 1, 2, 3][i % 5], "case": i})
    write_datalist(tmp_path / "datalist.json", splits)
    return tmp_path / "datalist.json"


def _cases(path, split, seed):
    return [i["case"] for i in load_resplit(path, split, seed=seed, allowed_labels=range(4))]


def test_resplit_is_a_stratified_partition_fixed_by_the_seed(datalist):
    parts = {s: _cases(datalist, s, seed=1) for s in ("training", "validation", "test")}
    everything = sorted(c for p in parts.values() for c in p)
    assert everything == list(range(60))  # a partition of every item of every split
    assert [len(parts[s]) for s in ("training", "validation", "test")] == [42, 9, 9]  # 70/15/15
    assert parts == {s: _cases(datalist, s, seed=1) for s in parts}  # same seed, same split
    assert _cases(datalist, "test", seed=2) != parts["test"]  # another seed, another split
    labels = {i["case"]: i["label"] for s in parts for i in load_resplit(datalist, s, 1, allowed_labels=range(4))}
    train_labels = np.bincount([labels[c] for c in parts["training"]], minlength=4) / 42
    np.testing.assert_allclose(train_labels, [0.4, 0.2, 0.2, 0.2], atol=0.03)  # stratified
    assert _cases(datalist, "test", seed=None) == list(range(2, 60, 3))  # None keeps the datalist's


def test_hemisphere_flip_mirrors_the_image_and_swaps_left_and_right():
    flip = RandHemisphereFlipd(["image", "saliency"], prob=1.0)
    image = torch.arange(24.0).reshape(1, 4, 3, 2)
    for label, expected in ((0, 0), (1, 2), (2, 1), (3, 3)):
        out = flip({"image": image, "saliency": image + 1, "label": torch.tensor(label)})
        assert int(out["label"]) == expected
        torch.testing.assert_close(out["image"].as_tensor(), image.flip(1))
        torch.testing.assert_close(out["saliency"].as_tensor(), image.flip(1) + 1)
    unchanged = RandHemisphereFlipd("image", prob=0.0)({"image": image, "label": 1})
    assert unchanged["label"] == 1 and torch.equal(torch.as_tensor(unchanged["image"]), image)


def test_training_augmentation_moves_the_saliency_map_with_the_image():
    """The spatial transforms must move the map with the image, and only the image gets noise."""
    image = torch.linspace(-1, 1, 32 * 32 * 3).reshape(1, 32, 32, 3).roll(5, dims=1)
    transforms = acat.training_augmentation(map_keys=["saliency"], hemisphere_flip=0.5)
    for i, transform in enumerate(transforms):
        transform.set_random_state(seed=i)
    changed, labels = 0, set()
    for _ in range(20):
        data = {"image": image.clone(), "saliency": (image.clone() + 1) / 2, "label": torch.tensor(1)}
        for transform in transforms:
            data = transform(data)
        moved = (data["saliency"] * 2 - 1).flatten()
        changed += not torch.allclose(moved, image.flatten(), atol=1e-3)
        assert data["image"].shape == data["saliency"].shape == image.shape
        # same geometry: the image differs from the moved map only by noise and an intensity change
        assert np.corrcoef(data["image"].flatten().numpy(), moved.numpy())[0, 1] > 0.95
        assert float(data["saliency"].min()) >= -1e-6  # the map is never shifted or scaled
        labels.add(int(data["label"]))
    assert changed > 5 and labels == {1, 2}  # both flipped and unflipped, so left/right labels swapped


def test_balanced_class_weights_match_the_inverse_frequency():
    items = [{"label": k} for k in [0] * 8 + [1] * 4 + [3] * 4]
    weights = balanced_class_weights(items, 4)
    torch.testing.assert_close(weights, torch.tensor([16 / 24, 16 / 12, 1.0, 16 / 12]))


def test_multiclass_accuracy_and_one_vs_rest_rates_match_sklearn():
    rng = np.random.default_rng(3)
    y, p = rng.integers(0, 4, 50), rng.integers(0, 4, 50)

    def run(handler):
        handler.metric_fn.reset()
        handler.metric_fn([torch.tensor([v]) for v in p], [torch.tensor([v]) for v in y])
        return float(handler.metric_fn.aggregate())

    assert run(ClassificationRate("accuracy", positive=None)) == pytest.approx(accuracy_score(y, p))
    for k in range(4):
        assert run(ClassificationRate("tpr", positive=k)) == pytest.approx(recall_score(y == k, p == k))
        assert run(ClassificationRate("tnr", positive=k)) == pytest.approx(recall_score(y != k, p != k))
    with pytest.raises(ValueError, match="positive class"):
        ClassificationRate("tpr", positive=None)


def test_localisation_target_holds_region_and_lesion():
    regions = torch.tensor([[[1.0, 2.0, 4.0, 0.0]]])
    mask = torch.tensor([[[1.0, 0.0, 1.0, 0.0]]])
    target = acat.LocalisationTargetd()({"regions": regions, "mask": mask, "region": [1, 4]})["localisation_target"]
    torch.testing.assert_close(target, torch.tensor([[[3.0, 0.0, 3.0, 0.0]]]))
    output = {"target": target[None], "map_m": torch.ones(1, 1, 1, 4)}
    saliency, region = acat.localisation_output("m", "region")(output)
    assert region.tolist() == [[[[1.0, 0.0, 1.0, 0.0]]]]
    _, lesion = acat.localisation_output("m", "lesion")(output)
    assert lesion.tolist() == [[[[1.0, 0.0, 1.0, 0.0]]]]
    target = acat.LocalisationTargetd()({"regions": regions, "mask": mask * 0, "region": [2]})["localisation_target"]
    assert target.tolist() == [[[0.0, 1.0, 0.0, 0.0]]]


def test_saliency_datalist_needs_every_item(datalist, tmp_path):
    content = json.loads(datalist.read_text())
    writer = acat.SaliencyDatalistWriter(str(datalist), str(tmp_path), str(tmp_path / "out.json"))
    for split, items in content.items():
        for index, _ in enumerate(items):
            writer.written[(split, index)] = str(tmp_path / "saliency" / f"{split}{index}.nii.gz")
    writer._write(None)
    written = json.loads((tmp_path / "out.json").read_text())
    assert written["test"][0] == {**content["test"][0], "saliency": "saliency/test0.nii.gz"}
    del writer.written[("validation", 3)]
    with pytest.raises(RuntimeError, match=r"validation\[3\] got no saliency map"):
        writer._write(None)


def test_pipeline_runs_the_stages_in_order_and_stops_at_a_failure(tmp_path, capfd):
    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    for name, command in (("one", "$print('stage one', @word)"), ("two", "$exit(3)"), ("three", "$print('three')")):
        (bundle / "configs" / f"{name}.json").write_text(json.dumps({"word": "x", "run": [command]}))
    stages = [{"name": n, "configs": [f"{n}.json"]} for n in ("one", "two", "three")]
    (bundle / "configs" / "pipeline.json").write_text(json.dumps({"stages": stages}))
    assert pipeline_main([str(bundle), "--word", "hello"]) == 3  # the failing stage's exit status
    out, err = capfd.readouterr()
    assert "stage one hello" in out  # the override reached the stage
    assert "[pipeline] three" not in out and "stage 'two' failed" in err
    assert pipeline_main([str(bundle), "--stages", "one"]) == 0
    assert json.loads((bundle / "pipeline_times.json").read_text()).keys() == {"one", "total"}
    with pytest.raises(InputError, match="unknown stage"):
        pipeline_main([str(bundle), "--stages", "four"])


def test_stage_overrides_reach_the_config_as_typed(tmp_path, capfd):
    """A pipeline.json override of False, None or a list arrives as that value, not as the string
    'false' or 'null' (the runner reads Python literals) and not dropped (the runner drops None)."""
    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    config = {"flag": True, "seed": 0, "sizes": [1], "run": ["$print('got', repr(@flag), repr(@seed), repr(@sizes))"]}
    (bundle / "configs" / "one.json").write_text(json.dumps(config))
    stage = {"name": "one", "configs": ["one.json"], "overrides": {"flag": False, "seed": None, "sizes": [2, "a"]}}
    (bundle / "configs" / "pipeline.json").write_text(json.dumps({"stages": [stage]}))
    assert pipeline_main([str(bundle)]) == 0
    assert "got False None [2, 'a']" in capfd.readouterr().out
