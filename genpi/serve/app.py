"""The one builder of the serving application, for ``genpi serve``, ``serve run``, ``serve deploy``
and a KubeRay ``RayService`` alike::

    serve run genpi.serve:build_app store.url=s3://bucket/artifacts prompts=prompts/

Arguments are config flags without the dashes (``serve.max_adapters=4``), plus ``prompts``
(a prompt folder: prompts served in prompt mode until their adapters are published), ``config``
(a YAML file) and ``profile``.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from genpi.config import GenPIConfig, load_config
from genpi.engines.environments import serve_backend
from genpi.prompt.files import load_prompts
from genpi.prompt.spec import PromptSpec
from genpi.serve.deployment import ModelServer
from genpi.serve.openai import OpenAIServer
from genpi.serve.vllm_deployment import VLLMModelServer

MODEL_DEPLOYMENT = "ModelServer"  # the model replicas' deployment name, whichever backend


def application(cfg: GenPIConfig, specs: list[PromptSpec]) -> Application:
    """The API ingress bound to the model replicas (``serve.backend``'s engine), configured by ``cfg``."""
    settings: dict[str, Any] = {"config": cfg.to_dict(), "prompts": [s.to_json() for s in specs]}
    s = cfg.serve
    backend, runtime_env = serve_backend(cfg)
    options: dict[str, Any] = {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus}
    model = (
        (VLLMModelServer if backend == "vllm" else ModelServer)
        .options(  # type: ignore[attr-defined]
            name=MODEL_DEPLOYMENT,
            num_replicas=s.replicas,
            max_ongoing_requests=max(64, 4 * cfg.models.target.batch_size),
            ray_actor_options={**options, "runtime_env": runtime_env} if runtime_env else options,
        )
        .bind(settings)
    )
    return OpenAIServer.bind(model, settings)  # type: ignore[attr-defined]


def build_app(args: dict[str, str]) -> Application:
    """Ray Serve's application builder (``import_path: genpi.serve:build_app``, ``args:`` as above)."""
    args = {k.lstrip("-").replace("-", "_"): v for k, v in args.items()}  # also keys written as flags
    prompts, config, profile = args.pop("prompts", ""), args.pop("config", None), args.pop("profile", "local")
    cfg = load_config(profile, config, args)
    return application(cfg, load_prompts(prompts) if prompts else [])
