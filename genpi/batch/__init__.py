"""A batch of prompts through the stages on Ray: the stage graph, its stages and Ray tasks, its manifest."""
