"""``genpi run [flags]`` (or bare ``genpi [flags]``): internalize a folder of prompts on Ray.

Bad input ends with one line naming the input and the fix (exit 2); a prompt that fails mid-run
is reported while the others finish (exit 1); finished work stays in the store and a rerun
resumes it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import yaml

from genpi.cli.config_flags import add_flags, resolve
from genpi.cli.parser import Parser
from genpi.cli.signals import on_sigterm_unwind
from genpi.config import PROFILES, GenPIConfig
from genpi.devices import slow_bf16_warning
from genpi.errors import GenPIError

log = logging.getLogger("genpi")

HELP = "internalize every prompt of a folder into a LoRA adapter (the job; bare `genpi` runs it)"
DESCRIPTION = """\
Internalize long, fixed LLM prompts into per-prompt LoRA adapters (Generative Prompt
Internalization). For every prompt in --prompts: synthesize pseudo inputs, student and
teacher outputs, reasons and role-played conversations; train one LoRA adapter with the
joint loss (1 - lambda) * SFT + lambda * Prompt Generation; evaluate it without the prompt
against the teacher (with the prompt) and the base model on held-out inputs; publish it
when it passes the fidelity gate. Runs on Ray: joins RAY_ADDRESS (as under `ray job submit`)
or starts a local cluster on 127.0.0.1."""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("genpi")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "(not installed)"


def build_parser(prog: str = "genpi") -> argparse.ArgumentParser:
    parser = Parser(prog=prog, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument(
        "--prompts",
        default="prompts",
        metavar="DIR",
        help="folder of prompt files, one prompt per file (default: prompts)",
    )
    parser.add_argument(
        "--only", action="append", default=[], metavar="NAME", help="run only the prompt with this name (repeatable)"
    )
    parser.add_argument(
        "--profile",
        default="auto",
        choices=("auto", *PROFILES),
        help="settings to start from: paper = the paper's settings for a GPU cluster, local = "
        "sized for 2 CPU cores, auto = paper when the Ray cluster has GPUs, else local "
        "(default: auto)",
    )
    parser.add_argument(
        "--real-inputs",
        "--eval-inputs",
        dest="real_inputs",
        metavar="DIR",
        help="folder of real (hand-written) inputs to evaluate each adapter on as well: one "
        '<prompt name>.jsonl per prompt, one {"input": ...} object per line',
    )
    parser.add_argument(
        "--force",
        action="append",
        default=[],
        choices=("synth", "train", "eval"),
        metavar="STAGE",
        help="redo STAGE (synth, train or eval) and the stages after it for the selected prompts "
        "instead of reusing what the store holds (repeatable)",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and exit without running"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log genpi's debug detail (never a library's)")
    add_flags(parser)
    return parser


def _config(args: argparse.Namespace, profile: str) -> GenPIConfig:
    from genpi.engines.environments import resolve_backends

    return resolve_backends(resolve(args, profile))


def _check_store_outlives_job(url: str) -> None:
    """Refuse a relative local store in Ray's copy of a submitted job's working dir: Ray deletes
    that copy (KubeRay with the pod), and the adapters would go with it."""
    if "://" in url or Path(url).is_absolute():
        return
    here = Path.cwd().parts
    if "runtime_resources" in here and any(p.startswith("working_dir") for p in here):
        raise GenPIError(
            f"store.url {url!r} is a relative folder, and this job runs in Ray's copy of its working "
            f"dir ({Path.cwd()}), which Ray deletes after the job; pass --store.url an absolute "
            f"folder that outlives the job, or s3://bucket/prefix"
        )


def setup_logging(verbose: bool) -> None:
    """INFO to stdout; ``verbose`` adds genpi's own DEBUG lines, never a library's (botocore's debug
    lines are the wire: signed headers, credentials, response bodies)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s genpi %(message)s", stream=sys.stdout)
    if verbose:
        logging.getLogger("genpi").setLevel(logging.DEBUG)


def execute(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    # Validate everything cheap before starting anything.
    cfg = _config(args, "local" if args.profile == "auto" else args.profile)
    if args.print_config:
        if args.profile == "auto":  # the job decides once it sees the cluster; no cluster is started here
            print("# profile auto: local shown; a job on a cluster with GPUs takes paper (--profile paper)")
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    from genpi.batch.graph import run_batch
    from genpi.models import check_model_name
    from genpi.prompt.files import folder_error, read_prompt_folder
    from genpi.ray_runtime import cluster_address, connect, disconnect
    from genpi.store import store_for

    specs, unreadable = read_prompt_folder(args.prompts)
    stems = {Path(f).stem: f for f in unreadable}
    real_inputs = {}
    if args.real_inputs:
        from genpi.prompt.real_inputs import load_real_inputs

        real_inputs = load_real_inputs(args.real_inputs, [s.name for s in specs] + list(stems))
    if args.only:
        unknown = sorted(set(args.only) - {s.name for s in specs} - set(stems))
        if unknown:
            raise GenPIError(
                f"--only names no prompt in {args.prompts}: {', '.join(unknown)}; "
                f"available: {', '.join(s.name for s in specs)}"
            )
        specs = [s for s in specs if s.name in args.only]
        unreadable = {stems[n]: unreadable[stems[n]] for n in args.only if n in stems}
    if not specs:  # nothing to run: the files' problems are the job's error
        raise folder_error(unreadable)
    for error in unreadable.values():
        log.error("%s; the other prompts go on", error)
    _check_store_outlives_job(cfg.store.url)
    if not cluster_address(cfg.ray):  # this machine runs the stages: its models must be here
        for role in (cfg.models.generator, cfg.models.target):
            check_model_name(role.name)
    store = store_for(cfg.store, writable=True)
    log.info("%d prompts from %s; store %s", len(specs), args.prompts, store.url)
    if not cluster_address(cfg.ray):  # this machine's CPU runs the models
        warning = slow_bf16_warning({"generator": cfg.models.generator.dtype, "target": cfg.models.target.dtype})
        if warning:
            log.warning("%s", warning)

    import ray

    connected = connect(cfg.ray)
    try:
        on_sigterm_unwind()  # Ray installed its own handler: ours is back before the line says the cluster is up
        log.info(connected)
        if args.profile == "auto":
            gpus = ray.cluster_resources().get("GPU", 0)
            profile = "paper" if gpus else "local"
            cfg = _config(args, profile)
            log.info("profile %s (the cluster has %g GPUs)", profile, gpus)
        results = run_batch(
            specs,
            cfg,
            store,
            {s.name: real_inputs[s.name] for s in specs if s.name in real_inputs},
            force=args.force,
            unreadable=unreadable,
        )
    finally:
        disconnect()

    failed = [r for r in results if r.status == "failed"]
    print("\nGenPI results")
    for r in results:
        pad = " " * len(r.name)
        if r.status == "failed":
            print(f"  {r.name}: FAILED in {r.stage}: {r.error}")
            continue
        print(f"  {r.name}: {'published ' + str(r.published) if r.passed else 'NOT published (gate failed)'}")
        print(f"  {pad}  gate: {r.gate}")
        print(f"  {pad}  run: {r.run}")
        print(f"  {pad}  adapter {r.artifacts['adapter']}")
        print(f"  {pad}  report {r.artifacts['report']}")
    print(
        f"\n`genpi report --store.url {store.url}` prints the batch table; "
        f"`genpi ls --store.url {store.url}` lists published adapters."
    )
    return 1 if failed else 0
