"""atelier for producers: the job contract, the client, the store. Never imports torch."""

from producer.client import Client
from producer.core.contract import Event, EventType, Output, Record, Status
from producer.core.errors import (
    AtelierError,
    InvalidRequest,
    JobError,
    JobNotFound,
    Unavailable,
    UnknownModel,
)
from producer.core.settings import Settings, get_settings
from producer.requests.generate import validate_request

__all__ = [
    "AtelierError",
    "Client",
    "Event",
    "EventType",
    "InvalidRequest",
    "JobError",
    "JobNotFound",
    "Output",
    "Record",
    "Settings",
    "Status",
    "Unavailable",
    "UnknownModel",
    "get_settings",
    "validate_request",
]
