"""common.pipeline --continue: a pipeline killed during a stage picks up where it stopped, finished stages skipped,
the interrupted one resumed when it had written a checkpoint of its own, its time the sum of its pieces."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.errors import InputError
from common.files import EVALUATION_PROGRESS_DIR
from common.pipeline import PROGRESS_FILE, resumable
from common.pipeline import main as pipeline_main

REPO = Path(__file__).resolve().parents[1]

# Stage "train" stands for a training config with a resume id: started afresh it writes a checkpoint; while the file
# "hold" exists in the bundle root it then runs far longer than the test waits, else it finishes. Every stage appends
# its name (and "-resumed" when given --resume True) to ran.txt, so the test sees which stages ran how.
LOG = "$open(@bundle_root + '/ran.txt', 'a').write(@stage + ('-resumed' if @resume else '') + chr(10))"
TRAIN = [
    "$None if @resume else (pathlib.Path(@bundle_root + '/models').mkdir(parents=True, exist_ok=True), "
    "pathlib.Path(@bundle_root + '/models/checkpoint_epoch=1.pt').write_text('state'))",
    "$time.sleep(600) if pathlib.Path(@bundle_root + '/hold').exists() else None",
]


@pytest.fixture
def bundle(tmp_path):
    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    for name, extra in (("prepare", []), ("train", TRAIN), ("evaluate", [])):
        config = {"imports": ["$import pathlib", "$import time"], "stage": name, "resume": False, "run": [LOG, *extra]}
        (bundle / "configs" / f"{name}.json").write_text(json.dumps(config))
    stages = [{"name": n, "configs": [f"{n}.json"]} for n in ("prepare", "train", "evaluate")]
    (bundle / "configs" / "pipeline.json").write_text(json.dumps({"stages": stages}))
    return bundle


def _kill_when(args: list[str], root: Path, stopped_at) -> dict:
    """Run the pipeline with ``args`` in its own process group, recording its progress every 0.2 s; kill the whole
    group (as the end of a job does) once ``stopped_at(progress record)`` holds; that record."""
    script = f"import sys, common.pipeline as p; p.PROGRESS_INTERVAL = 0.2; sys.exit(p.main({args!r}))"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env, start_new_session=True)
    progress_path = root / PROGRESS_FILE
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            progress = json.loads(progress_path.read_text()) if progress_path.is_file() else {}
            if progress.get("running") and stopped_at(progress):
                return progress
            assert process.poll() is None, "the pipeline ended before it could be interrupted"
            time.sleep(0.1)
        raise AssertionError("the pipeline never reached the point to interrupt it")
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.mark.slow
def test_a_pipeline_killed_twice_in_a_stage_continues_where_it_stopped(bundle, tmp_path, capsys):
    root = tmp_path / "run"
    root.mkdir()
    (root / "hold").touch()
    args = [str(bundle), "--bundle_root", str(root)]

    def ran() -> list[str]:
        return (root / "ran.txt").read_text().split()

    checkpoint = root / "models" / "checkpoint_epoch=1.pt"

    first = _kill_when(
        args,
        root,
        lambda p: p["running"]["stage"] == "train" and p["seconds"]["train"] >= 4 and checkpoint.is_file(),
    )
    assert first["finished"] == ["prepare"] and ran() == ["prepare", "train"]
    with pytest.raises(InputError, match="different arguments.*overrides"):
        pipeline_main([*args, "--continue", "--seed", "1"])

    # the resumed piece writes no checkpoint of its own: the first piece's still counts, as the stage's
    second = _kill_when(
        [*args, "--continue"],
        root,
        lambda p: "train-resumed" in ran() and p["seconds"]["train"] >= first["seconds"]["train"] + 4,
    )
    assert ran() == ["prepare", "train", "train-resumed"]

    (root / "hold").unlink()
    assert pipeline_main([*args, "--continue"]) == 0
    assert ran() == ["prepare", "train", "train-resumed", "train-resumed", "evaluate"]
    assert "prepare: finished in an earlier run" in capsys.readouterr().out
    times = json.loads((root / "pipeline_times.json").read_text())
    assert times["pieces"] == {"train": 3}
    assert times["train"] >= second["seconds"]["train"]  # the pieces summed, not the last one alone
    assert times["total"] == pytest.approx(times["prepare"] + times["train"] + times["evaluate"], abs=0.2)

    assert pipeline_main([*args, "--continue"]) == 0  # a finished pipeline: nothing runs again
    assert len(ran()) == 5
    assert pipeline_main(args) == 0  # without --continue: from the first stage, a new record
    assert ran()[5:] == ["prepare", "train", "evaluate"]
    assert "pieces" not in json.loads((root / "pipeline_times.json").read_text())


def test_a_stage_resumes_only_from_a_checkpoint_of_its_own(tmp_path):
    """Resumed only when the stage wrote a checkpoint since its first piece started and, in each folder it wrote
    to, the checkpoint a resume loads (the highest epoch) is its own, not an earlier run's that got further."""
    started = time.time() - 1.0  # a file's time stamp may lag the clock by a tick; the stage started earlier anyway
    earlier_stage, own = tmp_path / "models" / "classifier", tmp_path / "models" / "vagan"
    for folder in (earlier_stage, own):
        folder.mkdir(parents=True)
    (earlier_stage / "checkpoint_epoch=30.pt").write_text("")
    os.utime(earlier_stage / "checkpoint_epoch=30.pt", (started - 60, started - 60))
    assert resumable(tmp_path, started) == (
        False,
        "it wrote no checkpoint or evaluation progress record before it stopped",
    )
    (own / "checkpoint_epoch=5.pt").write_text("")
    assert resumable(tmp_path, started) == (True, "")
    (own / "checkpoint_epoch=100.pt").write_text("")
    os.utime(own / "checkpoint_epoch=100.pt", (started - 60, started - 60))
    resume, why_not = resumable(tmp_path, started)
    assert not resume and "checkpoint_epoch=100.pt (an earlier run's) has a higher epoch" in why_not


def test_an_evaluation_resumes_from_a_progress_record_of_its_own(tmp_path):
    """An evaluation has no epoch checkpoints: a progress record it wrote since its first piece started (the TVD
    sampling's, an attribution evaluator's batch) makes it resumable; an older one does not."""
    started = time.time() - 1.0
    records = tmp_path / "eval" / EVALUATION_PROGRESS_DIR
    records.mkdir(parents=True)
    (records / "plain.pt").write_text("")
    os.utime(records / "plain.pt", (started - 60, started - 60))
    assert not resumable(tmp_path, started)[0]
    (records / "conditional_size.pt").write_text("")
    assert resumable(tmp_path, started) == (True, "")
    (records / "conditional_size.pt").unlink()
    (records / "test").mkdir()  # an attribution evaluation's records: one folder per evaluator
    (records / "test" / "batch_000003.pt").write_text("")
    assert resumable(tmp_path, started) == (True, "")


def test_continue_refuses_a_record_it_did_not_write(bundle, tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    (root / PROGRESS_FILE).write_text("{not json")
    with pytest.raises(InputError, match=f"{PROGRESS_FILE}: not a progress record"):
        pipeline_main([str(bundle), "--continue", "--bundle_root", str(root)])
