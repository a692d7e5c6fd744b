"""Does an attribution_constraint classifier decide by the lesions? Its decision on each test patient and on the
same patient without the lesions (the phantom's ``healthy`` counterpart: the same anatomy, scanner state and site,
so only the lesions differ), beside its decision on the controls.

    python benchmarks/lesion_reliance.py --bundle_root R --preset ms.json --dataset_dir D \
        --out benchmarks/results/lesion_reliance_ms.md

``R`` is the ``bundle_root`` of a ``python -m common.pipeline bundles/attr_constraint`` run: the constrained model
in ``models/model.pt`` and the unconstrained comparator in ``models/unconstrained/model.pt`` (``--models
name=path ...`` for others). ``D`` is the folder of the data set the run trained on (default: the configs'
``dataset_dir``); its ``datalist.json`` is read as it is, never generated again. The images are pre-processed as
the configs do, with any id the run overrode given again by ``--set id=JSON`` (e.g. ``--set
'spatial_size=[64, 80]'``). A classifier
that still calls a patient pathological once the lesions are gone decides by something else (with
``acquisition_sites``, the patients' scanner), and no attribution map of it can show the lesions as the reason.
Only the project's phantoms have the counterparts; a datalist without ``healthy`` entries is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fidelity import command_line, machine  # noqa: E402  (this script's folder is on the path when it runs)

from common.errors import InputError  # noqa: E402
from common.files import write_text_atomic  # noqa: E402

CONFIGS = REPO / "bundles" / "attr_constraint" / "configs"


def lesion_reliance(network, transforms, items: list[dict]) -> dict:
    """Counts and mean logits of ``network`` on the patients (with and without their lesions) and the controls of
    ``items`` (datalist entries with absolute paths; patients need ``healthy``). A logit >= 0 is a pathological
    call, as the evaluation's threshold of 0.5 on the probability."""
    import torch

    def logit(path: str, label: int) -> float:
        image = transforms({"image": path, "label": label})["image"][None]
        return float(network(image).flatten()[0])

    logits = {"with_lesions": [], "without_lesions": [], "controls": []}
    network.eval()
    with torch.no_grad():
        for item in items:
            if int(item["label"]) == 1:
                if not item.get("healthy"):
                    raise InputError(
                        f"{item['image']}: no 'healthy' counterpart in the datalist; expected the phantom's lesion-free"
                        " image of each patient (the project's generators write it)"
                    )
                logits["with_lesions"].append(logit(item["image"], 1))
                logits["without_lesions"].append(logit(item["healthy"], 1))
            else:
                logits["controls"].append(logit(item["image"], 0))
    summary = {}
    for group, values in logits.items():
        summary[group] = {
            "n": len(values),
            "called_pathological": sum(v >= 0 for v in values) / len(values) if values else None,
            "mean_logit": sum(values) / len(values) if values else None,
        }
    return summary


def _figure(value, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def table(results: dict) -> list[str]:
    lines = [
        "| model | patients called pathological: with lesions | without lesions | mean logit with / without "
        "| controls called pathological | patients / controls |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        w, wo, c = r["with_lesions"], r["without_lesions"], r["controls"]
        lines.append(
            f"| {name} | {_figure(w['called_pathological'], 3)} | {_figure(wo['called_pathological'], 3)} | "
            f"{_figure(w['mean_logit'], 2)} / {_figure(wo['mean_logit'], 2)} | "
            f"{_figure(c['called_pathological'], 3)} | {w['n']} / {c['n']} |"
        )
    return lines


def _pair(text: str, option: str) -> tuple[str, str]:
    if "=" not in text:
        raise InputError(f"{option} {text!r}: expected NAME=VALUE")
    name, value = text.split("=", 1)
    return name, value


def main(argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args.add_argument("--bundle_root", required=True, type=Path)
    args.add_argument("--preset", default=None, help="a preset merged on train.json, e.g. ms.json")
    args.add_argument("--dataset_dir", default=None, help="the data set folder (default: the configs')")
    args.add_argument("--split", default="test")
    args.add_argument("--set", nargs="*", default=[], help="id=JSON: an id the run overrode, e.g. spatial_size=[64,80]")
    args.add_argument("--models", nargs="*", default=None, help="name=path; default: the pipeline's two models")
    args.add_argument("--out", type=Path, default=None, help="markdown report (and .json beside it)")
    args = args.parse_args(argv)

    import torch
    from monai.bundle import ConfigParser

    from common.data import load_datalist

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json")] + ([str(CONFIGS / args.preset)] if args.preset else []))
    parser["bundle_root"] = str(args.bundle_root)
    for name, value in (_pair(text, "--set") for text in args.set):
        try:
            parser[name] = json.loads(value)
        except ValueError as error:
            raise InputError(f"--set {name}={value}: the value is not JSON ({error})") from error
    parser["mask_keys"] = []  # the decision only: masks are not read
    dataset_dir = Path(args.dataset_dir or parser.get_parsed_content("dataset_dir"))
    datalist_file = dataset_dir / "datalist.json"
    items = load_datalist(datalist_file, args.split, required_keys=("image", "label"))
    transforms = parser.get_parsed_content("preprocessing")
    models = (
        dict(_pair(text, "--models") for text in args.models)
        if args.models
        else {
            "constrained": str(args.bundle_root / "models" / "model.pt"),
            "unconstrained": str(args.bundle_root / "models" / "unconstrained" / "model.pt"),
        }
    )
    results = {}
    for name, path in models.items():
        if not Path(path).is_file():
            raise InputError(f"{path}: no such model file for '{name}'; expected a trained models/model.pt")
        network = parser.get_parsed_content("network_def", instantiate=True)
        network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        results[name] = lesion_reliance(network, transforms, items)
    lines = table(results)
    print("\n".join(lines))
    if args.out:
        command = command_line("benchmarks/lesion_reliance.py", argv)
        header = [
            "# Does the classifier decide by the lesions?",
            "",
            f"Command: `{command}`  ",
            f"Machine: {machine()}; {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}  ",
            f"Data: {datalist_file} ({args.split} split); models: "
            + ", ".join(f"{n} `{p}`" for n, p in models.items()),
            "",
            "Without lesions: each patient's lesion-free counterpart (same anatomy, scanner state and site). A "
            "classifier that decides by the lesions calls those healthy.",
            "",
        ]
        write_text_atomic(args.out, "\n".join(header + lines) + "\n")
        write_text_atomic(args.out.with_suffix(".json"), json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
