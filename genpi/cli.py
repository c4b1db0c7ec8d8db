"""The ``genpi`` command (and ``jobs/internalize.py``): internalize a folder of prompts.

``genpi [flags]`` runs the job; ``genpi report [BATCH]`` prints a batch's fidelity table (the
newest batch by default); ``genpi ls`` lists the published adapters. Bad input ends with one
line naming the input and the fix, and exit code 2; a prompt that fails mid-run is reported
while the others finish (exit code 1); finished work stays in the store and a rerun resumes it.
"""

from __future__ import annotations

import argparse
import logging
import sys

import yaml

from genpi.config import PROFILES, GenPIConfig, add_config_flags, load_config, overrides_from_args
from genpi.errors import GenPIError

log = logging.getLogger("genpi")

DESCRIPTION = """\
Internalize long, fixed LLM prompts into per-prompt LoRA adapters (Generative Prompt
Internalization). For every prompt in --prompts: synthesize pseudo inputs, student and
teacher outputs, reasons and role-played conversations; train one LoRA adapter with the
joint loss (1 - lambda) * SFT + lambda * Prompt Generation; evaluate it without the prompt
against the teacher (with the prompt) and the base model on held-out inputs; publish it
when it passes the fidelity gate. Runs on Ray: joins RAY_ADDRESS (as under `ray job submit`)
or starts a local cluster on 127.0.0.1.

Other commands:
  genpi report [BATCH] [--store.url URL]   print a batch's fidelity table (default: newest)
  genpi ls [--store.url URL]               list the published adapters"""


def build_parser(prog: str = "genpi") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", default="prompts", metavar="DIR",
                        help="folder of prompt files, one prompt per file (default: prompts)")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="run only the prompt with this name (repeatable)")
    parser.add_argument("--profile", default="auto", choices=("auto", *PROFILES),
                        help="settings to start from: paper = the paper's settings for a GPU cluster, local = "
                             "sized for 2 CPU cores, auto = paper when the Ray cluster has GPUs, else local "
                             "(default: auto)")
    parser.add_argument("--eval-inputs", metavar="DIR",
                        help="folder of real user inputs to evaluate each adapter on as well: one "
                             "<prompt name>.jsonl per prompt, one {\"input\": ...} object per line")
    parser.add_argument("--config", metavar="YAML", help="YAML file of config values, applied over the profile")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit without running")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    add_config_flags(parser)
    return parser


def _resolve(args: argparse.Namespace, profile: str) -> GenPIConfig:
    return load_config(profile, args.config, overrides_from_args(args))


def build_store_parser(command: str, prog: str) -> argparse.ArgumentParser:
    """Parser of the commands that read the store (``report``, ``ls``)."""
    parser = argparse.ArgumentParser(prog=f"{prog} {command}")
    if command == "report":
        parser.add_argument("batch", nargs="?", help="batch id (default: the newest batch in the store)")
    parser.add_argument("--store.url", dest="url", default="artifacts", help="artifact store (default: artifacts)")
    parser.add_argument("--store.endpoint-url", dest="endpoint_url", default="", help="S3 endpoint")
    return parser


def main(argv: list[str] | None = None, prog: str = "genpi") -> int:
    """Run the job (or ``report`` / ``ls``); returns the process exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("report", "ls"):
        args = build_store_parser(argv[0], prog).parse_args(argv[1:])
        try:
            from genpi.commands import list_published, print_report
            from genpi.store import open_store

            store = open_store(args.url, endpoint_url=args.endpoint_url or None)
            return print_report(store, args.batch) if argv[0] == "report" else list_published(store)
        except GenPIError as e:
            print(f"{prog} {argv[0]}: error: {e}", file=sys.stderr)
            return 2
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s genpi %(message)s", stream=sys.stdout)
    try:
        return _run(args)
    except GenPIError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; finished work is in the store and a rerun resumes it", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    # Validate everything cheap before starting anything.
    cfg = _resolve(args, "local" if args.profile == "auto" else args.profile)
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    from genpi.pipeline import run_batch, store_for
    from genpi.prompt.files import load_prompts
    from genpi.ray_runtime import connect, disconnect

    specs = load_prompts(args.prompts)
    real_inputs = {}
    if args.eval_inputs:
        from genpi.prompt.real_inputs import load_real_inputs

        real_inputs = load_real_inputs(args.eval_inputs, [s.name for s in specs])
    if args.only:
        unknown = sorted(set(args.only) - {s.name for s in specs})
        if unknown:
            raise GenPIError(f"--only names no prompt in {args.prompts}: {', '.join(unknown)}; "
                             f"available: {', '.join(s.name for s in specs)}")
        specs = [s for s in specs if s.name in args.only]
    store = store_for(cfg)
    log.info("%d prompts from %s; store %s", len(specs), args.prompts, store.url)

    import ray

    log.info(connect(cfg.ray))
    try:
        if args.profile == "auto":
            gpus = ray.cluster_resources().get("GPU", 0)
            profile = "paper" if gpus else "local"
            cfg = _resolve(args, profile)
            log.info("profile %s (the cluster has %g GPUs)", profile, gpus)
        results = run_batch(specs, cfg, store, {s.name: real_inputs[s.name] for s in specs if s.name in real_inputs})
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
    print(f"\n`genpi report --store.url {store.url}` prints the batch table; `genpi ls` lists published adapters.")
    return 1 if failed else 0


def entrypoint() -> None:
    """Console script ``genpi``."""
    sys.exit(main())


if __name__ == "__main__":
    entrypoint()
