"""masksam deploy: the KServe InferenceService validates against KServe's own CRD schema."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from masksam.cli import main
from masksam.components.deploy import inference_service
from masksam.errors import UserError

SCHEMA = Path(__file__).parent / "fixtures" / "kserve" / "inferenceservice_v1beta1_schema.json"


def _crd() -> dict:
    return json.loads(SCHEMA.read_text())


def _undeclared(value, schema: dict, where: str = "") -> list[str]:
    """Keys the schema does not declare (the API server's strict field validation drops or refuses
    them): a misspelt field would otherwise pass a plain schema check silently."""
    if isinstance(value, dict):
        props = schema.get("properties")
        if props is None:  # a free-form map (labels, annotations, resources)
            return []
        out = []
        for key, sub in value.items():
            if key not in props:
                out.append(f"{where}.{key}")
            else:
                out += _undeclared(sub, props[key], f"{where}.{key}")
        return out
    if isinstance(value, list) and "items" in schema:
        return [bad for i, item in enumerate(value) for bad in _undeclared(item, schema["items"], f"{where}[{i}]")]
    return []


@pytest.mark.parametrize("gpus", [0, 1])
def test_manifest_validates_against_kserve_crd(gpus):
    crd = _crd()
    manifest = inference_service("models:/masksam@champion", "registry.example.org/masksam:0.1.0",
                                 namespace="radiology", tracking_uri="http://mlflow.mlops:5000", gpus=gpus,
                                 max_voxels=200_000_000)
    assert manifest["apiVersion"] == f"{crd['group']}/{crd['version']}"
    assert manifest["kind"] == crd["kind"]
    jsonschema.validate(manifest, crd["schema"])
    assert _undeclared(manifest, crd["schema"]) == []
    container = manifest["spec"]["predictor"]["containers"][0]
    assert container["args"][:2] == ["--model", "models:/masksam@champion"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.mlops:5000"
    assert env["MASKSAM_DEVICE"] == ("cuda" if gpus else "cpu")
    assert container["resources"]["requests"] == container["resources"]["limits"]
    assert ("nvidia.com/gpu" in container["resources"]["limits"]) == bool(gpus)


def test_schema_check_catches_a_wrong_manifest():
    """The check is not vacuous: a misspelt field and a wrong type are both caught."""
    crd = _crd()
    manifest = inference_service("models:/masksam/3", "img:1")
    manifest["spec"]["predictor"]["containers"][0]["readinesProbe"] = {}
    assert _undeclared(manifest, crd["schema"]) == [".spec.predictor.containers[0].readinesProbe"]
    manifest = inference_service("models:/masksam/3", "img:1")
    manifest["spec"]["predictor"]["minReplicas"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(manifest, crd["schema"])


@pytest.mark.parametrize("kwargs, match", [
    ({"model_uri": "runs:/abc/model"}, "registered model"),
    ({"image": ""}, "--image"),
    ({"name": "MaskSAM"}, "--name"),
    ({"memory": "16 GB"}, "--memory"),
    ({"gpus": -1}, "--gpus"),
])
def test_bad_options_are_refused_by_name(kwargs, match):
    args = {"model_uri": "models:/masksam@champion", "image": "img:1", **kwargs}
    with pytest.raises(UserError, match=match):
        inference_service(args.pop("model_uri"), args.pop("image"), **args)


def test_cli_writes_the_manifest(tmp_path, capsys):
    out = tmp_path / "isvc.yaml"
    assert main(["deploy", "-m", "models:/masksam@champion", "--image", "img:1", "-o", str(out),
                 "--tracking-uri", "http://mlflow:5000", "--gpus", "1"]) == 0
    manifest = yaml.safe_load(out.read_text())
    jsonschema.validate(manifest, _crd()["schema"])
    assert "kubectl apply -f" in capsys.readouterr().out
