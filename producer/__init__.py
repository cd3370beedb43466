"""atelier for producers: the job contract, the client, the store. Never imports torch."""

from producer.client import Client
from producer.contract import EventType, Status, validate_request
from producer.errors import (
    AtelierError,
    InvalidRequest,
    JobError,
    JobNotFound,
    Unavailable,
    UnknownModel,
)
from producer.settings import Settings, get_settings

__all__ = [
    "AtelierError",
    "Client",
    "EventType",
    "InvalidRequest",
    "JobError",
    "JobNotFound",
    "Settings",
    "Status",
    "Unavailable",
    "UnknownModel",
    "get_settings",
    "validate_request",
]
