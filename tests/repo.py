"""Where the checkout is, for tests that read its shipped files or run its entry points."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "prompts"
