"""MLLMU-Bench: its data and prompts, the evaluation protocol, the training baselines and the comparison."""
