"""lstm-serve: a gRPC server for LSTM models that keeps each session's recurrent state between calls."""

__version__ = "0.1.0"
