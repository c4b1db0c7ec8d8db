"""Evaluation of internalized-prompt adapters: metrics, efficiency, plots and the publish gate."""
