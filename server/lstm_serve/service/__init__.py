"""The gRPC transport: decodes protos, calls the data plane, encodes replies and maps errors. Nothing else."""

from lstm_serve.service.calls import CallLimits, Calls
from lstm_serve.service.servicer import LstmServicer

__all__ = ["CallLimits", "Calls", "LstmServicer"]
