"""benchmarks/fidelity.py: the pipelines it runs, the data its comparisons share, reuse of finished runs, records
carried over from an earlier results file, tables."""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from common.pipeline import PROGRESS_FILE, read_stages, stage_command
from tests.bundle_runner import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import fidelity  # noqa: E402

PIPELINES = sorted((REPO / "bundles").glob("*/configs/pipeline*.json"))


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: f"{p.parts[-3]}/{p.name}")
def test_every_pipeline_names_existing_configs_and_ends_with_evaluate(path):
    bundle = path.parents[1]
    stages = read_stages(bundle, path.name)
    for stage in stages:
        for name in stage["configs"]:
            assert (bundle / "configs" / name).is_file(), f"{path.name}: stage {stage['name']} names {name}"
    assert stages[-1]["name"] == "evaluate" and "evaluate.json" in stages[-1]["configs"]


def test_a_stage_fixes_its_own_ids_over_the_command_line():
    stages = read_stages(REPO / "bundles" / "attr_constraint")
    unconstrained = next(s for s in stages if s["name"] == "unconstrained")
    command = stage_command(REPO / "bundles" / "attr_constraint", unconstrained, ["--alpha_A", "500"])
    # monai.bundle run takes the last value of a repeated id: the comparator stays unconstrained
    assert command[len(command) - 1 - command[::-1].index("--alpha_A") + 1] == "0"
    constrained = stage_command(REPO / "bundles" / "attr_constraint", stages[0], ["--alpha_A", "500"])
    assert constrained[-2:] == ["--alpha_A", "500"]


def _data_request(run, quick, root):
    """The data set a run's train.json would ask ensure_dataset for."""
    parser = ConfigParser()
    configs = read_stages(REPO / "bundles" / run.bundle, run.pipeline)[0]["configs"]
    parser.read_config([str(REPO / "bundles" / run.bundle / "configs" / c) for c in configs])
    for key, value in fidelity.run_overrides(run, quick, root).items():
        parser[key] = value
    params = parser.get_parsed_content("synthetic_params")
    return parser.get_parsed_content("synthetic"), str(parser.get_parsed_content("dataset_dir")), params


@pytest.mark.parametrize("quick", [True, False])
@pytest.mark.parametrize("dataset", ["boxes", "brain_atrophy"])
def test_vagan_and_icam_are_compared_on_the_same_images(dataset, quick, tmp_path):
    runs = {r.bundle: r for r in fidelity.RUNS if r.dataset == dataset}
    vagan, icam = (_data_request(runs[b], quick, tmp_path) for b in ("vagan", "icam"))
    assert vagan == icam  # one folder, one generator request: neither run regenerates the other's data


def test_a_finished_run_is_reused_until_its_overrides_change(tmp_path, monkeypatch):
    calls = []

    def fake_pipeline(run, overrides, log_path, continue_stopped=False):
        calls.append(overrides)
        eval_dir = tmp_path / f"{run.bundle}_{run.dataset}" / "bundle" / "eval"
        eval_dir.mkdir(parents=True, exist_ok=True)
        (eval_dir / "metrics.json").write_text(json.dumps({"vagan": {"ncc": 0.5 + len(calls), "n": 3}}))
        return 1.0

    monkeypatch.setattr(fidelity, "run_pipeline", fake_pipeline)
    versions = iter(["aaa1111", "bbb2222", "ccc3333+changes"])
    monkeypatch.setattr(fidelity, "code_version", lambda: next(versions))
    run = next(r for r in fidelity.RUNS if r.name == "vagan/boxes")
    first = fidelity.execute(run, True, tmp_path, fresh=False)
    again = fidelity.execute(run, True, tmp_path, fresh=False)
    assert len(calls) == 1 and again["reports"] == first["reports"]
    assert [i["code"] for i in again["invocations"]] == ["aaa1111"]  # a reused run keeps the code that made it
    changed = fidelity.Run(run.bundle, run.dataset, quick={**run.quick, "max_epochs": 9})
    rerun = fidelity.execute(changed, True, tmp_path, fresh=False)
    assert rerun["reports"]["attribution"]["vagan"]["ncc"] == 2.5
    assert [i["code"] for i in rerun["invocations"]] == ["bbb2222"]
    fresh = fidelity.execute(changed, True, tmp_path, fresh=True)
    assert len(calls) == 3
    assert [i["code"] for i in fresh["invocations"]] == ["ccc3333+changes"]  # a fresh start begins a new list


def test_a_stopped_run_is_continued_and_timed_by_its_pieces(tmp_path, monkeypatch):
    """A run whose bundle root holds the progress record of the same pipeline command is continued (not when
    --fresh, not when the record is another command's); a run made in pieces is timed by its stages' sums."""
    continued = []

    def fake_pipeline(run, overrides, log_path, continue_stopped=False):
        continued.append(continue_stopped)
        bundle_root = Path(overrides["bundle_root"])
        (bundle_root / "eval").mkdir(parents=True, exist_ok=True)
        (bundle_root / "eval" / "metrics.json").write_text(json.dumps({"vagan": {"ncc": 0.5, "n": 3}}))
        times = {"classifier": 10.0, "vagan": 700.0, "evaluate": 5.0, "total": 715.0, "pieces": {"vagan": 2}}
        (bundle_root / "pipeline_times.json").write_text(json.dumps(times))
        return 400.0  # this call's share only

    monkeypatch.setattr(fidelity, "run_pipeline", fake_pipeline)
    versions = iter(["aaa1111", "bbb2222", "ccc3333+changes"])
    monkeypatch.setattr(fidelity, "code_version", lambda: next(versions))
    run = next(r for r in fidelity.RUNS if r.name == "vagan/boxes")
    overrides = fidelity.run_overrides(run, True, tmp_path)
    stages = [s["name"] for s in read_stages(REPO / "bundles" / run.bundle, run.pipeline)]
    progress_path = Path(overrides["bundle_root"]) / PROGRESS_FILE
    progress_path.parent.mkdir(parents=True)

    def stopped_by(args):
        record = {"pipeline": run.pipeline, "stages": stages, "overrides": args, "finished": stages[:1]}
        progress_path.write_text(json.dumps(record))

    finished_record = tmp_path / "vagan_boxes" / "fidelity_run.json"  # else the run would be reused as it is
    stopped_by(fidelity.pipeline_args({**overrides, "seed": 7}))  # another command's record: started again
    fidelity.execute(run, True, tmp_path, fresh=False)
    finished_record.unlink()
    stopped_by(fidelity.pipeline_args(overrides))
    fidelity.execute(run, True, tmp_path, fresh=True)
    finished_record.unlink()
    stopped_by(fidelity.pipeline_args(overrides))
    record = fidelity.execute(run, True, tmp_path, fresh=False)
    assert continued == [False, False, True]
    assert record["seconds"] == 715.0 and record["stage_pieces"] == {"vagan": 2}
    assert "pieces" not in record["stage_seconds"]
    # the fresh start began the list; the continuation added itself to it
    assert [i["code"] for i in record["invocations"]] == ["bbb2222", "ccc3333+changes"]
    out = tmp_path / "fidelity.md"
    fidelity.write_results({run.name: record}, {}, out, "python benchmarks/fidelity.py", quick=True, wall=1.0)
    assert "| vagan/boxes | 715 | classifier 10, vagan 700 (in 2 pieces), evaluate 5 |" in out.read_text()
    assert "| bbb2222, ccc3333+changes | " in out.read_text()
    timing = next(line for line in out.read_text().splitlines() if "| bbb2222, ccc3333+changes |" in line)
    assert timing.endswith(" kernels |")  # the processor the pieces ran on


def test_code_version_names_the_commit_and_any_change_to_it(tmp_path):
    assert fidelity.code_version(tmp_path) == "unknown"  # not a git checkout

    def git(*args):
        command = ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args]
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, check=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "code.py").write_text("a = 1\n")
    (tmp_path / "benchmarks" / "results" / "table.md").write_text("old\n")
    git("add", "-A")
    git("commit", "-qm", "first")
    commit = git("rev-parse", "--short", "HEAD")
    assert fidelity.code_version(tmp_path) == commit
    (tmp_path / "benchmarks" / "results" / "table.md").write_text("written by fidelity.py\n")
    assert fidelity.code_version(tmp_path) == commit  # its own results are not a change of code
    (tmp_path / "code.py").write_text("a = 2\n")
    changed = fidelity.code_version(tmp_path)
    (tmp_path / "code.py").write_text("a = 3\n")
    other = fidelity.code_version(tmp_path)
    assert changed.startswith(f"{commit}+changes-") and other.startswith(f"{commit}+changes-") and changed != other


def test_a_run_continued_from_unrecorded_pieces_says_so(tmp_path):
    invocations = fidelity.note_invocation(tmp_path / "invocations.json", continued=True)
    assert [i["code"] for i in invocations][0] == "not recorded" and len(invocations) == 2
    fresh = fidelity.note_invocation(tmp_path / "invocations.json", continued=False)
    assert len(fresh) == 1 and fresh[0]["code"] != "not recorded"
    assert fresh[0]["cpu"].endswith(" kernels")  # the vector kernels torch uses: they change the rounding


def test_the_tables_put_each_method_beside_the_paper(tmp_path):
    ncc = {"ncc": 0.812, "ncc_sd": 0.05, "ncc_paper": 0.94, "n": 40}
    records = {
        "vagan/boxes": {"reports": {"attribution": {"vagan": ncc, "gradient": {"ncc": 0.1, "ncc_sd": 0.02}}}},
        "icam/brain_atrophy": {"reports": {"attribution": {"icam": {"ncc_minus": 0.3, "ncc_minus_sd": 0.1}}}},
        "attr_constraint/brain_ms": {
            "reports": {
                "attribution": {"NoConsG": {"dice": 0.25, "dice_paper": 0.001, "auprc": 0.11, "auprc_paper": 0.2}}
            }
        },
        "tvd_score/ellipses": {
            "reports": {
                "tvd": {
                    "features": {"size": {"global_score": 0.04, "bootstrap_variance_global": 0.0004}},
                    "test": {"data_scores": {"size": {"global_score": 0.01}}},
                }
            }
        },
    }
    out = tmp_path / "fidelity.md"
    fidelity.write_results(records, {}, out, "python benchmarks/fidelity.py", quick=True, wall=1.0)
    text = out.read_text()
    assert "| vagan | 0.812 +/- 0.050, 40 cases (paper 0.94) |  |" in text
    assert "| gradient (vagan classifier) | 0.100 +/- 0.020 |  |" in text
    assert "| icam |  | 0.300 +/- 0.100 |" in text
    assert "| NoConsG |  |  | 0.250 (paper 0.001) | 0.110 (paper 0.20) |" in text
    assert "| ellipses | size | label-independent | 0.040 (0.020) | 0.010 | 0.049 |" in text
    assert json.loads(out.with_suffix(".json").read_text())["records"].keys() == records.keys()


def test_merge_carries_earlier_records_over_and_refuses_stale_ones(tmp_path, monkeypatch, capsys):
    def fake_execute(run, quick, root, fresh):
        return {"run": run.name, "seconds": 2.0, "reports": {"attribution": {"icam": {"ncc_minus": 0.4, "n": 2}}}}

    monkeypatch.setattr(fidelity, "execute", fake_execute)
    vagan = next(r for r in fidelity.RUNS if r.name == "vagan/boxes")
    overrides = fidelity.run_overrides(vagan, True, tmp_path / "earlier_root")
    record = {
        "run": vagan.name,
        "pipeline": vagan.pipeline,
        "key": fidelity.run_key(vagan, overrides),
        "overrides": overrides,
        "seconds": 1.0,
        "finished": "2026-12-01 00:00 UTC",
        "reports": {"attribution": {"vagan": {"ncc": 0.81, "n": 4}}},
    }
    earlier, out = tmp_path / "earlier.json", tmp_path / "merged.md"
    earlier.write_text(json.dumps({"records": {vagan.name: record}, "failures": {}}))
    argv = ["--quick", "--runs", "icam/boxes", "--merge", str(earlier), "--root", str(tmp_path / "now")]
    argv += ["--out", str(out)]
    assert fidelity.main(argv) == 0
    merged = json.loads(out.with_suffix(".json").read_text())["records"]
    assert list(merged) == ["vagan/boxes", "icam/boxes"]  # the benchmark's order, whatever the source
    assert merged["vagan/boxes"]["reports"] == record["reports"] and merged["vagan/boxes"]["carried_from"]
    text = out.read_text()
    assert "| vagan | 0.810, 4 cases |" in text and f"from `{earlier}`" in text and "): vagan/boxes." in text

    earlier.write_text(json.dumps({"records": {vagan.name: {**record, "overrides": {**overrides, "max_epochs": 99}}}}))
    with pytest.raises(SystemExit):
        fidelity.main(argv)
    error = capsys.readouterr().err
    assert "the record of vagan/boxes" in error and "['max_epochs']" in error


def test_the_processor_is_described_from_whatever_cpuinfo_gives(tmp_path):
    full = tmp_path / "full"
    full.write_text("processor\t: 0\nmodel name\t: AMD EPYC\ncpu family\t: 25\nmodel\t\t: 17\nprocessor\t: 1\n")
    assert fidelity.cpu_description(full).startswith("AMD EPYC (family 25 model 17), ")
    partial = tmp_path / "partial"
    partial.write_text("cpu family\t: 25\n")
    assert "(family 25 model ?)" in fidelity.cpu_description(partial)
    assert fidelity.cpu_description(tmp_path / "missing").endswith(" kernels")


def test_a_reports_command_can_be_pasted_into_a_shell_again():
    argv = ["--runs", "tvd_score/ellipses", "--set", "seed=[0, 1]", "--out", "a b/fidelity.md"]
    command = fidelity.command_line("benchmarks/fidelity.py", argv)
    assert shlex.split(command) == ["python", "benchmarks/fidelity.py", *argv]
    assert command.startswith("python benchmarks/fidelity.py --runs tvd_score/ellipses --set 'seed=[0, 1]'")
