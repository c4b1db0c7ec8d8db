"""An engine actor killed mid-synthesis is restarted, its calls retried, and every prompt finishes."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from genpi import artifacts, ray_runtime, reaper
from genpi.config import RayConfig, load_config
from genpi.errors import EngineError
from genpi.prompt.files import load_prompts
from genpi.store import open_store
from tests.repo import ROOT

TINY = {
    "models.generator.name": "tiny-random-llama",
    "models.target.name": "tiny-random-llama",
    "models.generator.backend": "hf",
    "models.target.backend": "hf",
    "synth.num_inputs": 6,
    "synth.min_inputs": 4,
    "synth.part_size": 4,
    "synth.max_turns": 2,
    "synth.input_max_tokens": 48,
    "synth.output_max_tokens": 12,
    "synth.reason_max_tokens": 12,
    "synth.agent_max_tokens": 12,
    "synth.env_max_tokens": 12,
    "synth.filter_off_format": False,
}


def engine_pids() -> set[int]:
    """Engine actors of this test's own cluster (its driver marks their environment), never another's.
    Ray titles an actor's process ``ray::<class>[.<method>]``."""
    ours = set(reaper.marked_pids(os.environ[reaper.MARKER_VAR], skip=set()))
    pids = set()
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if proc.pid in ours and cmdline and cmdline[0].startswith("ray::EngineActor"):
            pids.add(proc.pid)
    return pids


@pytest.fixture
def ray_cluster():
    ray_runtime.connect(RayConfig(num_cpus=2, dashboard=False))
    yield
    ray_runtime.disconnect()


@pytest.mark.slow  # ~2 min on 2 cores: make test-cluster
@pytest.mark.timeout(300)
def test_engine_killed_mid_synthesis_every_prompt_still_finishes(tmp_path: Path, ray_cluster: None) -> None:
    from genpi.batch.graph import synthesize_all

    cfg = load_config("local", overrides={**TINY, "store.url": str(tmp_path / "store")})
    store = open_store(cfg.store.url)
    specs = load_prompts(ROOT / "prompts")
    seen: dict[str, object] = {}

    def kill_once_the_first_inputs_are_stored() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and "killed" not in seen:
            started = any("/inputs/" in key for key in store.list_keys("prompts"))
            pids = engine_pids()
            if started and pids:
                seen["killed"] = pid = min(pids)
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)
        while time.monotonic() < deadline and "restarted" not in seen:
            if engine_pids() - {seen.get("killed")}:
                seen["restarted"] = True
            time.sleep(0.05)

    killer = threading.Thread(target=kill_once_the_first_inputs_are_stored, daemon=True)
    killer.start()
    failures = synthesize_all(specs, cfg, store)
    killer.join(timeout=10)

    assert "killed" in seen and seen.get("restarted"), "the engine actor was never killed and restarted"
    assert failures == {}
    for spec in specs:
        prefix = artifacts.synth_prefix(spec, cfg)
        assert store.is_done(prefix), spec.name
        assert len(store.get_jsonl(f"{prefix}/records.jsonl")) >= 4


@pytest.mark.timeout(120)
def test_an_engine_out_of_restarts_is_one_clear_error(ray_cluster: None) -> None:
    from genpi.config import ModelConfig
    from genpi.engines.actors import EnginePool
    from genpi.engines.base import SamplingParams

    pool = EnginePool(ModelConfig(name="tiny-random-llama", num_gpus=0, num_cpus=1, restarts=0), "target")
    try:
        os.kill(pool.pids()[0], signal.SIGKILL)
        with pytest.raises(EngineError, match=r"target engine .* died and was restarted 0 times"):
            pool.generate([[{"role": "user", "content": "hi"}]], SamplingParams(max_new_tokens=4))
    finally:
        pool.shutdown()


@pytest.mark.timeout(120)
def test_an_engine_that_cannot_load_its_model_says_why(ray_cluster: None, tmp_path: Path) -> None:
    from genpi.config import ModelConfig
    from genpi.engines.actors import EnginePool
    from genpi.errors import ModelError

    with pytest.raises(ModelError, match=r"target engine .* could not start: .*has no config.json"):
        EnginePool(ModelConfig(name=str(tmp_path), num_gpus=0, num_cpus=1), "target")


@pytest.mark.timeout(180)
def test_a_hung_engine_is_killed_restarted_and_its_call_retried(ray_cluster: None) -> None:
    """A replica that stops answering (here: SIGSTOP) is treated like a dead one."""
    from genpi.config import ModelConfig
    from genpi.engines.actors import EnginePool
    from genpi.engines.base import SamplingParams

    pool = EnginePool(
        ModelConfig(name="tiny-random-llama", num_gpus=0, num_cpus=1, restarts=1, call_timeout_s=20), "target"
    )
    try:
        frozen = pool.pids()[0]
        os.kill(frozen, signal.SIGSTOP)
        [reply] = pool.generate([[{"role": "user", "content": "hi"}]], SamplingParams(max_new_tokens=4))
        assert reply.finish_reason in ("stop", "length") and pool.pids()[0] != frozen
        os.kill(pool.pids()[0], signal.SIGSTOP)  # out of restarts now: one clear line
        with pytest.raises(EngineError, match=r"stopped answering: it gave no answer within 20 s .* out of restarts"):
            pool.generate([[{"role": "user", "content": "hi"}]], SamplingParams(max_new_tokens=4))
    finally:
        pool.shutdown()
