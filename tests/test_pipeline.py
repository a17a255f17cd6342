"""The Kubeflow pipeline: compiled YAML, parameter handling, reports, DVC import, submit."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from masksam.errors import UserError
from masksam.pipelines import cli as pcli
from masksam.pipelines import reports, steps
from masksam.pipelines.pipeline import TrainJobOptions, compile_pipeline

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "registry.example/masksam:1.2.3"
PARAMS = "data: {cases: 24, size: [160, 160, 40]}\ntrain: {steps: 400}\nregister: {alias: champion}\n"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    d = tmp_path_factory.mktemp("compiled")
    (d / "params.yaml").write_text(PARAMS)
    plain = compile_pipeline(d / "p.yaml", image=IMAGE, params_path=d / "params.yaml",
                             mlflow_secret="mlflow-creds", mlflow_secret_keys=["MLFLOW_TRACKING_URI", "AWS_ACCESS_KEY_ID"])
    tj = compile_pipeline(d / "tj.yaml", image=IMAGE, params_path=d / "params.yaml",
                          trainjob=TrainJobOptions(pvc_name="masksam-ws"))
    docs = [list(yaml.safe_load_all(f.read_text())) for f in (plain, tj)]
    for d in docs:  # pipeline spec, then the kubernetes platform spec
        d[0]["platforms"] = d[1]["platforms"] if len(d) > 1 else {}
    return docs[0][0], docs[1][0]


def _tasks(spec):
    """Every task spec of the pipeline, sub-DAGs (the data branches) included, by name."""
    out = {}
    for comp in [spec["root"], *spec["components"].values()]:
        out.update(comp.get("dag", {}).get("tasks", {}))
    return out


def test_every_executor_uses_the_image_and_installs_nothing(compiled):
    spec, _ = compiled
    executors = spec["deploymentSpec"]["executors"]
    assert set(executors) >= {f"exec-{n}" for n in ("data", "validate-data", "preprocess",
                                                      "train", "evaluate", "export", "register")}
    for name, ex in executors.items():
        c = ex["container"]
        assert c["image"] == IMAGE, name
        joined = " ".join(c["command"] + c.get("args", []))
        assert "pip install" not in joined, name
        assert "kfp.dsl.executor_main" in joined, name


def test_train_asks_for_the_gpu_parameters_and_others_for_cpu(compiled):
    spec, _ = compiled
    executors = spec["deploymentSpec"]["executors"]
    res = executors["exec-train"]["container"]["resources"]
    assert res["accelerator"]["resourceType"] == "{{$.inputs.parameters['pipelinechannel--accelerator_type']}}"
    assert res["accelerator"]["resourceCount"] == "{{$.inputs.parameters['pipelinechannel--accelerator_count']}}"
    for name in ("exec-preprocess", "exec-evaluate", "exec-export", "exec-register", "exec-data"):
        r = executors[name]["container"]["resources"]
        assert r["cpuLimit"] > 0 and r["memoryLimit"] > 0 and "accelerator" not in r
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["accelerator_type"]["defaultValue"] == "nvidia.com/gpu"
    assert params["accelerator_count"]["defaultValue"] == 1
    assert json.loads(params["params_json"]["defaultValue"]) == yaml.safe_load(PARAMS)


def test_retries_and_caching(compiled):
    spec, _ = compiled
    tasks = _tasks(spec)
    for name in ("data", "validate-data"):
        assert tasks[name]["retryPolicy"]["maxRetryCount"] == 3, name
    for name in ("preprocess", "train", "evaluate", "export"):
        assert "retryPolicy" not in tasks[name]
    cached = {n: t.get("cachingOptions", {}).get("enableCache", False) for n, t in tasks.items()}
    assert cached["validate-data"] and cached["preprocess"] and cached["train"] and cached["evaluate"]
    assert not cached["register"] and not cached["data"]


def test_dag_order_and_data_branches(compiled):
    spec, _ = compiled
    tasks = _tasks(spec)
    assert "validate-data" in tasks["preprocess"]["dependentTasks"]
    assert "preprocess" in tasks["train"]["dependentTasks"]
    assert set(tasks["register"]["dependentTasks"]) >= {"train", "export", "evaluate"}
    assert "data" in tasks["validate-data"]["dependentTasks"]
    assert tasks["data"]["inputs"]["parameters"]["repo_url"]["componentInputParameter"] == "data_repo_url"


def test_evaluate_scores_the_export_with_the_run_parameters(compiled):
    """data -> ... -> train -> export -> evaluate(the ONNX folder) -> register; evaluate gets the
    params and the overrides like every step that runs a verb with --params."""
    for spec in compiled:
        tasks = _tasks(spec)
        ev = tasks["evaluate"]
        assert "export" in ev["dependentTasks"]
        model = ev["inputs"]["artifacts"]["model"]["taskOutputArtifact"]
        assert model == {"producerTask": "export", "outputArtifactKey": "onnx_model"}
        for name in ("preprocess", "train" if "train" in tasks else "train-trainjob", "evaluate", "export",
                     "register", "data"):
            params = tasks[name]["inputs"]["parameters"]
            assert params["overrides"]["componentInputParameter"] == "overrides", name
            assert params["params_json"]["componentInputParameter"] == "params_json", name


def test_data_step_refuses_a_real_source_without_a_repository(tmp_path):
    with pytest.raises(UserError, match="data.source is 'amos'.*data_repo_url.*data_path"):
        steps.phantom_data(str(tmp_path / "raw"), PARAMS, json.dumps({"data.source": "amos"}))
    assert not (tmp_path / "raw").exists()


def test_pipeline_compile_refuses_a_bad_params_file(tmp_path):
    from masksam.pipelines.pipeline import default_params_text

    (tmp_path / "params.yaml").write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(UserError, match="did you mean train.lr"):
        default_params_text(tmp_path / "params.yaml")


def test_mlflow_secret_on_the_mlflow_steps(compiled):
    spec, _ = compiled
    k8s = spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in ("exec-train", "exec-evaluate", "exec-export", "exec-register"):
        (secret,) = k8s[name]["secretAsEnv"]
        assert secret["secretName"] == "mlflow-creds"
        assert [e["envVar"] for e in secret["keyToEnv"]] == ["MLFLOW_TRACKING_URI", "AWS_ACCESS_KEY_ID"]
    assert "exec-data" not in k8s


def test_trainjob_variant_mounts_the_volume_and_asks_no_gpu(compiled):
    _, spec = compiled
    executors = spec["deploymentSpec"]["executors"]
    assert "exec-train" not in executors and "exec-train-trainjob" in executors
    assert "accelerator" not in executors["exec-train-trainjob"]["container"]["resources"]
    k8s = spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train-trainjob"]
    assert k8s["pvcMount"][0]["mountPath"] == "/mnt/masksam"
    assert json.dumps(k8s["pvcMount"][0]).count("masksam-ws") >= 1
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert {"num_nodes", "gpus_per_node"} <= set(params) and "accelerator_count" not in params


def test_compile_cli_requires_pvc_for_trainjob(tmp_path, capsys):
    from masksam.cli import main

    (tmp_path / "params.yaml").write_text(PARAMS)
    assert main(["pipeline", "compile", "--trainjob", "--params", str(tmp_path / "params.yaml"),
                 "--out", str(tmp_path / "p.yaml")]) == 2
    assert "--trainjob-pvc" in capsys.readouterr().err
    assert main(["pipeline", "compile", "--params", str(tmp_path / "params.yaml"), "--image", IMAGE,
                 "--out", str(tmp_path / "p.yaml")]) == 0
    assert IMAGE in (tmp_path / "p.yaml").read_text()
    assert main(["pipeline", "compile", "--params", str(tmp_path / "missing.yaml")]) == 2


# ---- parameters -----------------------------------------------------------------------------

def test_overrides_apply_and_refuse_unknown_sections(tmp_path):
    path = steps.write_params(PARAMS, json.dumps({"train.steps": 2, "data.size": [32, 32, 8]}), tmp_path)
    params = yaml.safe_load(path.read_text())
    assert params["train"]["steps"] == 2 and params["data"]["size"] == [32, 32, 8]
    assert params["data"]["cases"] == 24
    with pytest.raises(UserError, match="trian is not a params section; did you mean train"):
        steps.write_params(PARAMS, '{"trian.steps": 2}', tmp_path)
    with pytest.raises(UserError, match="train.steps must be an integer"):
        steps.write_params(PARAMS, '{"train.steps": "two"}', tmp_path)
    with pytest.raises(UserError, match="section.key"):
        steps.write_params(PARAMS, '{"steps": 2}', tmp_path)
    with pytest.raises(UserError, match="not valid JSON"):
        steps.write_params(PARAMS, "{train.steps: 2", tmp_path)


def test_set_options_parse_yaml_values():
    from masksam.components.params import parse_set_options

    assert parse_set_options(["train.steps=2", "data.size=[32, 32, 8]", "model.checkpoint=null"]) == {
        "train.steps": 2, "data.size": [32, 32, 8], "model.checkpoint": None}
    with pytest.raises(UserError):
        parse_set_options(["train.steps"])
    assert pcli.parse_params(["accelerator_count=4", "data_rev=v1.0", "data_repo_url="]) == {
        "accelerator_count": 4, "data_rev": "v1.0", "data_repo_url": ""}


def test_scalar_metrics_flatten_and_drop_non_numbers():
    data = {"a": 1, "b": {"c": 0.5, "d": "x", "e": None, "f": float("nan")}, "g": True}
    assert steps.scalar_metrics(data) == {"a": 1.0, "b.c": 0.5}


# ---- reports --------------------------------------------------------------------------------

def test_reports_embed_png_and_escape(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.bar(["liver", "spleen"], [0.9, 0.8])
    png = tmp_path / "dice.png"
    fig.savefig(png)
    page = reports.html_page("Eval <1>", [reports.html_table(["class", "Dice"], [["a<b", 0.91234]]),
                                          reports.html_image(png, "dice")])
    assert "a&lt;b" in page and "0.9123" in page and "Eval &lt;1&gt;" in page
    assert "data:image/png;base64,iVBORw0KGgo" in page
    with pytest.raises(ValueError):
        reports.png_data_uri(tmp_path / "x.txt") if (tmp_path / "x.txt").write_text("no") else None
    md = reports.markdown_table(["a", "b"], [["x|y", 1]])
    assert md.splitlines()[2] == "| x\\|y | 1 |"


# ---- DVC import -----------------------------------------------------------------------------

def _git(cwd, *args):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                   env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@x", "PATH": "/usr/bin:/bin", "HOME": str(cwd)})


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_fetch_dvc_dataset_from_a_git_repository(tmp_path):
    """A DVC-tracked raw dataset in a git repo with a local remote comes back byte-identical."""
    from dvc.repo import Repo

    repo = tmp_path / "repo"
    raw = repo / "data" / "raw"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1}}))
    (raw / "imagesTr" / "case_0000.nii.gz").write_bytes(b"\x1f\x8b" + bytes(range(200)))
    _git(repo, "init", "-q", "-b", "main")
    dvc = Repo.init(str(repo))
    with dvc.config.edit() as conf:
        conf["remote"]["store"] = {"url": str(tmp_path / "remote")}
        conf["core"]["remote"] = "store"
    dvc.add(str(raw))
    dvc.push()
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "dataset v1")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    shutil.rmtree(repo / ".dvc" / "cache")   # force the fetch through the remote

    out = tmp_path / "out"
    commit = steps.fetch_dvc_dataset(str(repo), "main", "data/raw", out)
    assert commit == head
    assert (out / "imagesTr" / "case_0000.nii.gz").read_bytes() == (raw / "imagesTr" / "case_0000.nii.gz").read_bytes()
    with pytest.raises(UserError, match="no path"):
        steps.fetch_dvc_dataset(str(repo), "main", "data/nothing", tmp_path / "out2")
    with pytest.raises(UserError, match="cannot open DVC repository"):
        steps.fetch_dvc_dataset(str(repo), "no-such-rev", "data/raw", tmp_path / "out3")


# ---- submit ---------------------------------------------------------------------------------

class FakeClient:
    """Stands in for kfp.Client: records what submit sends."""

    instances: list["FakeClient"] = []

    def __init__(self, host, namespace=None, final_state="SUCCEEDED"):
        self.host, self.namespace, self.calls = host, namespace, []
        self.final_state = final_state
        FakeClient.instances.append(self)

    def create_run_from_pipeline_package(self, package, arguments, run_name, experiment_name, namespace):
        self.calls.append(("create", package, arguments, run_name, experiment_name, namespace))
        return type("R", (), {"run_id": "run-123"})()

    def wait_for_run_completion(self, run_id, timeout):
        self.calls.append(("wait", run_id, timeout))
        return type("Run", (), {"state": self.final_state})()


def test_submit_assembles_the_run(compiled, tmp_path):
    package = tmp_path / "p.yaml"
    package.write_text(yaml.safe_dump({k: v for k, v in compiled[0].items() if k != "platforms"}))
    FakeClient.instances.clear()
    out = pcli.submit("http://kfp.example:8080/", package, {"accelerator_count": 2, "data_rev": "v1"},
                      experiment="exp", run_name="r1", wait=True, timeout_s=60, client_factory=FakeClient)
    client = FakeClient.instances[-1]
    assert client.host == "http://kfp.example:8080/"
    assert client.calls[0] == ("create", str(package), {"accelerator_count": 2, "data_rev": "v1"}, "r1", "exp", None)
    assert client.calls[1] == ("wait", "run-123", 60)
    assert out == {"run_id": "run-123", "url": "http://kfp.example:8080/#/runs/details/run-123", "state": "SUCCEEDED"}


def test_submit_refuses_unknown_parameters_and_failed_runs(compiled, tmp_path):
    package = tmp_path / "p.yaml"
    package.write_text(yaml.safe_dump({k: v for k, v in compiled[0].items() if k != "platforms"}))
    with pytest.raises(UserError, match="no parameter"):
        pcli.submit("http://x", package, {"num_gpus": 2}, client_factory=FakeClient)
    with pytest.raises(UserError, match="ended FAILED"):
        pcli.submit("http://x", package, {}, wait=True,
                    client_factory=lambda host: FakeClient(host, final_state="FAILED"))
    with pytest.raises(UserError, match="not found"):
        pcli.submit("http://x", tmp_path / "none.yaml", {}, client_factory=FakeClient)


def test_submit_to_an_unreachable_host_is_a_user_error(compiled, tmp_path):
    import socket

    package = tmp_path / "p.yaml"
    package.write_text(yaml.safe_dump({k: v for k, v in compiled[0].items() if k != "platforms"}))
    with socket.socket() as s:   # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(UserError, match=f"cannot reach Kubeflow Pipelines at http://127.0.0.1:{port}"):
        pcli.submit(f"http://127.0.0.1:{port}", package, {})
    assert time.monotonic() - t0 < 60


def test_run_verb_works_inside_a_kfp_task_environment(tmp_path, monkeypatch):
    """KFP tasks export _KFP_RUNTIME=true; the verb must still run (it once died on a kfp import)."""
    monkeypatch.setenv("_KFP_RUNTIME", "true")
    (tmp_path / "a.txt").write_text("x")
    printed = steps.run_verb(["data", "manifest", tmp_path, "--no-progress"])
    assert "dataset sha256" in printed
    assert json.loads((tmp_path / "manifest.json").read_text())["num_files"] == 1
    with pytest.raises(RuntimeError, match="exit status 2"):
        steps.run_verb(["data", "manifest", tmp_path / "missing", "--no-progress"])
