"""Loading to the network grid and writing maps back in the input's own space."""

import nibabel as nib
import numpy as np
import pytest
import torch

from common.data.transforms import image_transforms
from common.errors import ImageFileError
from common.output import map_output_transforms, save_overlay_png

# LPS orientation (negative x and y axes), anisotropic spacing, an origin offset.
LPS_AFFINE = np.array([[-0.9, 0, 0, 10.0], [0, -1.3, 0, -20.0], [0, 0, 2.5, 5.0], [0, 0, 0, 1]])


def _smooth_volume(shape):
    grids = np.meshgrid(*[np.linspace(0, 1, s) for s in shape], indexing="ij")
    return sum((i + 1) * g for i, g in enumerate(grids)).astype(np.float32)


def _input_error(exc_info) -> ImageFileError:
    """The ImageFileError behind MONAI's 'applying transform' wrapper."""
    err = exc_info.value
    while err is not None and not isinstance(err, ImageFileError):
        err = err.__cause__
    assert err is not None, f"no ImageFileError in the chain of {exc_info.value!r}"
    return err


@pytest.mark.parametrize("resize", ["pad_crop", "resize"])
@pytest.mark.parametrize("shape,size", [((37, 41, 23), (32, 48, 32)), ((37, 41), (32, 32))])
def test_round_trip_keeps_shape_and_affine(tmp_path, resize, shape, size):
    truth = _smooth_volume(shape)
    source = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(truth, LPS_AFFINE), source)
    preprocessing = image_transforms(spatial_dims=len(shape), spatial_size=size, resize=resize)
    data = preprocessing({"image": str(source)})
    assert tuple(data["image"].shape) == (1, *size)
    data["map"] = data["image"].clone()
    out = map_output_transforms(preprocessing, ["map"], tmp_path / "out")(data)
    written = nib.load(out["map_file"])
    assert written.shape == shape
    np.testing.assert_allclose(written.affine, LPS_AFFINE, atol=1e-5)
    # The values land back where they came from (the map was the scaled image, i.e. affine in it).
    back = np.asarray(written.dataobj)
    inner = tuple(slice(4, -4) for _ in shape)
    if resize == "pad_crop":
        kept = back != 0  # cropped-away voxels come back as padding
        assert kept.mean() > 0.5
        assert np.corrcoef(back[kept], truth[kept])[0, 1] > 0.9999
    else:
        assert np.corrcoef(back[inner].ravel(), truth[inner].ravel())[0, 1] > 0.999
    assert (tmp_path / "out" / "scan_map.png").is_file()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["scan_map.nii.gz", "scan_map.png"]


def test_masks_and_maps_follow_the_image(tmp_path):
    shape = (20, 24, 18)
    mask = np.zeros(shape, np.float32)
    mask[5:9, 6:10, 4:8] = 1
    for name, array in (("img", _smooth_volume(shape)), ("mask", mask), ("effect", mask * 0.5)):
        nib.save(nib.Nifti1Image(array, LPS_AFFINE), tmp_path / f"{name}.nii.gz")
    chain = image_transforms(3, (32, 32, 32), map_keys=["effect"], mask_keys=["mask"], resize="resize")
    data = chain({k: str(tmp_path / f"{k if k != 'image' else 'img'}.nii.gz") for k in ("image", "mask", "effect")})
    assert set(torch.unique(data["mask"]).tolist()) == {0.0, 1.0}  # nearest neighbour keeps it binary
    assert data["effect"].max() <= 0.5 + 1e-6
    # Same orientation for all keys: the mask's centre of mass matches the effect's.
    com = [torch.nonzero(data[k][0] > 0.25).float().mean(0) for k in ("mask", "effect")]
    assert torch.allclose(com[0], com[1], atol=1.0)


@pytest.mark.parametrize(
    "array,kwargs,message",
    [
        (
            np.zeros((8, 8, 8, 2), np.float32),
            {"spatial_dims": 3},
            "has 2 channels (shape (2, 8, 8, 8) channel-first); expected 1",
        ),
        (np.zeros((8, 8), np.float32), {"spatial_dims": 3}, "2 spatial dimensions"),
        (np.full((8, 8, 8), np.nan, np.float32), {"spatial_dims": 3}, "NaN or Inf"),
        (np.zeros((8, 8, 8), np.float32), {"spatial_dims": 3, "min_size": 16}, "smaller than the network minimum"),
    ],
)
def test_bad_images_fail_naming_the_file(tmp_path, array, kwargs, message):
    path = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)
    chain = image_transforms(spatial_size=None, **kwargs)
    with pytest.raises(Exception) as info:
        chain({"image": str(path)})
    err = _input_error(info)
    assert str(path) in str(err) and message in str(err)


@pytest.mark.parametrize("keep", [0.05, 0.8, "text"])
def test_unreadable_image_names_the_file(tmp_path, keep):
    path = tmp_path / "truncated.nii.gz"
    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((16, 16, 16)).astype(np.float32), np.eye(4)), good)
    content = good.read_bytes()
    path.write_bytes(b"not a NIfTI" * 100 if keep == "text" else content[: int(len(content) * keep)])
    with pytest.raises(Exception) as info:
        image_transforms(3, None)({"image": str(path)})
    err = _input_error(info)
    assert str(path) in str(err) and "cannot read image" in str(err)


@pytest.mark.parametrize("shape", [(40, 30), (20, 24, 18)])
def test_overlay_png(tmp_path, shape):
    image = np.random.default_rng(0).random(shape)
    amap = np.zeros(shape)
    amap[(slice(5, 9),) * len(shape)] = 1.0
    path = save_overlay_png(image, amap[None], tmp_path / "o.png", title="t")
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob("*.partial*"))
    with pytest.raises(ValueError, match="differ"):
        save_overlay_png(image, amap[:5], tmp_path / "x.png")


def test_percentile_intensity_maps_the_images_own_percentiles_to_minus_one_and_one():
    from common.data.transforms import intensity_transform

    image = torch.arange(1000.0).reshape(1, 10, 10, 10)
    scaled = intensity_transform("image", "percentile", a_min=10, a_max=90)({"image": image})["image"]
    low, high = np.percentile(image.numpy(), [10, 90])
    assert float(scaled.min()) == -1.0 and float(scaled.max()) == 1.0  # clipped outside the percentiles
    # linear in between: the median lands half-way
    median = float(np.median(image.numpy()))
    expected = -1.0 + 2.0 * (median - low) / (high - low)
    assert abs(float(scaled.flatten()[int(np.argmin(np.abs(image.flatten().numpy() - median)))]) - expected) < 0.01
    with pytest.raises(ValueError, match="percentiles"):
        intensity_transform("image", "percentile")


def test_std_intensity_divides_by_the_standard_deviation_and_keeps_a_zero_background():
    from common.data.transforms import intensity_transform

    image = torch.zeros(1, 8, 8)
    image[:, 2:6, 2:6] = torch.linspace(1.0, 3.0, 16).reshape(4, 4)
    scaled = intensity_transform("image", "std")({"image": image})["image"]
    assert torch.equal(scaled[image == 0], torch.zeros(int((image == 0).sum())))  # background stays 0
    assert torch.allclose(scaled, image / image.std(unbiased=False), atol=1e-6)  # no mean shift, unit sd
    assert float(scaled.std(unbiased=False)) == pytest.approx(1.0, abs=1e-5)
