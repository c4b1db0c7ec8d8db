"""Data synthesis from the prompt alone: inputs, single-turn outputs, reasons, role play, quality."""
