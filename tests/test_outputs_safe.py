"""No step replaces what it did not write (issue 14, finding 1 and parts of 5 and 7).

Outputs that equal, contain or lie inside an input are refused; a folder a step did not write
is refused unless --force; a file is never turned into a folder nor a folder into a file;
unwritable outputs are errors, not tracebacks; killed runs leave no workers, and their
temporaries are removed by the next run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from _data_helpers import make_dataset
from _delivery_fixtures import delivery_root, preprocessed, train_dir, write_raw_dataset  # noqa: F401
from masksam.cli import main
from masksam.components._io import (OUTPUT_MARKER, atomic_path, owned_output_dir, remove_stale_temps,
                                    write_json)
from masksam.components.data.importers import import_dataset
from masksam.components.data.phantom import generate_phantom
from masksam.errors import UserError


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """A four-case raw dataset (read-only for the tests: copy it before changing anything)."""
    return write_raw_dataset(tmp_path_factory.mktemp("outputs") / "raw")


def _preprocess(raw_dir: Path, out: Path, *extra: str) -> int:
    return main(["preprocess", "--raw", str(raw_dir), "--out", str(out), "--workers", "1", "--folds", "2",
                 "--target-spacing", "2", "2", "3", "--no-progress", *extra])


# ---------------------------------------------------------------------------- preprocess


def test_preprocess_out_around_the_raw_folder_is_refused(raw, tmp_path, capsys):
    project = tmp_path / "P"
    shutil.copytree(raw, project / "raw")
    (project / "notes.txt").write_text("my notes")
    before = _snapshot(project)
    assert _preprocess(project / "raw", project) == 2
    err = capsys.readouterr().err
    assert "--out" in err and str(project) in err and "overlaps the input" in err and "Traceback" not in err
    assert _snapshot(project) == before and _temps(tmp_path) == []


@pytest.mark.parametrize("where", ["same", "inside"])
def test_preprocess_out_equal_to_or_inside_the_raw_folder_is_refused(raw, tmp_path, capsys, where):
    data = tmp_path / "raw"
    shutil.copytree(raw, data)
    before = _snapshot(data)
    out = data if where == "same" else data / "preprocessed"
    assert _preprocess(data, out) == 2
    assert "overlaps the input" in capsys.readouterr().err
    assert _snapshot(data) == before


def test_preprocess_symlinked_out_pointing_at_the_raw_folder_is_refused(raw, tmp_path):
    from masksam.components.preprocess import preprocess_dataset

    (tmp_path / "link").symlink_to(raw, target_is_directory=True)
    before = _snapshot(raw)
    with pytest.raises(UserError, match="overlaps the input"):
        preprocess_dataset(raw, tmp_path / "link", workers=1, folds=2, progress=False)
    assert _snapshot(raw) == before


def test_foreign_folder_refused_then_replaced_with_force_then_rerun(raw, tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    assert _preprocess(raw, out) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "thesis.tex" in err and "--force" in err
    assert (out / "thesis.tex").read_text() == "years of work"
    assert _preprocess(raw, out, "--force") == 0
    assert not (out / "thesis.tex").exists() and (out / "plan.json").is_file()
    assert json.loads((out / OUTPUT_MARKER).read_text())["step"] == "preprocess"
    assert _preprocess(raw, out) == 0  # its own earlier output: replaced without --force
    restored = tmp_path / "restored"  # as DVC restores it from its cache: a plain copy
    shutil.copytree(out, restored)
    assert _preprocess(raw, restored) == 0
    assert _temps(tmp_path) == []


def test_output_of_another_step_is_refused(raw, tmp_path):
    from masksam.components.preprocess import preprocess_dataset

    data = tmp_path / "data"
    generate_phantom(data, cases=1, size_xyz=(32, 32, 8), progress=False)
    with pytest.raises(UserError, match=r"output of `masksam data`.*refusing to replace"):
        preprocess_dataset(raw, data, workers=1, folds=2, progress=False)
    assert (data / "dataset.json").is_file()


# ---------------------------------------------------------------------------- export


def test_export_out_file_refused_and_intact(train_dir, tmp_path, capsys):  # noqa: F811
    target = tmp_path / "model.onnx"
    target.write_bytes(b"an earlier model someone kept")
    assert main(["export", "--train", str(train_dir), "--out", str(target), "--tensorrt", "off"]) == 2
    err = capsys.readouterr().err
    assert str(target) in err and "is a file" in err
    assert target.read_bytes() == b"an earlier model someone kept"


def test_export_out_foreign_or_around_the_inputs_refused(train_dir, preprocessed, tmp_path):  # noqa: F811
    from masksam.components.export import export

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "slides.pdf").write_bytes(b"%PDF")
    with pytest.raises(UserError, match="slides.pdf.*--force"):
        export(train_dir, foreign, tensorrt="off")
    assert (foreign / "slides.pdf").read_bytes() == b"%PDF"
    before = _snapshot(train_dir)
    with pytest.raises(UserError, match="overlaps the input"):
        export(train_dir, train_dir / "export", tensorrt="off")
    with pytest.raises(UserError, match="overlaps the input"):
        export(train_dir, train_dir.parent, data_dir=preprocessed, tensorrt="off")
    assert _snapshot(train_dir) == before


# ---------------------------------------------------------------------------- data phantom / import


def test_phantom_refuses_a_dataset_it_did_not_write(tmp_path, capsys):
    mine = make_dataset(tmp_path / "Dataset001_Mine", n=1)  # a hand-made nnU-Net dataset
    before = _snapshot(mine)
    args = ["data", "phantom", "--out", str(mine), "--cases", "1", "--size", "32", "32", "8", "--no-progress"]
    assert main(args) == 2
    assert "refusing to replace" in capsys.readouterr().err and _snapshot(mine) == before
    assert main([*args, "--force"]) == 0
    assert json.loads((mine / "dataset.json").read_text())["name"] == "Phantom abdominal CT"
    assert main(args) == 0  # its own earlier output


def test_import_refuses_a_foreign_destination(tmp_path):
    src = make_dataset(tmp_path / "src", n=2)
    dst = make_dataset(tmp_path / "dst", n=1)
    before = _snapshot(dst)
    with pytest.raises(UserError, match="DST .*refusing to replace"):
        import_dataset("nnunet", src, dst, progress=False)
    assert _snapshot(dst) == before
    import_dataset("nnunet", src, dst, progress=False, force=True)
    import_dataset("nnunet", src, dst, progress=False)  # rerun into its own output
    assert json.loads((dst / "dataset.json").read_text())["numTraining"] == 2


# ---------------------------------------------------------------------------- files and folders


def test_validate_report_must_be_a_writable_file_outside_the_dataset(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", n=1)
    folder = tmp_path / "reports"
    (folder / "old").mkdir(parents=True)
    (folder / "old" / "r.txt").write_text("kept")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for report, says in [(folder, "is a folder"), (blocker / "r.txt", "is a file, not a folder"),
                         (data / "validation.txt", "overlaps the input")]:
        assert main(["data", "validate", str(data), "--report", str(report), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert str(report) in err and says in err and "Traceback" not in err
    assert (folder / "old" / "r.txt").read_text() == "kept" and blocker.read_text() == "x"
    assert main(["data", "validate", str(data), "--report", str(tmp_path / "ok.txt"), "--no-progress"]) == 0


@pytest.mark.parametrize("where", ["under-a-file", "proc"])
def test_unwritable_outputs_are_user_errors(raw, tmp_path, capsys, where):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = blocker / "out" if where == "under-a-file" else Path("/proc/masksam-test-output")
    assert main(["data", "phantom", "--out", str(out), "--cases", "1", "--size", "32", "32", "8",
                 "--no-progress"]) == 2
    assert _preprocess(raw, out) == 2
    err = capsys.readouterr().err
    assert err.count(f"cannot write --out {out}") + err.count(f"cannot write {out}") == 2
    assert "Traceback" not in err


def test_atomic_path_never_swaps_a_file_and_a_folder(tmp_path):
    folder, file = tmp_path / "folder", tmp_path / "file.txt"
    (folder / "sub").mkdir(parents=True)
    file.write_text("kept")
    with pytest.raises(UserError, match="is a folder"):
        write_json(folder, {"a": 1})
    with pytest.raises(UserError, match="is a file"):
        with atomic_path(file) as tmp:
            tmp.mkdir()
    with pytest.raises(UserError, match="is a file"):
        with owned_output_dir(file, "export"):
            pass
    assert (folder / "sub").is_dir() and file.read_text() == "kept" and _temps(tmp_path) == []


def test_compile_refuses_a_folder(tmp_path):
    pytest.importorskip("kfp")
    from masksam.pipelines.pipeline import compile_pipeline

    (tmp_path / "pipeline.yaml").mkdir()
    with pytest.raises(UserError, match="is a folder"):
        compile_pipeline(tmp_path / "pipeline.yaml", params_path=Path(__file__).parents[1] / "params.yaml")
    assert (tmp_path / "pipeline.yaml").is_dir()


# ---------------------------------------------------------------------------- stale temporaries


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    from masksam.components import _io

    out = tmp_path / "out"
    host, me = _io._host_tag(), os.getpid()
    dead = tmp_path / f".out.{host}-{_dead_pid()}-0-abc123.tmp"
    recycled = tmp_path / f".out.{host}-{me}-{_io._start_ticks(me) + 1}-def456.tmp"  # pid reused
    live = tmp_path / f".out.{host}-{me}-{_io._start_ticks(me)}-ghi789.tmp"
    other_host = tmp_path / f".out.{'0' * 8 if host != '0' * 8 else '1' * 8}-{_dead_pid()}-0-x.tmp"
    other_output = tmp_path / f".outer.{host}-{_dead_pid()}-0-y.tmp"
    for d in (dead, recycled, live, other_host, other_output):
        (d / "cases").mkdir(parents=True)
        (d / "cases" / "big.npz").write_bytes(b"0" * 1000)
    with owned_output_dir(out, "preprocess") as tmp:
        (tmp / "plan.json").write_text("{}")
    assert not dead.exists() and not recycled.exists()
    assert live.is_dir() and other_host.is_dir() and other_output.is_dir()
    assert remove_stale_temps(out) == []


# ---------------------------------------------------------------------------- killed runs


@pytest.fixture(scope="module")
def big_raw(tmp_path_factory) -> Path:
    """Cases that take seconds each at the fine target spacing the signal tests use."""
    return generate_phantom(tmp_path_factory.mktemp("signals") / "raw", cases=4, size_xyz=(128, 128, 32),
                            workers=1, progress=False)


def _start_preprocess(raw_dir: Path, out: Path) -> tuple[subprocess.Popen, list[psutil.Process]]:
    """Start `masksam preprocess --workers 2`; return once its temporary output exists."""
    cmd = [sys.executable, "-c", "import sys; from masksam.cli import main; sys.exit(main())", "preprocess",
           "--raw", str(raw_dir), "--out", str(out), "--workers", "2", "--folds", "2",
           "--target-spacing", "0.4", "0.4", "0.6", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(out.parent.glob(f".{out.name}.*.tmp")):
        assert proc.poll() is None, f"preprocess ended early: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "preprocess did not start its output in 120 s"
        time.sleep(0.01)
    family = psutil.Process(proc.pid).children(recursive=True)
    workers = [p for p in family if "spawn_main" in " ".join(p.cmdline())]
    assert len(workers) == 2, [p.cmdline() for p in family]
    return proc, family


def _alive(processes: list[psutil.Process], within: float) -> list[int]:
    deadline = time.monotonic() + within
    while True:
        alive = [p.pid for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def test_sigterm_stops_workers_and_removes_the_temporary_output(big_raw, tmp_path):
    """(SIGINT already raised KeyboardInterrupt, which the pool survived cleanly, if slowly.)"""
    out = tmp_path / "pp"
    proc, family = _start_preprocess(big_raw, out)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=30)
    assert rc == 128 + signal.SIGTERM and time.monotonic() - started < 30
    assert _alive(family, within=10) == []
    assert not out.exists() and _temps(tmp_path) == []


def test_workers_die_with_a_sigkilled_parent_and_the_next_run_cleans_up(big_raw, tmp_path):
    out = tmp_path / "pp"
    proc, family = _start_preprocess(big_raw, out)
    proc.kill()
    proc.wait(timeout=30)
    assert _alive(family, within=10) == []
    left = _temps(tmp_path)
    assert len(left) == 1 and f"-{proc.pid}-" in left[0]  # the killed run's, named by its pid
    assert [p.name for p in remove_stale_temps(out)] == left and _temps(tmp_path) == []


def test_evaluate_pipeline_output_is_owned_atomic_and_names_files_that_exist(tmp_path, train_dir, preprocessed):  # noqa: F811
    """evaluate --out-dir: a foreign folder is refused and left as it was; the written summary
    and per-case CSV name files that exist (the raw references, the predictions under OUT);
    a rerun replaces its own output."""
    import csv

    from masksam.components.evaluate import evaluate_model

    raw = preprocessed.parent / "raw"
    out = tmp_path / "eval"
    out.mkdir()
    (out / "predictions").mkdir()
    (out / "predictions" / "mine.txt").write_text("keep")
    with pytest.raises(UserError, match="refusing to replace it"):
        evaluate_model(train_dir, raw, preprocessed, out, progress=False, mlflow_log=False)
    assert (out / "predictions" / "mine.txt").read_text() == "keep"
    with pytest.raises(UserError, match="overlaps"):
        evaluate_model(train_dir, raw, preprocessed, raw / "eval", progress=False, mlflow_log=False)

    out = tmp_path / "eval2"
    for _ in range(2):  # the second run replaces the first run's output
        summary = evaluate_model(train_dir, raw, preprocessed, out, progress=False, mlflow_log=False)
    saved = json.loads((out / "summary.json").read_text())
    assert saved["n_cases"] == summary["n_cases"] >= 1
    for entry in saved["metric_per_case"]:
        assert Path(entry["prediction_file"]).is_file() and Path(entry["prediction_file"]).parent == out / "predictions"
        assert Path(entry["reference_file"]).is_file() and Path(entry["reference_file"]).parent == raw / "labelsTr"
    with open(out / "per_case.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and all(Path(r["prediction_file"]).is_file() and Path(r["reference_file"]).is_file() for r in rows)
    assert Path(saved["reference_folder"]) == raw / "labelsTr"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".eval2.")], "temporary left behind"


def _half_sent_result(ready: str) -> None:
    """In a pool worker: start a result message on the pool's result pipe and never finish it,
    as a worker SIGKILLed in the middle of sending its result leaves it."""
    import gc
    import struct
    from multiprocessing.queues import SimpleQueue

    queue = next(o for o in gc.get_objects() if isinstance(o, SimpleQueue))
    os.write(queue._writer.fileno(), struct.pack("!i", 1 << 20) + b"partial")
    Path(ready).write_text("sent half")
    time.sleep(600)


def test_kill_workers_does_not_hang_on_a_result_cut_in_half(tmp_path):
    """The manager thread of a pool whose worker died mid-send waits for the rest of the message
    forever; kill_workers must leave the pool so that shutdown (and interpreter exit) return."""
    import threading

    from masksam.components._workers import kill_workers, spawn_pool

    ready = tmp_path / "ready"
    pool = spawn_pool(1)
    future = pool.submit(_half_sent_result, str(ready))
    deadline = time.monotonic() + 120
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ready.exists(), "the worker never started its half message"
    kill_workers(pool, timeout=10)
    done = threading.Event()
    threading.Thread(target=lambda: (pool.shutdown(wait=True), done.set()), daemon=True).start()
    assert done.wait(20), "pool.shutdown hung after kill_workers"
    assert future.done()
