"""Evaluation: `mapoco eval`, discussion metrics, the files a run leaves behind and `mapoco sweep-summary`."""
