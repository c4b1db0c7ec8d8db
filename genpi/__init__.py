"""genpi: internalize long, fixed LLM prompts into per-prompt LoRA adapters (GenPI)."""

import os

# Read by Ray when it is imported: with 0, a local cluster takes 127.0.0.1 as its node address
# instead of the machine's network address. genpi is imported before ray everywhere.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

__version__ = "0.1.0"
