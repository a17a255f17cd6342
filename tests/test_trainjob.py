"""The Kubeflow Trainer TrainJob: rendering, schema validation, create-and-wait against a fake API."""

from __future__ import annotations

import json

import pytest
import yaml

from masksam.errors import UserError
from masksam.pipelines import trainjob


def _manifest(**kw):
    args = dict(name="masksam-train-abc", image="ghcr.io/masksam/masksam:0.1.0",
                command=trainjob.train_command("/mnt/masksam/run/params.yaml", "/mnt/masksam/run/pre",
                                               "/mnt/masksam/run/train"),
                num_nodes=2, gpus_per_node=4, namespace="team-a", pvc_name="masksam-ws",
                mlflow_secret="mlflow", mlflow_secret_keys=["MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_PASSWORD"])
    args.update(kw)
    return trainjob.render_trainjob(**args)


def test_rendered_manifest_has_the_trainer_v2_shape():
    m = _manifest()
    trainjob.validate_trainjob(m)
    # survives YAML/JSON round trips the way kubectl / the API would see it
    assert yaml.safe_load(yaml.safe_dump(m)) == json.loads(json.dumps(m))
    assert m["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and m["kind"] == "TrainJob"
    spec = m["spec"]
    assert spec["runtimeRef"] == {"name": "torch-distributed", "apiGroup": "trainer.kubeflow.org",
                                  "kind": "ClusterTrainingRuntime"}
    t = spec["trainer"]
    assert t["numNodes"] == 2 and isinstance(t["numNodes"], int)
    assert t["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 4
    assert t["image"] == "ghcr.io/masksam/masksam:0.1.0"
    assert t["command"][:4] == ["torchrun", "--module", "masksam", "train"]
    assert t["command"][t["command"].index("--preprocessed") + 1] == "/mnt/masksam/run/pre"
    assert {e["name"] for e in t["env"]} == {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_PASSWORD"}
    assert all(e["valueFrom"]["secretKeyRef"]["name"] == "mlflow" for e in t["env"])
    job = spec["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    pod = job["template"]["spec"]["template"]["spec"]
    assert job["name"] == "node" and pod["containers"][0]["name"] == "node"
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "masksam-ws"
    assert pod["containers"][0]["volumeMounts"][0]["mountPath"] == "/mnt/masksam"


def test_torchrun_command_parses_with_torchrun_itself():
    """torchrun's own parser accepts the command and sees `masksam` as the module to run."""
    from torch.distributed.run import get_args_parser

    cmd = _manifest()["spec"]["trainer"]["command"]
    args = get_args_parser().parse_args(cmd[1:])
    assert args.module and args.training_script == "masksam"
    assert args.training_script_args[:3] == ["train", "--params", "/mnt/masksam/run/params.yaml"]


@pytest.mark.parametrize("mutate, expected", [
    (lambda m: m["metadata"].update(name="Bad_Name"), "metadata/name"),
    (lambda m: m["metadata"].update(name="a" * 64), "metadata/name"),
    (lambda m: m["spec"]["trainer"].update(numNodes="2"), "spec/trainer/numNodes"),
    (lambda m: m["spec"]["trainer"].update(numNodes=0), "spec/trainer/numNodes"),
    (lambda m: m["spec"]["trainer"].pop("image"), "'image' is a required property"),
    (lambda m: m["spec"].pop("runtimeRef"), "'runtimeRef' is a required property"),
    (lambda m: m["spec"]["trainer"].update(numProcPerNode=4), "numProcPerNode"),
    (lambda m: m["spec"]["trainer"]["resourcesPerNode"]["limits"].update({"nvidia.com/gpu": "four"}), "nvidia.com~1gpu"),
    (lambda m: m.update(apiVersion="kubeflow.org/v1"), "apiVersion"),
    (lambda m: m["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
     ["template"]["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0].update(name="other"),
     "unknown volume 'other'"),
])
def test_validation_rejects_malformed_manifests(mutate, expected):
    m = _manifest()
    mutate(m)
    with pytest.raises(UserError) as err:
        trainjob.validate_trainjob(m)
    assert expected.replace("~1", "/") in str(err.value) or expected in str(err.value)


def test_render_refuses_zero_nodes():
    with pytest.raises(UserError, match="num_nodes"):
        _manifest(num_nodes=0)


class NotFound(Exception):
    """What kubernetes.client raises for a missing object (an ApiException with status 404)."""

    status = 404


class FakeCustomObjects:
    """Records create and delete calls; reports Running then the given final condition."""

    def __init__(self, final: str, reason: str = ""):
        self.final, self.reason, self.created, self.deleted, self.polls = final, reason, [], [], 0
        self.objects: dict[str, dict] = {}

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.created.append((group, version, namespace, plural, body))
        self.objects[body["metadata"]["name"]] = body
        return body

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.deleted.append(name)
        del self.objects[name]

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        if name not in self.objects:
            raise NotFound(name)
        body = self.objects[name]
        if "status" in body:  # an object that was there before this launcher ran
            return body
        self.polls += 1
        if self.polls < 3:
            return {**body, "status": {"conditions": [{"type": "Suspended", "status": "False"}]}}
        return {**body, "status": {"conditions": [
            {"type": self.final, "status": "True", "reason": self.reason, "message": "done"}]}}


def _left_behind(api: FakeCustomObjects, condition: str | None) -> None:
    """A TrainJob of _manifest()'s name that an earlier launcher created: running (None), failed or done."""
    body = _manifest()
    if condition is None:
        api.objects[body["metadata"]["name"]] = body  # no status yet: running, then completes
    else:
        api.objects[body["metadata"]["name"]] = {**body, "status": {"conditions": [
            {"type": condition, "status": "True", "reason": "Before", "message": ""}]}}


def test_a_running_job_is_waited_on_not_started_twice():
    api = FakeCustomObjects("Complete")
    _left_behind(api, None)
    obj = trainjob.create_and_wait(_manifest(), api=api, poll_s=1, sleep=lambda s: None)
    assert trainjob.trainjob_state(obj)[0] == "Complete"
    assert api.created == [] and api.deleted == []


@pytest.mark.parametrize("condition, reuse, replaced", [
    ("Failed", False, True), ("Failed", True, True),       # a failed job runs again (it resumes)
    ("Complete", True, False),                             # its output is still there: reused
    ("Complete", False, True),                             # its output is gone: trained again
])
def test_a_job_left_by_an_earlier_launcher(condition, reuse, replaced):
    api = FakeCustomObjects("Complete")
    _left_behind(api, condition)
    obj = trainjob.create_and_wait(_manifest(), api=api, poll_s=1, sleep=lambda s: None, reuse_complete=reuse)
    assert trainjob.trainjob_state(obj)[0] == "Complete"
    assert (api.deleted == ["masksam-train-abc"]) is replaced and (len(api.created) == 1) is replaced


def test_create_and_wait_until_complete():
    api = FakeCustomObjects("Complete")
    obj = trainjob.create_and_wait(_manifest(), api=api, poll_s=1, sleep=lambda s: None)
    group, version, ns, plural, body = api.created[0]
    assert (group, version, ns, plural) == ("trainer.kubeflow.org", "v1alpha1", "team-a", "trainjobs")
    assert api.polls == 3 and trainjob.trainjob_state(obj)[0] == "Complete"


def test_create_and_wait_reports_failure_reason():
    api = FakeCustomObjects("Failed", reason="DeadlineExceeded")
    with pytest.raises(RuntimeError, match="DeadlineExceeded"):
        trainjob.create_and_wait(_manifest(), api=api, poll_s=1, sleep=lambda s: None)


def test_create_and_wait_times_out():
    api = FakeCustomObjects("Complete")
    api.polls = -100
    with pytest.raises(RuntimeError, match="not complete"):
        trainjob.create_and_wait(_manifest(), api=api, timeout_s=5, poll_s=1, sleep=lambda s: None)


def test_invalid_manifest_is_never_sent():
    api = FakeCustomObjects("Complete")
    m = _manifest()
    m["spec"]["trainer"]["numNodes"] = -1
    with pytest.raises(UserError):
        trainjob.create_and_wait(m, api=api, sleep=lambda s: None)
    assert api.created == []


def _preprocessed_and_volume(tmp_path):
    """A minimal preprocessed folder and an empty folder standing for the shared claim."""
    data = tmp_path / "pre"
    (data / "cases").mkdir(parents=True)
    (data / "plan.json").write_text("{}")
    workspace = tmp_path / "pvc"
    workspace.mkdir()
    return data, workspace


def test_trainjob_step_stages_data_and_collects_the_model(tmp_path):
    """The launcher: data copied to the shared volume, job created, checkpoint copied back."""
    data, workspace = _preprocessed_and_volume(tmp_path)

    class Api(FakeCustomObjects):
        def create_namespaced_custom_object(self, group, version, namespace, plural, body):
            cmd = body["spec"]["trainer"]["command"]
            out = tmp_path / cmd[cmd.index("--out") + 1]
            assert (tmp_path / cmd[cmd.index("--preprocessed") + 1] / "plan.json").is_file()
            assert "train:" in (tmp_path / cmd[cmd.index("--params") + 1]).read_text()
            out.mkdir(parents=True)   # what the TrainJob nodes would write
            (out / "train_summary.json").write_text(json.dumps({"best_val_dice": 0.5, "steps": 3}))
            return super().create_namespaced_custom_object(group, version, namespace, plural, body)

    api = Api("Complete")
    summary = trainjob.run_trainjob_step(
        data_dir=str(data), model_dir=str(tmp_path / "model"), params_json="train: {steps: 3}\n",
        overrides='{"train.steps": 3}', image="img:1", num_nodes=2, gpus_per_node=8, pvc_name="ws",
        runtime="torch-distributed", mlflow_secret="", mlflow_secret_keys="MLFLOW_TRACKING_URI",
        report_path=str(tmp_path / "report.html"), workspace=str(workspace), api=api, poll_s=1,
        sleep=lambda s: None,
    )
    assert summary["best_val_dice"] == 0.5 and summary["trainjob"].startswith("masksam-train-")
    assert (tmp_path / "model" / "train_summary.json").is_file()
    assert "best_val_dice" in (tmp_path / "report.html").read_text()
    assert list(workspace.iterdir()) == []   # staging removed
    body = api.created[0][4]
    assert body["spec"]["trainer"]["numNodes"] == 2 and "env" not in body["spec"]["trainer"]
    assert "--resume-if-present" in body["spec"]["trainer"]["command"]  # a restarted node resumes


def test_a_restarted_launcher_finds_its_job_data_and_checkpoints_again(tmp_path):
    """The launcher pod dies while its TrainJob trains; the retried task computes the same
    training key, keeps the staged data, waits on the same job and collects its output (the
    resume-only checkpoints stay on the volume's copy, not in the Model artifact)."""
    data, workspace = _preprocessed_and_volume(tmp_path)

    class Api(FakeCustomObjects):
        def create_namespaced_custom_object(self, group, version, namespace, plural, body):
            cmd = body["spec"]["trainer"]["command"]
            out = tmp_path / cmd[cmd.index("--out") + 1]
            out.mkdir(parents=True)
            (out / "train_summary.json").write_text(json.dumps({"steps": 3}))
            (out / "checkpoint_last.pt").write_bytes(b"state")
            return super().create_namespaced_custom_object(group, version, namespace, plural, body)

    def killed(_s):
        raise KeyboardInterrupt("launcher pod evicted")

    api = Api("Complete")
    step = dict(data_dir=str(data), model_dir=str(tmp_path / "model"), params_json="train: {steps: 3}\n",
                overrides="{}", image="img:1", num_nodes=2, gpus_per_node=8, pvc_name="ws",
                runtime="torch-distributed", mlflow_secret="", mlflow_secret_keys="MLFLOW_TRACKING_URI",
                report_path=str(tmp_path / "report.html"), workspace=str(workspace), api=api, poll_s=1)
    with pytest.raises(KeyboardInterrupt):
        trainjob.run_trainjob_step(**step, sleep=killed)
    (staged,) = workspace.iterdir()
    assert (staged / "preprocessed" / "plan.json").is_file() and len(api.created) == 1
    summary = trainjob.run_trainjob_step(**step, sleep=lambda s: None)
    assert len(api.created) == 1 and api.deleted == []  # the same job, waited on
    assert summary["trainjob"] == api.created[0][4]["metadata"]["name"] == f"masksam-train-{staged.name[8:]}"
    assert not (tmp_path / "model" / "checkpoint_last.pt").exists()
    assert list(workspace.iterdir()) == []
