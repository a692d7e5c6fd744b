"""Model-zoo conformance of every bundle (issue 9): metadata against MONAI's schema, the inference network against
its data format and as TorchScript, and a packaged zip that runs outside the repository.

Weights are the networks' random initialisation at the configs' own sizes (at most 2.9 M parameters: the defaults
are CPU-sized), saved in the layout each inference config loads; inference runs with a few ids that only
shorten it (samples, optimisation and diffusion steps)."""

import hashlib
import json
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from monai.bundle import download, download_large_files, load, verify_metadata, verify_net_in_out
from monai.networks import convert_to_torchscript

from common import bundle_tools
from common.errors import InputError
from tests.bundle_runner import LPS, REPO, cli_value
from tests.untrained import CASES, bundle_parser, write_untrained_bundle

SCHEMA = REPO.parent / "shared" / "model-zoo" / "meta_schema_20240725.json"
BUNDLES = ("vagan", "icam", "acat", "tvd_score", "attr_constraint")


def _metadata(bundle: str) -> dict:
    return json.loads((REPO / "bundles" / bundle / "configs" / "metadata.json").read_text())


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    """bundle -> (trained root, zip, report), packaged once per module."""
    made = {}

    def make(bundle: str):
        if bundle not in made:
            tmp = tmp_path_factory.mktemp(bundle)
            write_untrained_bundle(bundle, tmp / "trained")
            report = bundle_tools.package(
                REPO / "bundles" / bundle,
                tmp / f"{bundle}.zip",
                CASES[bundle].configs,
                bundle_root=tmp / "trained",
                url_base=f"https://example.org/{bundle}",
            )
            made[bundle] = (tmp / "trained", tmp / f"{bundle}.zip", report)
        return made[bundle]

    return make


@pytest.mark.parametrize("bundle", BUNDLES)
def test_metadata_follows_the_model_zoo_schema_and_the_pinned_versions(bundle):
    meta_file = REPO / "bundles" / bundle / "configs" / "metadata.json"
    verify_metadata(meta_file=str(meta_file), filepath=str(SCHEMA))  # raises on a schema violation
    metadata = _metadata(bundle)
    assert metadata["version"] in metadata["changelog"]
    pins = dict(line.split("==") for line in (REPO / "requirements.txt").read_text().splitlines() if "==" in line)
    pins = {name.lower(): version for name, version in pins.items()}
    assert (metadata["monai_version"], metadata["pytorch_version"], metadata["numpy_version"]) == (
        pins["monai"],
        pins["torch"],
        pins["numpy"],
    )
    for package, version in metadata["required_packages_version"].items():
        assert pins[package] == version, package
    # a data format for every network the package ships: network_data_format for model.pt, <name>_data_format for
    # another checkpoint and for each network of a checkpoint that holds several
    for file, ids in CASES[bundle].checkpoints.items():
        names = list(ids) if isinstance(ids, dict) else ["network" if file == "model.pt" else Path(file).stem]
        for name in names:
            assert f"{name}_data_format" in metadata, (file, name)


# (bundle, data format, config id of its network, extra forward arguments, MONAI's size factor n)
NETWORK_FORMATS = [
    ("vagan", "network", "network_def", {}, 1),
    ("icam", "network", "network_def", {}, 1),
    ("icam", "content_encoder", "content_encoder_def", {}, 1),
    ("acat", "network", "network_def", {"saliency": torch.rand(1, 1, 64, 64, 11)}, 1),
    ("acat", "classifier", "baseline", {}, 1),
    ("acat", "autoencoder", "autoencoder", {}, 1),
    ("tvd_score", "network", "network_def", {"timesteps": torch.tensor([500])}, 2),
    ("tvd_score", "classifier", "classifier_def", {}, 1),
    ("tvd_score", "regressor", "regressor_def", {}, 1),
    ("attr_constraint", "network", "network_def", {}, 1),
]


@pytest.mark.parametrize(("bundle", "data_format", "net_id", "extra", "n"), NETWORK_FORMATS)
def test_networks_match_their_data_format(bundle, data_format, net_id, extra, n):
    configs = [str(REPO / "bundles" / bundle / "configs" / name) for name in CASES[bundle].configs]
    # verify_net_in_out reads network_data_format: point it at another network's block to check that one
    override = (
        {}
        if data_format == "network"
        else {"_meta_#network_data_format": _metadata(bundle)[f"{data_format}_data_format"]}
    )
    verify_net_in_out(
        net_id=net_id,
        meta_file=str(REPO / "bundles" / bundle / "configs" / "metadata.json"),
        config_file=configs,
        device="cpu",
        n=n,
        extra_forward_args=extra,
        **override,
    )


@pytest.mark.parametrize("bundle", BUNDLES)
def test_packaged_bundle_runs_outside_the_repository(bundle, packaged, tmp_path):
    trained, archive, report = packaged(bundle)
    case = CASES[bundle]
    names = set(zipfile.ZipFile(archive).namelist())
    for required in ("configs/metadata.json", "docs/README.md", "LICENSE", "common/__init__.py", "large_files.yml"):
        assert f"{bundle}/{required}" in names, required
    for checkpoint in case.checkpoints:
        assert f"{bundle}/models/{checkpoint}" in names

    shared = tmp_path / "shared"
    bundle_tools.safe_extract(archive, shared)
    extracted = shared / bundle
    # large_files.yml: every weight file with its sha256 and its URL under --url-base; MONAI's own reader
    # verifies the hashes of the files present (and would download the missing ones).
    listing = yaml.safe_load((extracted / "large_files.yml").read_text())["large_files"]
    models = (extracted / "models").iterdir()
    weights = sorted(f"models/{p.name}" for p in models if p.suffix in bundle_tools.WEIGHT_SUFFIXES)
    assert sorted(entry["path"] for entry in listing) == weights
    for entry in listing:
        assert entry["hash_val"] == hashlib.sha256((extracted / entry["path"]).read_bytes()).hexdigest()
        assert entry["url"] == f"https://example.org/{bundle}/{entry['path']}" and entry["hash_type"] == "sha256"
    download_large_files(bundle_path=str(extracted))
    packaged_config = json.loads((extracted / "configs" / case.configs[-1]).read_text())
    assert packaged_config["bundle_root"] == bundle_tools.PACKAGED_BUNDLE_ROOT

    if "model.pt" in case.checkpoints:  # MONAI's convention: network_def's weights, exported as model.ts
        assert report.export.method == ("trace" if bundle == "acat" else "script")  # as the bundles' docs say
        torchscript = torch.jit.load(str(extracted / "models" / "model.ts"))
        eager = bundle_tools.load_network_def(bundle_parser(bundle, trained), trained / "models" / "model.pt")
        inputs = bundle_tools.example_inputs(_metadata(bundle)["network_data_format"], seed=1)
        assert bundle_tools.max_output_difference(torchscript, eager, inputs) <= 1e-5
    else:
        assert not (extracted / "models" / "model.ts").exists()

    scan = tmp_path / "scan.nii.gz"
    image = np.random.default_rng(0).normal(30, 10, case.scan_shape).astype(np.float32)
    nib.save(nib.Nifti1Image(image, LPS), scan)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    config_files = [str(extracted / "configs" / name) for name in case.configs]
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", cli_value(config_files)]
    for key, value in [("input_image", str(scan)), ("output_dir", "out"), *case.run_overrides]:
        command += [f"--{key}", cli_value(value)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(command, cwd=elsewhere, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    written = nib.load(elsewhere / "out" / case.output)
    assert written.shape == image.shape
    np.testing.assert_allclose(written.affine, LPS, atol=1e-5)


def test_package_command_line_names_the_zip_by_version(tmp_path):
    write_untrained_bundle("attr_constraint", tmp_path / "trained")
    version = _metadata("attr_constraint")["version"]
    command = [sys.executable, "-m", "common.bundle_tools", "package", str(REPO / "bundles" / "attr_constraint")]
    command += ["--bundle_root", str(tmp_path / "trained")]
    proc = subprocess.run(
        command, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    archive = tmp_path / f"attr_constraint_v{version}.zip"
    names = zipfile.ZipFile(archive).namelist()
    assert "attr_constraint/models/model.ts" in names and "attr_constraint/models/thresholds.json" in names
    listing = yaml.safe_load(zipfile.ZipFile(archive).read("attr_constraint/large_files.yml"))["large_files"]
    assert {entry["url"] for entry in listing} == {""}  # no --url-base: filled in when the weights are hosted


def test_package_without_the_weights_names_the_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"model\.pt: 'checkpoint' not found"):
        bundle_tools.package(REPO / "bundles" / "vagan", tmp_path / "vagan.zip", bundle_root=tmp_path / "empty")
    assert not list(tmp_path.glob("*.zip*"))


def test_monai_downloads_and_loads_a_packaged_zip(packaged, tmp_path):
    """The documented way to use a shared bundle: MONAI's download (here from a local zip) and load."""
    trained, archive, _ = packaged("vagan")
    download(name="vagan", url=archive.resolve().as_uri(), bundle_dir=str(tmp_path), progress=False)
    scripted, meta, _ = load(name="vagan", bundle_dir=str(tmp_path), load_ts_module=True, device="cpu")
    assert meta["version"] == _metadata("vagan")["version"]
    eager = load(name="vagan", bundle_dir=str(tmp_path), workflow_type="inference", device="cpu").eval()
    reference = bundle_tools.load_network_def(bundle_parser("vagan", trained), trained / "models" / "model.pt")
    x = torch.rand(1, 1, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(eager(x), reference(x), atol=1e-6, rtol=0)
        torch.testing.assert_close(scripted(x), reference(x), atol=1e-5, rtol=0)


def test_ckpt_export_command_line_writes_torchscript_equal_to_the_eager_network(packaged, tmp_path):
    """The command in the VA-GAN docs: MONAI's ckpt_export straight on models/model.pt."""
    trained, _, _ = packaged("vagan")
    configs = REPO / "bundles" / "vagan" / "configs"
    command = [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def"]
    command += ["--filepath", str(tmp_path / "model.ts"), "--ckpt_file", str(trained / "models" / "model.pt")]
    command += ["--meta_file", str(configs / "metadata.json"), "--config_file", str(configs / "inference.json")]
    command += ["--bundle_root", str(trained)]
    proc = subprocess.run(
        command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    eager = bundle_tools.load_network_def(bundle_parser("vagan", trained), trained / "models" / "model.pt")
    inputs = bundle_tools.example_inputs(_metadata("vagan")["network_data_format"], seed=2)
    assert bundle_tools.max_output_difference(torch.jit.load(str(tmp_path / "model.ts")), eager, inputs) <= 1e-5


def _diffusion_inputs():
    channels = bundle_parser("tvd_score").get_parsed_content("latent_channels")
    return [torch.rand(1, channels, 8, 8, 8), torch.tensor([500])]


# (bundle, config id, example inputs, whether it scripts): the networks model.ts does not cover. Those that do
# not script are traced; the bundles' docs say which and why.
OTHER_NETWORKS = [
    ("acat", "baseline", lambda: [torch.rand(1, 1, 64, 64, 11)], True),
    ("acat", "autoencoder", lambda: [torch.rand(1, 1, 64, 64, 11)], False),
    ("tvd_score", "diffusion_def", _diffusion_inputs, False),
    ("tvd_score", "classifier_def", lambda: [torch.rand(1, 1, 16, 16, 16)], False),
    ("icam", "generator_def", lambda: [torch.rand(1, 64, 32, 40), torch.rand(1, 1, 8, 10)], True),
]


@pytest.mark.parametrize(("bundle", "net_id", "make_inputs", "scripts"), OTHER_NETWORKS)
def test_torchscript_of_the_other_networks_equals_eager(bundle, net_id, make_inputs, scripts):
    torch.manual_seed(0)
    network = bundle_parser(bundle).get_parsed_content(net_id).eval()
    inputs = make_inputs()
    assert (bundle_tools.scripting_error(network) is None) == scripts
    converted = convert_to_torchscript(network, use_trace=not scripts, inputs=inputs)
    assert bundle_tools.max_output_difference(converted, network, inputs) <= 1e-5


def _zip_with(path: Path, members) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for info, data in members:
            zf.writestr(info, data)
    return path


def _symlink(name: str, target: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        ("bundle/../../evil.txt", "climbs out"),
        ("/tmp/evil.txt", "absolute path"),
        ("C:/evil.txt", "absolute path"),
        (_symlink("bundle/link", "/etc/passwd"), "symbolic link"),
    ],
)
def test_extraction_refuses_members_outside_the_target_and_writes_nothing(tmp_path, member, reason):
    archive = _zip_with(tmp_path / "bad.zip", [("bundle/configs/metadata.json", "{}"), (member, "payload")])
    target = tmp_path / "out" / "target"
    name = member.filename if isinstance(member, zipfile.ZipInfo) else member
    with pytest.raises(bundle_tools.UnsafeArchiveError, match="refused, nothing extracted") as error:
        bundle_tools.safe_extract(archive, target)
    assert repr(name) in str(error.value) and reason in str(error.value)
    assert not (tmp_path / "out").exists()  # not even the safe member before it
    assert not (tmp_path / "evil.txt").exists()


def test_extraction_refuses_to_overwrite_and_cli_reports_it(tmp_path):
    archive = _zip_with(tmp_path / "bundle.zip", [("bundle/LICENSE", "new")])
    (tmp_path / "out" / "bundle").mkdir(parents=True)
    (tmp_path / "out" / "bundle" / "LICENSE").write_text("old")
    assert bundle_tools.main(["extract", str(archive), str(tmp_path / "out")]) == 1
    assert (tmp_path / "out" / "bundle" / "LICENSE").read_text() == "old"
    assert bundle_tools.main(["extract", str(archive), str(tmp_path / "fresh")]) == 0
    assert (tmp_path / "fresh" / "bundle" / "LICENSE").read_text() == "new"
