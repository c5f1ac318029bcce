"""Transports: one module each, behind the protocol in `base`, chosen by URL scheme."""

from .base import Delivery, Session, Transport, TransportOptions, get_transport, register

__all__ = ["Delivery", "Session", "Transport", "TransportOptions", "get_transport", "register"]
