"""register / pull: alias decision, lineage tags, pyfunc round trip, tamper refusal."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from _delivery_fixtures import delivery_root, export_dir, phantom_ct, preprocessed, train_dir  # noqa: F401
from _shared import eval_summary_for
from masksam.errors import UserError


@pytest.fixture()
def tracking(tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # a sqlite store puts artifacts in ./mlruns: keep them out of the checkout
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    return uri


def _version(client, name, src, dice, test_set):
    v = client.create_model_version(name, str(src))
    client.set_model_version_tag(name, v.version, "eval.mean_dice", str(dice))
    client.set_model_version_tag(name, v.version, "test_set_id", test_set)
    return v.version


def test_champion_moves_only_on_better_dice_same_test_set(tracking, tmp_path):
    from mlflow import MlflowClient

    from masksam.components.register import decide_alias

    client = MlflowClient()
    client.create_registered_model("m")
    v1 = _version(client, "m", tmp_path, 0.70, "setA")
    assert decide_alias(client, "m", v1, 0.70, "setA").alias == "champion"
    v2 = _version(client, "m", tmp_path, 0.65, "setA")
    d = decide_alias(client, "m", v2, 0.65, "setA")
    assert d.alias == "challenger" and "<=" in d.reason
    v3 = _version(client, "m", tmp_path, 0.90, "setB")  # better, but another test set
    d = decide_alias(client, "m", v3, 0.90, "setB")
    assert d.alias == "challenger" and "not comparable" in d.reason
    v4 = _version(client, "m", tmp_path, 0.75, "setA")
    d = decide_alias(client, "m", v4, 0.75, "setA")
    assert d.alias == "champion" and d.previous_champion == v1
    assert client.get_model_version_by_alias("m", "champion").version == v4
    assert client.get_model_version_by_alias("m", "challenger").version == v3


def test_test_set_id_depends_on_cases_and_reference_content(tmp_path):
    from masksam.components.register import test_set_id

    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "a.nii.gz").write_bytes(b"1")
    ev = {"metric_per_case": [{"case": "a", "reference_file": str(ref / "a.nii.gz")}]}
    first = test_set_id(ev)
    (ref / "a.nii.gz").write_bytes(b"2")
    assert test_set_id(ev) != first
    assert test_set_id({**ev, "test_set_id": "recorded"}) == "recorded"  # evaluate's own record wins
    with pytest.raises(UserError):
        test_set_id({"metric_per_case": []})
    # names alone never identify a test set: the references are gone and nothing was recorded
    (ref / "a.nii.gz").unlink()
    with pytest.raises(UserError, match="by content"):
        test_set_id(ev)


def test_test_set_digest_sees_content_not_only_names(tmp_path):
    from masksam.components.data.manifest import test_set_digest

    for case in ("a", "b"):
        (tmp_path / f"{case}_0000.nii.gz").write_bytes(case.encode())
        (tmp_path / f"{case}.nii.gz").write_bytes(b"label " + case.encode())
    files = {c: [tmp_path / f"{c}_0000.nii.gz", tmp_path / f"{c}.nii.gz"] for c in ("a", "b")}
    first = test_set_digest(files)
    assert test_set_digest(dict(reversed(list(files.items())))) == first  # order does not matter
    (tmp_path / "b.nii.gz").write_bytes(b"relabelled")  # same names, another reference
    assert test_set_digest(files) != first
    (tmp_path / "a_0000.nii.gz").unlink()
    with pytest.raises(UserError, match="a_0000.nii.gz"):
        test_set_digest(files)


def test_model_below_the_dice_floor_is_never_champion(tracking, tmp_path):
    from mlflow import MlflowClient

    from masksam.components.register import decide_alias

    client = MlflowClient()
    client.create_registered_model("f")
    v1 = _version(client, "f", tmp_path, 0.0, "setA")
    d = decide_alias(client, "f", v1, 0.0, "setA", min_dice=0.5)  # no champion yet: still refused
    assert d.alias == "challenger" and "below the floor" in d.reason
    v2 = _version(client, "f", tmp_path, float("nan"), "setA")
    assert decide_alias(client, "f", v2, float("nan"), "setA", min_dice=0.0).alias == "challenger"
    v3 = _version(client, "f", tmp_path, 0.6, "setA")
    assert decide_alias(client, "f", v3, 0.6, "setA", min_dice=0.5).alias == "champion"
    v4 = _version(client, "f", tmp_path, 0.4, "setA")  # better than nothing is not enough
    d = decide_alias(client, "f", v4, 0.4, "setA", min_dice=0.5)
    assert d.alias == "challenger" and d.previous_champion == v3
    assert client.get_model_version_by_alias("f", "champion").version == v3


def test_stage_code_is_importable_package(tmp_path):
    from masksam.components.register import stage_code

    pkg = stage_code(tmp_path)
    assert not (pkg / "model").exists()  # serving runs the ONNX graph: no torch network shipped
    for rel in ("__init__.py", "errors.py", "components/predictor.py", "components/preprocess.py",
                "components/_pyfunc.py"):
        assert (pkg / rel).is_file(), rel
    assert not list(pkg.rglob("__pycache__"))


@pytest.mark.slow
def test_register_load_predict_pull_and_tamper(tracking, tmp_path, train_dir, export_dir, preprocessed):  # noqa: F811
    import mlflow
    from mlflow import MlflowClient

    from masksam.components._loading import HashMismatch, download_model
    from masksam.components.pull import pull
    from masksam.components.register import register

    ev = eval_summary_for(export_dir, foreground_mean={"Dice": 0.5, "HD95": 4.0, "NSD": 0.6}, test_set_id="set-1")
    (tmp_path / "eval.json").write_text(json.dumps(ev))
    d = register(train_dir, export_dir, tmp_path / "eval.json")
    assert d.alias == "champion"
    client = MlflowClient()
    version = client.get_model_version("masksam", d.version)
    tags = version.tags
    for key in ("git_commit", "train_run_id", "onnx_sha256", "test_set_id", "eval.mean_dice", "eval.hd95"):
        assert key in tags, key
    # the registry reads well: a model card per version, a description of the model
    assert "Intended use" in version.description and "mean Dice 0.500" in version.description
    assert client.get_registered_model("masksam").description
    # no training run in this store (the fixture trained without MLflow): a register run, with
    # MLflow's standard source/user tags, in an experiment that opens on its runs
    run = client.get_run(version.run_id)
    assert run.data.tags["mlflow.source.name"] == "masksam register" and run.data.tags["mlflow.user"]
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"

    model = mlflow.pyfunc.load_model("models:/masksam@champion")
    img, _ = phantom_ct(9)
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    labels = model.predict(arr, params={"spacing": list(img.GetSpacing()), "origin": list(img.GetOrigin()),
                                        "direction": list(img.GetDirection())})
    assert labels.shape == arr.shape and labels.dtype == np.uint8
    # same answer as masksam predict on the file
    from masksam.components.predict import predict

    sitk.WriteImage(img, str(tmp_path / "ct.nrrd"))
    out = predict(tmp_path / "ct.nrrd", tmp_path / "pred", export_dir / "model.onnx", device="cpu", progress=False)
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(out[0].output)))
    assert (ref == labels).mean() > 0.999

    onnx_path, files = pull("models:/masksam@champion", tmp_path / "pulled")
    assert files["artifacts/model.onnx"] == tags["onnx_sha256"]
    # tamper with a downloaded copy: refused, with the reason
    tampered = tmp_path / "tampered"
    shutil.copytree(onnx_path.parent.parent, tampered)
    with open(tampered / "artifacts" / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(HashMismatch, match="modified or corrupted"):
        mlflow.pyfunc.load_model(str(tampered))
    # a worse model on the same test set becomes challenger
    ev["foreground_mean"]["Dice"] = 0.4
    (tmp_path / "eval.json").write_text(json.dumps(ev))
    assert register(train_dir, export_dir, tmp_path / "eval.json").alias == "challenger"
    with pytest.raises(UserError, match="not empty"):
        download_model  # noqa: B018 - imported for the tamper path above
        pull("models:/masksam@champion", tmp_path / "pulled")


def test_model_is_logged_from_its_training_run(tracking, tmp_path, train_dir, export_dir):  # noqa: F811
    """Lineage in one place: the training run shows the logged model, the registered version
    points at that run, and the run has the raw dataset as its input."""
    from mlflow import MlflowClient

    from masksam.components._tracking import RunLogger
    from masksam.components.data.manifest import write_manifest
    from masksam.components.register import register

    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "dataset.json").write_text(json.dumps({"name": "Phantom", "labels": {"background": 0, "a": 1}}))
    manifest = write_manifest(raw, progress=False)
    logger = RunLogger(tracking, "masksam")
    run_id = logger.start("train-fold0", {"step": "train"})
    logger.log_dataset(raw)
    logger.end()
    trained = tmp_path / "train"
    shutil.copytree(train_dir, trained)
    summary = json.loads((trained / "train_summary.json").read_text())
    (trained / "train_summary.json").write_text(json.dumps({**summary, "mlflow_run_id": run_id}))
    ev = eval_summary_for(export_dir, foreground_mean={"Dice": 0.5, "HD95": 4.0, "NSD": 0.6}, test_set_id="set-1")
    (tmp_path / "eval.json").write_text(json.dumps(ev))
    d = register(trained, export_dir, tmp_path / "eval.json", min_dice=0.0)
    client = MlflowClient()
    version = client.get_model_version("masksam", d.version)
    assert version.run_id == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    (logged,) = [m.model_id for m in run.outputs.model_outputs]  # "Logged models" of the run
    assert logged in version.source
    assert run.data.tags["mlflow.source.name"] == "masksam train"
    (dataset,) = [i.dataset for i in run.inputs.dataset_inputs]
    assert (dataset.name, dataset.digest) == ("Phantom", manifest["dataset_sha256"][:36])
    # the model card names the training data by the content hash preprocess recorded in the plan
    plan = json.loads((trained / "plan.json").read_text())
    assert version.tags["data.dataset_sha256"] == plan["dataset_sha256"]
    assert f"content hash `{plan['dataset_sha256'][:16]}`" in version.description


def test_register_refuses_a_score_of_another_model(tmp_path, train_dir, export_dir):  # noqa: F811
    """What is registered is what was evaluated: a summary that scored the PyTorch weights, another
    export, or nothing recorded, does not vouch for this ONNX file."""
    from masksam.components.register import register

    for scored in ({"model.safetensors": "a" * 64}, {"model.onnx": "b" * 64}, None):
        ev = eval_summary_for(export_dir, model="data/train")
        if scored is None:
            del ev["model_sha256"]
        else:
            ev["model_sha256"] = scored
        (tmp_path / "eval.json").write_text(json.dumps(ev))
        with pytest.raises(UserError, match="must be the one evaluated"):
            register(train_dir, export_dir, tmp_path / "eval.json")


def test_model_card_has_a_table_only_with_per_class_means():
    from masksam.components.register import model_card

    plan = {"labels": {"background": 0, "liver": 1}, "channel_names": {"0": "CT"}, "target_spacing_xyz": [1, 1, 2]}
    tags = {"data.dataset_sha256": "d" * 64, "test_set_id": "t" * 64, "train_run_id": "r", "onnx_sha256": "o" * 64}
    ev = {"n_cases": 2, "foreground_mean": {"Dice": 0.7, "HD95": 3.0, "NSD": 0.8},
          "mean": {"1": {"Dice": 0.7, "HD95": 3.0, "NSD": 0.8}}, "labels": {"1": "liver"}}
    card = model_card(plan, ev, tags, "r")
    assert "| liver | 0.700 | 3.000 | 0.800 |" in card and "content hash `dddddddddddddddd`" in card
    assert "\n\n**Lineage.**" in card  # a blank line ends the table before the next paragraph
    assert "| structure |" not in model_card(plan, {**ev, "mean": {}}, tags, "r")
