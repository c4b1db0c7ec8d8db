"""A batch of prompts through the stages on Ray: the pipeline, its Ray tasks, its manifest."""
