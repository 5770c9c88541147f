"""The process layer: the live daemon around the engine (capture handles, workers, the
supervisor and its pool, the control API and ingestion, metrics, logging, systemd notify).
Uses the engine and the sinks; the command line above it passes down what it needs."""
