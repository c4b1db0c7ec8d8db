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
