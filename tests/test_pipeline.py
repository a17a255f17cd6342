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
from masksam.pipelines.pipeline import AcceleratorOptions, CheckpointOptions, TrainJobOptions, compile_pipeline

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "registry.example/masksam:1.2.3"
PARAMS = "data: {cases: 24, size: [160, 160, 40]}\ntrain: {steps: 400}\nregister: {alias: champion}\n"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    d = tmp_path_factory.mktemp("compiled")
    (d / "params.yaml").write_text(PARAMS)
    plain = compile_pipeline(d / "p.yaml", image=IMAGE, params_path=d / "params.yaml",
                             mlflow_secret="mlflow-creds", mlflow_secret_keys=["MLFLOW_TRACKING_URI", "AWS_ACCESS_KEY_ID"],
                             accelerators=AcceleratorOptions(counts={"train": 2, "evaluate": 1, "export": 0}))
    tj = compile_pipeline(d / "tj.yaml", image=IMAGE, params_path=d / "params.yaml",
                          trainjob=TrainJobOptions(pvc_name="masksam-ws"),
                          checkpoints=CheckpointOptions(pvc_name="ckpt"))
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


CLI_STEPS = ("resolve", "data", "validate-data", "preprocess", "train", "export", "evaluate", "register")


def test_cli_steps_are_container_components_running_the_masksam_cli(compiled):
    """Each step is `masksam pipeline task STEP --NAME VALUE ...` in the image: no Python source,
    nothing pip-installed; artifacts as paths, parameters as values, the executor output file."""
    spec, _ = compiled
    executors = spec["deploymentSpec"]["executors"]
    for name in CLI_STEPS:
        c = executors[f"exec-{name}"]["container"]
        assert c["image"] == IMAGE, name
        assert c["command"] == ["masksam", "pipeline", "task", name.replace("-", "_")], name
        joined = " ".join(c["command"] + c["args"])
        assert "pip install" not in joined and "executor_main" not in joined and "def " not in joined, name
        args = c["args"]
        assert args[-2:] == ["--executor-output", "{{$.outputs.output_file}}"], name
        assert all(a.startswith("--") for a in args[::2]), name
    train = dict(zip(*[iter(executors["exec-train"]["container"]["args"])] * 2))
    assert train["--data"] == "{{$.inputs.artifacts['data'].path}}"
    assert train["--params"] == "{{$.inputs.parameters['params']}}"
    assert train["--checkpoint-root"] == "{{$.inputs.parameters['checkpoint_root']}}"
    assert train["--model"] == "{{$.outputs.artifacts['model'].path}}"
    resolve = dict(zip(*[iter(executors["exec-resolve"]["container"]["args"])] * 2))
    assert resolve["--params"] == "{{$.outputs.parameters['params'].output_file}}"
    assert resolve["--train-steps"] == "{{$.inputs.parameters['train_steps']}}"


def test_the_container_command_line_parses_back_to_the_step_inputs():
    """What the container runs is what the step takes: every --NAME of the compiled command is
    an input of the step function behind `masksam pipeline task`."""
    import inspect

    from masksam.pipelines import components as comps
    from masksam.pipelines import tasks

    built = comps.make_components(IMAGE, "container")
    for name, func in tasks.TASKS.items():
        flags = getattr(built, name).component_spec.implementation.container.args[::2]
        values, executor_output = tasks.parse_task_args(sum(([flag, "v"] for flag in flags), []))
        assert executor_output == "v" and set(values) == set(inspect.signature(func).parameters), name


def test_requests_limits_accelerators_and_shm(compiled):
    spec, k8s_spec = compiled
    executors = spec["deploymentSpec"]["executors"]
    for name in CLI_STEPS:
        r = executors[f"exec-{name}"]["container"]["resources"]
        assert 0 < r["cpuRequest"] <= r["cpuLimit"] and 0 < r["memoryRequest"] <= r["memoryLimit"], name
    acc = {n: executors[f"exec-{n}"]["container"]["resources"].get("accelerator") for n in CLI_STEPS}
    assert acc["train"]["resourceType"] == "{{$.inputs.parameters['pipelinechannel--accelerator_type']}}"
    assert acc["train"]["resourceCount"] == "{{$.inputs.parameters['pipelinechannel--accelerator_count']}}"
    assert acc["evaluate"]["resourceCount"] == "1"
    assert acc["evaluate"]["resourceType"] == "{{$.inputs.parameters['pipelinechannel--accelerator_type']}}"
    assert all(acc[n] is None for n in ("export", "data", "preprocess", "register", "resolve"))
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["accelerator_type"]["defaultValue"] == "nvidia.com/gpu"
    assert params["accelerator_count"]["defaultValue"] == 2
    k8s = spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train"]
    assert k8s["emptyDirMounts"] == [{"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "16Gi",
                                      "volumeName": "dshm"}]


def test_typed_parameters_beside_the_free_form_ones(compiled):
    spec, _ = compiled
    params = spec["root"]["inputDefinitions"]["parameters"]
    types = {name: p["parameterType"] for name, p in params.items()}
    assert types["train_steps"] == "NUMBER_INTEGER" and params["train_steps"]["defaultValue"] == 0
    assert types["train_lr"] == "NUMBER_DOUBLE" and types["model_variant"] == "STRING"
    assert types["accelerator_count"] == "NUMBER_INTEGER"
    assert {"data_repo_url", "data_rev", "data_path", "overrides", "params_json"} <= set(params)
    assert json.loads(params["params_json"]["defaultValue"]) == yaml.safe_load(PARAMS)
    resolve = _tasks(spec)["resolve"]["inputs"]["parameters"]
    for name in ("train_steps", "train_lr", "model_variant", "params_json", "overrides", "data_repo_url"):
        assert resolve[name]["componentInputParameter"] == name


def test_typed_parameters_then_overrides_make_the_effective_params():
    typed = {"train.steps": 7, "train.lr": 0.0, "model.variant": "vit_b"}
    effective, spec = steps.resolve_inputs(PARAMS, json.dumps({"model.variant": "tiny"}), typed, "", "", "data/raw")
    params = json.loads(effective)
    assert params["train"]["steps"] == 7 and "lr" not in params["train"]   # 0.0: params.yaml's value
    assert params["model"]["variant"] == "tiny"                          # overrides apply last
    data_spec = json.loads(spec)
    assert data_spec["source"] == "phantom" and data_spec["data"]["cases"] == 24
    with pytest.raises(UserError, match="train.steps must be"):
        steps.resolve_inputs(PARAMS, "{}", {"train.steps": "many"}, "", "", "data/raw")


def test_caching_is_keyed_on_what_defines_each_step(compiled):
    """resolve (uncached) names the data; the data step is cached on that alone, so a rerun with
    unchanged inputs reuses every step up to register; register never caches."""
    spec, _ = compiled
    tasks = _tasks(spec)
    cached = {n: t.get("cachingOptions", {}).get("enableCache", False) for n, t in tasks.items()}
    assert not cached["resolve"] and not cached["register"] and not cached["createpvc"]
    assert all(cached[n] for n in ("data", "validate-data", "preprocess", "train", "export", "evaluate"))
    assert tasks["data"]["inputs"]["parameters"] == {
        "data_spec": {"taskOutputParameter": {"producerTask": "resolve", "outputParameterKey": "data_spec"}}}
    for name in ("preprocess", "train", "export", "evaluate", "register"):
        assert tasks[name]["inputs"]["parameters"]["params"] == {
            "taskOutputParameter": {"producerTask": "resolve", "outputParameterKey": "params"}}, name
    for name in ("resolve", "data", "validate-data"):
        assert tasks[name]["retryPolicy"]["maxRetryCount"] == 3, name
    for name in ("preprocess", "train", "evaluate", "export"):
        assert "retryPolicy" not in tasks[name]


def test_data_spec_names_only_the_data(tmp_path):
    """The phantom's spec changes with the data params only; a DVC spec holds the resolved commit."""
    base, spec = steps.resolve_inputs(PARAMS, "{}", {}, "", "", "data/raw")
    _, same = steps.resolve_inputs(PARAMS, json.dumps({"train.steps": 3, "data.out": "elsewhere"}), {}, "", "", "x")
    _, other = steps.resolve_inputs(PARAMS, json.dumps({"data.seed": 1}), {}, "", "", "data/raw")
    assert spec == same and spec != other
    assert json.loads(spec)["data"]["size"] == [160, 160, 40]


def test_dag_order_and_data_branches(compiled):
    spec, _ = compiled
    tasks = _tasks(spec)
    assert "resolve" in tasks["data"]["dependentTasks"]
    assert "validate-data" in tasks["preprocess"]["dependentTasks"]
    assert "preprocess" in tasks["train"]["dependentTasks"]
    assert set(tasks["register"]["dependentTasks"]) >= {"train", "export", "evaluate"}
    assert "data" in tasks["validate-data"]["dependentTasks"]
    assert tasks["resolve"]["inputs"]["parameters"]["data_repo_url"]["componentInputParameter"] == "data_repo_url"
    assert "register" in tasks["deletepvc"]["dependentTasks"]


def test_train_checkpoints_on_a_volume(compiled):
    """Single-node: a claim the run creates (deleted after register) mounted where train keeps
    its checkpoints; with --checkpoint-pvc the named claim instead."""
    spec, _ = compiled
    tasks = _tasks(spec)
    k8s = spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train"]
    (mount,) = k8s["pvcMount"]
    assert mount["mountPath"] == "/mnt/masksam-checkpoints"
    assert mount["pvcNameParameter"]["taskOutputParameter"] == {"outputParameterKey": "name", "producerTask": "createpvc"}
    root = tasks["train"]["inputs"]["parameters"]["checkpoint_root"]["runtimeValue"]["constant"]
    assert root == "/mnt/masksam-checkpoints"
    assert "createpvc" in tasks["train"]["dependentTasks"]
    assert tasks["deletepvc"]["inputs"]["parameters"]["pvc_name"]["taskOutputParameter"]["producerTask"] == "createpvc"


def test_evaluate_scores_the_export_with_the_run_parameters(compiled):
    """data -> ... -> train -> export -> evaluate(the ONNX folder) -> register; every step that
    runs a verb gets the effective params resolve made."""
    for spec in compiled:
        tasks = _tasks(spec)
        ev = tasks["evaluate"]
        assert "export" in ev["dependentTasks"]
        model = ev["inputs"]["artifacts"]["model"]["taskOutputArtifact"]
        assert model == {"producerTask": "export", "outputArtifactKey": "onnx_model"}
        for name in ("preprocess", "train" if "train" in tasks else "train-trainjob", "evaluate", "export",
                     "register"):
            params = tasks[name]["inputs"]["parameters"]
            assert params["params"]["taskOutputParameter"]["producerTask"] == "resolve", name


def test_data_step_refuses_a_real_source_without_a_repository(tmp_path):
    with pytest.raises(UserError, match="data.source is 'amos'.*data_repo_url.*data_path"):
        steps.resolve_inputs(PARAMS, json.dumps({"data.source": "amos"}), {}, "", "", "data/raw")


def test_compile_refuses_without_an_image(tmp_path, monkeypatch):
    from masksam.cli import main

    (tmp_path / "params.yaml").write_text(PARAMS)
    monkeypatch.delenv("MASKSAM_IMAGE", raising=False)
    args = ["pipeline", "compile", "--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "p.yaml")]
    assert main(args) == 2 and not (tmp_path / "p.yaml").exists()
    monkeypatch.setenv("MASKSAM_IMAGE", "registry.example/from-env:2")
    assert main(args) == 0
    assert "image: registry.example/from-env:2" in (tmp_path / "p.yaml").read_text()


def test_compile_cli_accelerator_and_checkpoint_options(tmp_path):
    from masksam.cli import main

    (tmp_path / "params.yaml").write_text(PARAMS)
    out = tmp_path / "p.yaml"
    assert main(["pipeline", "compile", "--params", str(tmp_path / "params.yaml"), "--image", IMAGE, "--out", str(out),
                 "--accelerator", "amd.com/gpu", "--gpus", "all=2", "--gpus", "train=4",
                 "--checkpoint-pvc", "my-ckpt"]) == 0
    spec, platform = list(yaml.safe_load_all(out.read_text()))
    executors = spec["deploymentSpec"]["executors"]
    assert spec["root"]["inputDefinitions"]["parameters"]["accelerator_count"]["defaultValue"] == 4
    assert spec["root"]["inputDefinitions"]["parameters"]["accelerator_type"]["defaultValue"] == "amd.com/gpu"
    for name in ("evaluate", "export"):
        assert executors[f"exec-{name}"]["container"]["resources"]["accelerator"]["resourceCount"] == "2"
    mount = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train"]["pvcMount"][0]
    assert mount["pvcNameParameter"]["runtimeValue"]["constant"] == "my-ckpt"
    assert "exec-createpvc" not in executors
    assert pcli.parse_gpus(["evaluate=1"]) == {"train": 1, "evaluate": 1, "export": 0}
    with pytest.raises(UserError, match="--gpus 'gpu=1'"):
        pcli.parse_gpus(["gpu=1"])


def test_run_local_help_example_is_the_tested_one(capsys):
    """The example `run-local --help` prints is RUN_LOCAL_EXAMPLE, which test_pipeline_local runs."""
    import shlex

    from masksam.cli import main

    with pytest.raises(SystemExit):
        main(["pipeline", "run-local", "--help"])
    text = capsys.readouterr().out
    example = text[text.index("masksam pipeline run-local --root"):].replace("\\\n", " ")
    argv = shlex.split(example)
    assert tuple(argv[3:]) == pcli.RUN_LOCAL_EXAMPLE
    assert "data.cases=4" not in text


def test_container_task_command_runs_the_steps_and_reports_to_kfp(tmp_path, capsys):
    """What a cluster pod runs: `masksam pipeline task STEP --NAME VALUE ... --executor-output F`.
    Output parameters land in their files, artifact metadata in an ExecutorOutput message that
    kfp's own schema parses; a failing step is one line and exit status 2."""
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    from masksam.cli import main

    out = tmp_path / "outputs"
    tiny = json.dumps({"data": {"cases": 2, "size": [24, 24, 8]}})
    resolve = ["pipeline", "task", "resolve", "--params-json", tiny, "--overrides", "{}", "--data-repo-url", "",
               "--data-rev", "", "--data-path", "data/raw", "--train-steps", "3", "--train-lr", "0.0",
               "--model-variant", "", "--params", str(out / "params"), "--data-spec", str(out / "spec"),
               "--executor-output", str(out / "resolve.json")]
    assert main(resolve) == 0
    assert json.loads((out / "params").read_text())["train"] == {"steps": 3}
    assert main(["pipeline", "task", "data", "--data-spec", (out / "spec").read_text(), "--dataset",
                 str(out / "raw"), "--executor-output", str(out / "data.json")]) == 0
    message = json_format.Parse((out / "data.json").read_text(), pipeline_spec_pb2.ExecutorOutput())
    meta = json_format.MessageToDict(message.artifacts["dataset"].artifacts[0].metadata)
    assert meta["source"] == "phantom" and len(meta["dataset_sha256"]) == 64 and meta["num_training"] == 2
    assert (out / "raw" / "dataset.json").is_file()
    capsys.readouterr()
    bad = [a if a != tiny else json.dumps({"data": {"source": "amos"}}) for a in resolve]
    assert main(bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.source is 'amos'" in err[0]
    assert main(["pipeline", "task", "resolve", "--train-steps"]) == 2


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

    assert parse_set_options(["train.steps=2", "data.size=[32, 32, 8]", "model.sam_weights=null"]) == {
        "train.steps": 2, "data.size": [32, 32, 8], "model.sam_weights": None}
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


def test_comparison_runs_beside_training_when_the_params_name_a_baseline(tmp_path):
    """compare.baselines: [nnunet] in the compiled params adds nnU-Net's baseline, which needs only
    the preprocessed split (so it runs in parallel with MaskSAM's training), and the paired
    comparison after MaskSAM's evaluation; without it neither task exists."""
    (tmp_path / "on.yaml").write_text(PARAMS + "compare: {baselines: [nnunet]}\n")
    (tmp_path / "off.yaml").write_text(PARAMS)
    on, off = (next(yaml.safe_load_all(compile_pipeline(tmp_path / f"{n}.pipeline.yaml", image=IMAGE,
                                                        params_path=tmp_path / f"{n}.yaml").read_text()))
               for n in ("on", "off"))
    assert not {"baseline", "compare"} & set(_tasks(off))
    tasks = _tasks(on)
    assert "train" not in tasks["baseline"].get("dependentTasks", [])
    assert tasks["baseline"]["inputs"]["artifacts"]["data"]["taskOutputArtifact"]["producerTask"] == "preprocess"
    cmp = tasks["compare"]["inputs"]["artifacts"]
    assert cmp["evaluation"]["taskOutputArtifact"]["producerTask"] == "evaluate"
    assert cmp["baseline"]["taskOutputArtifact"]["producerTask"] == "baseline"
    executor = on["deploymentSpec"]["executors"]["exec-baseline"]["container"]
    assert executor["command"] == ["masksam", "pipeline", "task", "baseline"] and executor["image"] == IMAGE
