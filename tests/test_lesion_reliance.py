"""benchmarks/lesion_reliance.py: a classifier's decision on each patient with and without its lesions."""

import sys

import pytest
import torch

from common.errors import InputError
from tests.bundle_runner import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from lesion_reliance import lesion_reliance, table  # noqa: E402

# each "image" is a constant whose value the network returns as its logit
VALUES = {"p1": 2.0, "p1_healthy": -1.0, "p2": 3.0, "p2_healthy": 0.5, "c1": -2.0, "c2": 1.0}


class MeanLogit(torch.nn.Module):
    def forward(self, x):
        return x.mean(dim=tuple(range(1, x.ndim)))


def constant_image(data: dict) -> dict:
    return {"image": torch.full((1, 4, 4), VALUES[data["image"]])}


def test_patients_are_classified_with_and_without_their_lesions():
    items = [
        {"image": "p1", "healthy": "p1_healthy", "label": 1},
        {"image": "p2", "healthy": "p2_healthy", "label": 1},
        {"image": "c1", "label": 0},
        {"image": "c2", "label": 0},
    ]
    result = lesion_reliance(MeanLogit(), constant_image, items)
    assert result["with_lesions"] == {"n": 2, "called_pathological": 1.0, "mean_logit": 2.5}
    # p1 turns healthy without its lesions, p2 does not
    assert result["without_lesions"] == {"n": 2, "called_pathological": 0.5, "mean_logit": -0.25}
    assert result["controls"] == {"n": 2, "called_pathological": 0.5, "mean_logit": -0.5}


def test_a_patient_without_a_counterpart_is_refused_by_name():
    items = [{"image": "p1", "label": 1}]
    with pytest.raises(InputError, match="p1: no 'healthy' counterpart in the datalist"):
        lesion_reliance(MeanLogit(), constant_image, items)


def test_a_split_without_controls_is_reported_as_such():
    result = lesion_reliance(MeanLogit(), constant_image, [{"image": "p1", "healthy": "p1_healthy", "label": 1}])
    assert result["controls"] == {"n": 0, "called_pathological": None, "mean_logit": None}
    assert table({"m": result})[-1] == "| m | 1.000 | 0.000 | 2.00 / -1.00 | n/a | 1 / 0 |"
