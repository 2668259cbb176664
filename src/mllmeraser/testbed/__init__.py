"""The offline testbed: a fictitious-people benchmark in MLLMU-Bench's schema and a small LLaVA trained on it."""
