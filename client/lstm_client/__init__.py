"""Python client for lstm-serve.

from lstm_client import Client

with Client("127.0.0.1:50051") as client, client.create_session("elnino") as session:
    y = session.step([26.1])
"""

__version__ = "0.1.0"

from lstm_client._calls import Forecast, Gates, ManyResult, ModelFailure, ModelInfo, Prediction, ServerInfo, SessionInfo
from lstm_client._retry import RetryPolicy
from lstm_client.aio import AsyncClient, AsyncSession
from lstm_client.client import Client, Session
from lstm_client.errors import (
    AlreadyExists,
    DeadlineExceeded,
    InvalidArgument,
    LstmError,
    NotFound,
    ResourceExhausted,
    SequenceError,
    ServerError,
    SessionGone,
    StateMismatch,
    Unauthenticated,
    Unavailable,
)
from lstm_client.tls import TlsConfig

__all__ = [
    "AlreadyExists",
    "AsyncClient",
    "AsyncSession",
    "Client",
    "DeadlineExceeded",
    "Forecast",
    "Gates",
    "InvalidArgument",
    "LstmError",
    "ManyResult",
    "ModelFailure",
    "ModelInfo",
    "NotFound",
    "Prediction",
    "ResourceExhausted",
    "RetryPolicy",
    "SequenceError",
    "ServerError",
    "ServerInfo",
    "Session",
    "SessionGone",
    "SessionInfo",
    "StateMismatch",
    "TlsConfig",
    "Unauthenticated",
    "Unavailable",
]
