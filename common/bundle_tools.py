"""Share a trained bundle as a model-zoo style zip that runs without this repository.

    python -m common.bundle_tools package bundles/NAME [--out NAME_vVERSION.zip] [--bundle_root DIR]
        [--configs inference.json ...] [--url-base URL]
    python -m common.bundle_tools export bundles/NAME [--bundle_root DIR] [--configs ...] [--out FILE.ts]
    python -m common.bundle_tools extract NAME_vVERSION.zip DIR

``package`` writes ``NAME/`` with the bundle's ``configs/``, ``docs/`` and ``LICENSE``, the files its
inference configs read under ``bundle_root`` (``models/*.pt`` and their JSON companions, a TVD report
under ``eval/``), ``models/model.ts`` (``export``), ``large_files.yml`` (path, url, sha256 of every
weight file, for hosting the weights apart from the zip) and the ``common`` package the configs import.
In the packaged configs ``bundle_root`` is the folder that holds that ``common/``, so the extracted
bundle runs from any working directory: ``python -m monai.bundle run --config_file NAME/configs/inference.json``.

``export`` writes ``network_def`` with the weights of ``models/model.pt`` as TorchScript: with MONAI's
``ckpt_export`` when the network scripts, otherwise traced on example inputs built from the metadata's
``network_data_format`` (``ckpt_export`` traces with one random image and cannot feed a second input).
Either way the saved module's output is compared with the eager network's, within 1e-5.

``extract`` unpacks a bundle zip after checking every member: none may be absolute, climb out with ``..``,
be a symbolic link or overwrite an existing file; otherwise nothing is written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import stat
import sys
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch
import yaml
from torch import nn

from common.errors import InputError

# Written into every packaged config that defines bundle_root, so the extracted folder is found wherever it is.
PACKAGED_BUNDLE_ROOT = "$common.bundle_tools.packaged_bundle_root()"
BUNDLE_TOOLS_IMPORT = "$import common.bundle_tools"
MODEL_FILE = Path("models") / "model.pt"
TORCHSCRIPT_FILE = Path("models") / "model.ts"
WEIGHT_SUFFIXES = (".pt", ".ts")
TORCHSCRIPT_TOLERANCE = 1e-5
# A fixed time stamp on every member: packaging the same files twice gives the same zip.
ZIP_DATE = (1980, 1, 1, 0, 0, 0)


class UnsafeArchiveError(InputError):
    """A bundle archive member would be written outside the target folder (or over an existing file)."""


def packaged_bundle_root() -> str:
    """The extracted bundle this ``common`` package ships in: the folder that holds ``common/`` and ``configs/``."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "configs" / "metadata.json").is_file():
        raise InputError(
            f"{root}: `common` was imported from here, which is not a packaged bundle (no configs/metadata.json "
            "next to common/); run the bundle from another directory or pass --bundle_root"
        )
    return str(root)


def _read_metadata(bundle: Path) -> dict:
    path = bundle / "configs" / "metadata.json"
    if not path.is_file():
        raise InputError(f"{path}: not found; expected a bundle folder with configs/metadata.json")
    return json.loads(path.read_text())


def inference_parser(bundle: Path, configs: Sequence[str], bundle_root: Path):
    """The merged inference configs of ``bundle`` with their metadata, ``bundle_root`` set to ``bundle_root``."""
    from monai.bundle import ConfigParser

    files = [bundle / "configs" / name for name in configs]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise InputError(f"{missing}: config not found; --configs names files in {bundle / 'configs'}")
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    parser["bundle_root"] = str(bundle_root)
    if "network_def" not in parser or _undefined_references(parser):
        raise InputError(
            f"{[str(f) for f in files]}: these configs do not define network_def and every id they refer to; "
            "pass the configs inference merges, e.g. --configs train.json inference.json"
        )
    return parser


def _referenced_ids(config) -> set[str]:
    """The ids that ``@id`` references in ``config`` name, anywhere in it."""
    from monai.bundle.reference_resolver import ReferenceResolver

    if isinstance(config, str):
        return set(ReferenceResolver.match_refs_pattern(config))
    values = config.values() if isinstance(config, dict) else config if isinstance(config, list) else ()
    return set().union(*(_referenced_ids(value) for value in values))


def _undefined_references(parser) -> list[str]:
    return sorted(ref for ref in _referenced_ids(parser.get()) if ref not in parser)


def inference_files(parser, bundle_root: Path) -> tuple[list[Path], list[Path]]:
    """(files to ship, optional files not found): every file under ``bundle_root`` (a path with an extension: the
    folders ``models``, ``logs`` have none) that a top-level id of the inference configs names through
    ``@ckpt_dir`` or ``@bundle_root`` and that another item uses (TVD's ellipses preset keeps the autoencoder's
    checkpoint id but no longer refers to it). A missing file under ``models/`` is an error (inference would stop
    on it); others (a TVD report in ``eval/``) are shipped when present."""
    root = bundle_root.resolve()
    used = _referenced_ids(parser.get())
    found, optional_missing = [], []
    for key, value in parser.get().items():
        if key not in used or not (isinstance(value, str) and value.startswith("$")):
            continue
        if "@ckpt_dir" not in value and "@bundle_root" not in value:
            continue
        resolved = parser.get_parsed_content(key)
        if not isinstance(resolved, (str, os.PathLike)):
            continue
        path = Path(resolved).resolve()
        if root not in path.parents or not path.suffix or path.is_dir():
            continue
        relative = path.relative_to(root)
        if path.is_file():
            found.append(relative)
        elif relative.parts[0] == "models":
            raise InputError(f"{path}: '{key}' not found; the inference configs read it, train the bundle first")
        else:
            optional_missing.append(relative)
    return sorted(set(found)), sorted(set(optional_missing))


def network_state_dict(network: nn.Module, checkpoint: Mapping) -> Mapping:
    """``network``'s state dict from a checkpoint: the checkpoint itself (ignite saves a single network as its bare
    state dict), or, for a checkpoint of several networks by name whose entries are ``network``'s sub-networks
    (ICAM's model.pt: the image classifier is its attribute_encoder and classifier), those entries under their
    sub-network's prefix."""
    parts = {name for name, module in network.named_children() if module.state_dict()}
    if parts and parts <= set(checkpoint) and all(isinstance(checkpoint[p], Mapping) for p in parts):
        return {f"{part}.{key}": value for part in sorted(parts) for key, value in checkpoint[part].items()}
    return checkpoint


def load_network_def(parser, checkpoint_file: Path) -> nn.Module:
    """``network_def`` of the parsed configs with the weights of ``checkpoint_file``, in eval mode on the CPU."""
    network = parser.get_parsed_content("network_def", lazy=False)
    checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=True)
    network.load_state_dict(network_state_dict(network, checkpoint))
    # Some network_defs are built on @device (CUDA where present); the export and its check run on the CPU.
    return network.to("cpu").eval()


def example_inputs(data_format: Mapping, seed: int = 0) -> list[torch.Tensor]:
    """One random tensor per input of a ``*_data_format`` block, in its order (the forward arguments), of shape
    (1, channels, *spatial) with symbolic sizes resolved as MONAI's ``verify_net_in_out`` does ('16*n': n = 1)."""
    from monai.bundle.scripts import _get_fake_spatial_shape
    from monai.utils import get_equivalent_dtype

    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for name, spec in data_format["inputs"].items():
        if not spec.get("spatial_shape"):
            raise InputError(f"input '{name}' has no spatial shape; only image-like inputs can be made up")
        shape = (1, spec["num_channels"], *_get_fake_spatial_shape(spec["spatial_shape"]))
        tensors.append(torch.rand(shape, generator=generator, dtype=get_equivalent_dtype(spec["dtype"], torch.Tensor)))
    return tensors


def max_output_difference(first: nn.Module, second: nn.Module, inputs: Sequence[torch.Tensor]) -> float:
    """The largest absolute difference between the outputs (tensor or tuple of tensors) of two networks."""
    from monai.utils import ensure_tuple

    with torch.no_grad():
        pairs = zip(ensure_tuple(first(*inputs)), ensure_tuple(second(*inputs)))
        return max(float((a - b).abs().max()) for a, b in pairs)


def scripting_error(network: nn.Module) -> str | None:
    """None if ``network`` compiles with ``torch.jit.script``, else the compiler's complaint and where it arose."""
    try:
        torch.jit.script(network)
    except Exception as error:  # TorchScript raises RuntimeError, NotSupportedError, ... depending on the construct
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        where = next((line for line in lines if line.startswith("File ")), None)
        return f"{lines[0]} ({where})" if where else lines[0]
    return None


@dataclass
class ExportReport:
    path: Path
    method: str  # "script" (MONAI's ckpt_export) or "trace"
    scripting_error: str | None
    max_difference: float


def export_torchscript(
    bundle: Path, configs: Sequence[str], bundle_root: Path, out: Path | None = None
) -> ExportReport:
    """``network_def`` with the weights of ``<bundle_root>/models/model.pt`` as TorchScript (default
    ``<bundle_root>/models/model.ts``), its output checked against the eager network's."""
    from monai.bundle import ckpt_export
    from monai.data import save_net_with_metadata
    from monai.networks import convert_to_torchscript

    checkpoint_file = bundle_root / MODEL_FILE
    if not checkpoint_file.is_file():
        raise InputError(f"{checkpoint_file}: not found; the TorchScript export reads network_def's weights from it")
    out = bundle_root / TORCHSCRIPT_FILE if out is None else out
    out.parent.mkdir(parents=True, exist_ok=True)
    config_files = [str(bundle / "configs" / name) for name in configs]
    metadata = _read_metadata(bundle)
    inputs = example_inputs(metadata["network_data_format"])
    network = load_network_def(inference_parser(bundle, configs, bundle_root), checkpoint_file)
    error = scripting_error(network)
    if error is None:
        with tempfile.TemporaryDirectory() as tmp:
            # ckpt_export loads one network from one checkpoint: give it network_def's own state dict.
            flat = Path(tmp) / "network_def.pt"
            torch.save(dict(network.state_dict()), flat)
            ckpt_export(
                net_id="network_def",
                filepath=str(out),
                ckpt_file=str(flat),
                meta_file=str(bundle / "configs" / "metadata.json"),
                config_file=config_files,
                bundle_root=str(bundle_root),
                device="$torch.device('cpu')",  # model.ts holds CPU weights, loadable without a GPU
            )
    else:
        traced = convert_to_torchscript(network, use_trace=True, inputs=inputs)
        # What ckpt_export stores beside the module: the metadata and each config as JSON.
        extra = {Path(f).stem + ".json": json.dumps(json.loads(Path(f).read_text())).encode() for f in config_files}
        save_net_with_metadata(
            traced, str(out), include_config_vals=False, meta_values=metadata, more_extra_files=extra
        )
    difference = max_output_difference(torch.jit.load(str(out), map_location="cpu"), network, inputs)
    if not difference <= TORCHSCRIPT_TOLERANCE:
        out.unlink()
        raise RuntimeError(f"{out}: TorchScript output differs from the eager network's by {difference:.3g}")
    return ExportReport(out, "script" if error is None else "trace", error, difference)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def large_files(root: Path, files: Sequence[Path], url_base: str) -> dict:
    """model-zoo ``large_files.yml`` content for the weight files among ``files`` (relative to ``root``)."""
    base = url_base.rstrip("/")
    entries = []
    for relative in files:
        if relative.suffix in WEIGHT_SUFFIXES:
            path = relative.as_posix()
            entries.append(
                {
                    "path": path,
                    "url": f"{base}/{path}" if base else "",
                    "hash_val": sha256(root / relative),
                    "hash_type": "sha256",
                }
            )
    return {"large_files": entries}


def _packaged_config(config: dict) -> dict:
    """A config as it is packaged: ``bundle_root`` is the extracted folder, found through its own ``common``."""
    if "bundle_root" not in config:
        return config
    config = {**config, "bundle_root": PACKAGED_BUNDLE_ROOT}
    if "imports" in config and BUNDLE_TOOLS_IMPORT not in config["imports"]:
        config["imports"] = [*config["imports"], BUNDLE_TOOLS_IMPORT]
    return config


def _copy_configs(source: Path, target: Path) -> None:
    target.mkdir(parents=True)
    for path in sorted(source.iterdir()):
        if path.suffix == ".json":
            packaged = _packaged_config(json.loads(path.read_text()))
            (target / path.name).write_text(json.dumps(packaged, indent=4, ensure_ascii=False) + "\n")
        elif path.is_file():
            shutil.copy2(path, target / path.name)


def _write_zip(tree: Path, archive: Path) -> None:
    """Zip ``tree`` with its folder name as the top level, atomically (a failed run leaves no zip behind)."""
    partial = archive.with_name(archive.name + ".partial")
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(p for p in tree.rglob("*") if p.is_file()):
            info = zipfile.ZipInfo(path.relative_to(tree.parent).as_posix(), date_time=ZIP_DATE)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            with path.open("rb") as source, zf.open(info, "w") as target:
                shutil.copyfileobj(source, target)
    os.replace(partial, archive)


@dataclass
class PackageReport:
    archive: Path
    files: list[Path]  # relative to the bundle folder in the zip
    export: ExportReport | None
    notes: list[str]


def package(
    bundle: Path,
    out: Path | None = None,
    configs: Sequence[str] = ("inference.json",),
    bundle_root: Path | None = None,
    url_base: str = "",
) -> PackageReport:
    """Write ``bundle`` (configs from ``bundle``, trained files from ``bundle_root``, default ``bundle``) as a zip."""
    bundle = Path(bundle)
    bundle_root = bundle if bundle_root is None else Path(bundle_root)
    metadata = _read_metadata(bundle)
    name = bundle.resolve().name
    out = Path(out) if out is not None else Path(f"{name}_v{metadata['version']}.zip")
    shipped, optional_missing = inference_files(inference_parser(bundle, configs, bundle_root), bundle_root)
    notes = [f"{path}: not found, not shipped (inference reads it only in some modes)" for path in optional_missing]
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / name
        _copy_configs(bundle / "configs", staged / "configs")
        shutil.copytree(bundle / "docs", staged / "docs")
        shutil.copy2(bundle / "LICENSE", staged / "LICENSE")
        shutil.copytree(
            Path(__file__).resolve().parent, staged / "common", ignore=shutil.ignore_patterns("__pycache__")
        )
        for relative in shipped:
            (staged / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(bundle_root / relative, staged / relative)
        export = None
        if MODEL_FILE in shipped:
            export = export_torchscript(staged, configs, staged)
            shipped.append(TORCHSCRIPT_FILE)
            if export.scripting_error:
                notes.append(f"{TORCHSCRIPT_FILE}: traced, network_def does not script: {export.scripting_error}")
        else:
            notes.append(f"{MODEL_FILE}: not among the inference files, so no {TORCHSCRIPT_FILE} (see the docs)")
        listing = large_files(staged, shipped, url_base)
        (staged / "large_files.yml").write_text(yaml.safe_dump(listing, sort_keys=False))
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_zip(staged, out)
    return PackageReport(out, sorted(shipped), export, notes)


def _unsafe_reason(member: zipfile.ZipInfo, target: Path) -> str | None:
    name = member.filename
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        return "absolute path"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "path climbs out with '..'"
    if stat.S_ISLNK(member.external_attr >> 16):
        return "symbolic link"
    destination = (target / name).resolve()
    if destination != target and target not in destination.parents:
        return f"resolves outside the target ({destination})"
    if not member.is_dir() and destination.exists():
        return f"would overwrite {destination}"
    return None


def safe_extract(archive: Path, target: Path) -> list[Path]:
    """Extract ``archive`` into ``target`` after checking every member; any unsafe member stops it before anything
    is written. Python's zipfile has no extraction filter (tarfile's ``filter="data"`` has no zip counterpart) and
    its ``extractall`` silently rewrites such names instead of refusing them, hence the explicit check."""
    target = Path(target).resolve()
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        unsafe = [(m.filename, reason) for m in members if (reason := _unsafe_reason(m, target))]
        if unsafe:
            listed = "; ".join(f"{name!r}: {reason}" for name, reason in unsafe)
            raise UnsafeArchiveError(f"{archive}: refused, nothing extracted: {listed}")
        target.mkdir(parents=True, exist_ok=True)
        zf.extractall(target)
    return sorted(target / m.filename for m in members if not m.is_dir())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    configs_help = "the inference configs, merged in order (default: %(default)s; TVD: train.json inference.json)"
    root_help = "where the trained models/ (and eval/) are (default: the bundle folder)"

    pack = commands.add_parser("package", help="write a model-zoo style zip of a trained bundle")
    pack.add_argument("bundle", type=Path, help="the bundle folder, e.g. bundles/vagan")
    pack.add_argument("--out", type=Path, default=None, help="the zip to write (default: NAME_vVERSION.zip)")
    pack.add_argument("--configs", nargs="+", default=["inference.json"], help=configs_help)
    pack.add_argument("--bundle_root", type=Path, default=None, help=root_help)
    pack.add_argument("--url-base", default="", help="URL the weight files will be hosted under (large_files.yml)")

    export = commands.add_parser("export", help="write network_def with models/model.pt as TorchScript")
    export.add_argument("bundle", type=Path, help="the bundle folder, e.g. bundles/vagan")
    export.add_argument("--configs", nargs="+", default=["inference.json"], help=configs_help)
    export.add_argument("--bundle_root", type=Path, default=None, help=root_help)
    export.add_argument("--out", type=Path, default=None, help="default: <bundle_root>/models/model.ts")

    extract = commands.add_parser("extract", help="unpack a bundle zip, refusing members that escape the target")
    extract.add_argument("archive", type=Path)
    extract.add_argument("target", type=Path)

    args = parser.parse_args(argv)
    try:
        if args.command == "package":
            report = package(args.bundle, args.out, args.configs, args.bundle_root, args.url_base)
            print(f"wrote {report.archive}: " + ", ".join(str(p) for p in report.files))
            for note in report.notes:
                print(f"note: {note}")
        elif args.command == "export":
            root = args.bundle if args.bundle_root is None else args.bundle_root
            exported = export_torchscript(args.bundle, args.configs, root, args.out)
            print(f"wrote {exported.path} ({exported.method}; max difference {exported.max_difference:.2g})")
            if exported.scripting_error:
                print(f"note: network_def does not script: {exported.scripting_error}")
        else:
            for path in safe_extract(args.archive, args.target):
                print(path)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
