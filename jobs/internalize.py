"""Entry point for `ray job submit -- python jobs/internalize.py --prompts prompts/`.

The same command as the `genpi` console script; see `--help` for every flag.
"""

import sys
from pathlib import Path

# Under `ray job submit --working-dir .` the package may not be installed on the cluster.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genpi.cli.main import exit_process, main  # noqa: E402

if __name__ == "__main__":
    exit_process(main(prog="jobs/internalize.py"))
