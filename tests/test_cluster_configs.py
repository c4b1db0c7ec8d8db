"""The cluster configs users launch from: checked by Ray's own schema and by YAML parsing."""

from __future__ import annotations

import pytest
import yaml

from tests.repo import ROOT


def test_ray_cluster_yaml_passes_rays_schema() -> None:
    pytest.importorskip("jsonschema", reason="Ray's cluster-config check needs jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    # What `ray up` does before it launches anything: fill in Ray's defaults, then check the schema.
    validate_config(prepare_config(yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())))


def test_kuberay_manifests_parse_and_run_the_job_entry_point() -> None:
    for path in sorted((ROOT / "cluster").glob("kuberay-*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        assert docs and all("kind" in d and "apiVersion" in d for d in docs), path
    job = yaml.safe_load((ROOT / "cluster" / "kuberay-rayjob.yaml").read_text())
    assert "jobs/internalize.py" in job["spec"]["entrypoint"]


def test_kuberay_rayservice_builds_the_server_from_its_import_path_and_args(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from ray.serve import Application

    from genpi.serve import app

    service = yaml.safe_load((ROOT / "cluster" / "kuberay-rayservice.yaml").read_text())
    assert service["kind"] == "RayService"
    (application,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    module, _, name = application["import_path"].partition(":")
    build = getattr(importlib.import_module(module), name)
    assert build is app.build_app
    args = dict(application["args"])
    assert args["prompts"] == "/home/ray/genpi/prompts"  # where cluster/Dockerfile puts them
    args["prompts"] = str(ROOT / "prompts")
    built: dict = {}
    real = app.application
    monkeypatch.setattr(app, "application", lambda cfg, specs: built.update(cfg=cfg, specs=specs) or real(cfg, specs))
    assert isinstance(build(args), Application)  # every arg is a real flag, with a valid value
    cfg = built["cfg"]
    assert cfg.store.url == application["args"]["store.url"] and (cfg.serve.replicas, cfg.serve.num_gpus) == (2, 1.0)
    assert sorted(s.name for s in built["specs"]) == ["shell-agent", "support-agent", "web-shop-agent"]
    (workers,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]  # room for every replica's GPU
    gpus = int(workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus * workers["maxReplicas"] >= cfg.serve.replicas * cfg.serve.num_gpus
