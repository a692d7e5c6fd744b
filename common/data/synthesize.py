"""Generate a synthetic data set into a folder in the data contract's format, once.

    python -m common.data.synthesize boxes --out data/boxes [--n 10000] [--seed 0] [--preview]
    python -m common.data.synthesize ellipses --out data/ellipses --param size_range=[10,100]

A ``manifest.json`` records the generator, its version, every parameter and the seed. Asking for
the same data set again reuses the folder; a different request regenerates it. Generation writes
into a temporary sibling folder that replaces the target only when complete, so an interrupted run
never leaves a half-written data set. Train configs call :func:`ensure_dataset` so that a missing
default data set is made on first use, while a folder holding the user's own datalist (no
manifest) is never touched.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.data.datalist import write_datalist
from common.data.synthetic import GENERATORS, get_generator
from common.data.synthetic._common import case_rng, save_nifti, stratified_splits
from common.errors import InputError

DATALIST_NAME = "datalist.json"
MANIFEST_NAME = "manifest.json"
PREVIEW_NAME = "preview.png"
FOLDERS = {"image": "images", "effect": "effects", "mask": "masks"}  # other keys: a folder of their name


def resolve_params(name: str, n: int | None = None, seed: int = 0, **params) -> dict:
    """The generator's defaults updated with the request; unknown parameters are an error."""
    generator = get_generator(name)
    unknown = sorted(set(params) - set(generator.defaults))
    if unknown:
        raise InputError(f"{name}: unknown parameter(s) {unknown}; expected some of {sorted(generator.defaults)}")
    resolved = json.loads(json.dumps({**generator.defaults, **params}))  # JSON-normalised (tuples -> lists)
    if n is not None:
        resolved["n"] = int(n)
    if resolved["n"] < 10:
        raise InputError(f"{name}: n={resolved['n']} is too small; expected at least 10 cases to make three splits")
    return {"generator": name, "version": generator.version, "seed": int(seed), "params": resolved}


def _write_case(args) -> list[dict]:
    """Generate case ``index`` and write its arrays; a case may hold several items (e.g. two ROIs)."""
    name, params, seed, index, planned_label, out_dir = args
    generator = GENERATORS[name]
    result = generator.make_case(case_rng(seed, index), params, planned_label)
    parts = result if isinstance(result, list) else [result]
    items = []
    for part, (arrays, fields) in enumerate(parts):
        fields = dict(fields)
        affine = fields.pop("affine", None)
        stem = f"{index:05d}" if len(parts) == 1 else f"{index:05d}_{part}"
        item = {}
        for key, array in arrays.items():
            rel = f"{FOLDERS.get(key, key)}/{stem}.nii.gz"
            save_nifti(array, Path(out_dir) / rel, affine=affine)
            item[key] = rel
        item.update(fields, case=index)
        items.append(item)
    return items


def generate(request: dict, out_dir: Path, workers: int = 1, progress: bool = True) -> dict:
    """Write every case and the datalist of ``request`` (from :func:`resolve_params`) into ``out_dir``.

    Splits are drawn over cases, so the items of one case (one subject) stay in one split.
    """
    name, seed, params = request["generator"], request["seed"], request["params"]
    generator = get_generator(name)
    n = params["n"]
    planned = generator.plan_labels(n, seed, params) if generator.plan_labels else [None] * n
    jobs = [(name, params, seed, i, None if planned[i] is None else int(planned[i]), str(out_dir)) for i in range(n)]
    bar = dict(total=n, desc=f"synthesize {name}", unit="case", disable=not progress, file=sys.stderr)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            cases = list(tqdm(pool.map(_write_case, jobs, chunksize=max(1, min(64, n // (4 * workers)))), **bar))
    else:
        cases = [_write_case(job) for job in tqdm(jobs, **bar)]
    labels = np.array([items[0]["label"] for items in cases])
    train, val, test = stratified_splits(labels, seed)
    splits = {
        split: [item for i in indices for item in cases[i]]
        for split, indices in (("training", train), ("validation", val), ("test", test))
    }
    write_datalist(out_dir / DATALIST_NAME, splits)
    return splits


def read_manifest(dataset_dir: Path) -> dict | None:
    try:
        with open(dataset_dir / MANIFEST_NAME) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _same_request(manifest: dict | None, request: dict) -> bool:
    return manifest is not None and all(manifest.get(k) == request[k] for k in ("generator", "version", "seed", "params"))


def synthesize(
    name: str,
    out: str | os.PathLike,
    n: int | None = None,
    seed: int = 0,
    preview: bool = False,
    workers: int = 1,
    progress: bool = True,
    **params,
) -> Path:
    """Make (or reuse) data set ``name`` in folder ``out``; returns the datalist path."""
    out = Path(out)
    request = resolve_params(name, n=n, seed=seed, **params)
    manifest = read_manifest(out)
    if not (_same_request(manifest, request) and (out / DATALIST_NAME).is_file()):
        if out.exists() and any(out.iterdir()) and manifest is None:
            raise InputError(
                f"{out}: folder exists with other content and no {MANIFEST_NAME}; "
                f"expected an empty or new folder for synthetic data set '{name}'"
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        try:
            splits = generate(request, staging, workers=workers, progress=progress)
            counts = {split: len(items) for split, items in splits.items()}
            stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
            with open(staging / MANIFEST_NAME, "w") as f:
                json.dump({**request, "counts": counts, "created": stamp}, f, indent=1)
            if out.exists():
                shutil.rmtree(out)
            os.replace(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    if preview and not (out / PREVIEW_NAME).is_file():
        from common.data.preview import write_preview

        write_preview(out / DATALIST_NAME, out / PREVIEW_NAME, scalar_keys=get_generator(name).scalar_keys)
    return out / DATALIST_NAME


def ensure_dataset(name: str, dataset_dir: str | os.PathLike, datalist: str | None = None, **kwargs) -> str:
    """The datalist a train config should use: the user's, or the synthetic default made on first use.

    - ``datalist`` given (the user's own data): returned as is after checking it exists.
    - ``dataset_dir`` holds a datalist but no manifest: the user's data, returned untouched.
    - otherwise the synthetic data set ``name`` is generated (or reused) in ``dataset_dir``.
    """
    if datalist:
        if not Path(datalist).is_file():
            raise InputError(f"{datalist}: datalist file not found; expected a JSON datalist (see README, 'Your data')")
        return str(datalist)
    dataset_dir = Path(dataset_dir)
    if (dataset_dir / DATALIST_NAME).is_file() and read_manifest(dataset_dir) is None:
        return str(dataset_dir / DATALIST_NAME)
    return str(synthesize(name, dataset_dir, **kwargs))


def _parse_param(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--param {text!r}: expected KEY=VALUE (VALUE as JSON, e.g. shape=[64,64])")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.data.synthesize", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=sorted(GENERATORS), help="data set to generate")
    parser.add_argument("--out", required=True, help="output folder (datalist.json, manifest.json, NIfTI files)")
    parser.add_argument("--n", type=int, default=None, help="number of cases (default: the recipe's)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--preview", action="store_true", help="also write preview.png (images, labels, ground truth)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="parallel processes")
    parser.add_argument("--param", type=_parse_param, action="append", default=[], help="KEY=VALUE recipe override")
    args = parser.parse_args(argv)
    try:
        datalist = synthesize(
            args.name, args.out, n=args.n, seed=args.seed, preview=args.preview, workers=args.workers, **dict(args.param)
        )
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    manifest = read_manifest(Path(args.out))
    print(f"{datalist}: {manifest['counts']}")
    if args.preview:
        print(Path(args.out) / PREVIEW_NAME)
    return 0


if __name__ == "__main__":
    sys.exit(main())
