"""Amazon SES feedback messages, as they arrive on an SQS queue, read into `Feedback`.

Both delivery forms: the SNS envelope whose `Message` is the SES JSON as a string, and raw
message delivery (the SES JSON itself); both formats: identity notifications
(`notificationType`) and event publishing (`eventType`, with more types). Unknown fields are
ignored, because SES adds fields over time; a documented type missing a field smartmail needs
is malformed. The shapes are those of the SES developer guide ("Amazon SNS notification
contents for Amazon SES" and "event publishing: contents of event data").
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parseaddr
from typing import Any

from .suppression import MAX_DETAIL, key

_VALIDATION_TEXT = "Successfully validated SNS topic"
# The types smartmail acts on, whose documented shape is required; any other type is recorded.
ACTED_ON = ("Bounce", "Complaint", "Delivery")


class MalformedMessage(ValueError):
    """The message is not SES feedback smartmail can read; it stays on the queue."""


@dataclass(frozen=True)
class RecipientEvent:
    address: str
    subtype: str | None = None
    detail: str = ""


@dataclass(frozen=True)
class Feedback:
    """One SES notification or event, reduced to what smartmail acts on."""

    type: str
    provider_id: str | None
    feedback_id: str
    recipients: tuple[RecipientEvent, ...]
    permanent: bool = False
    format: str = "notification"
    wrapped: bool = False


def parse(body: str) -> Feedback:
    """Read one SQS message body (SNS-wrapped or raw). Raises MalformedMessage."""
    outer = _json(body, "the message body")
    wrapped = False
    if isinstance(outer, Mapping) and "Type" in outer and "TopicArn" in outer:
        kind = outer.get("Type")
        if kind != "Notification":
            raise MalformedMessage(f"an SNS {kind} message, not SES feedback")
        inner = outer.get("Message")
        if not isinstance(inner, str):
            raise MalformedMessage("SNS envelope whose Message is not a string")
        message = _json(inner, "the SNS Message")
        wrapped = True
    else:
        message = outer
    if isinstance(message, _Validation):
        return Feedback("SnsTopicValidation", None, _digest(message.text), (), wrapped=wrapped)
    if not isinstance(message, Mapping):
        raise MalformedMessage("SES feedback must be a JSON object")
    return _feedback(message, wrapped)


class _Validation:
    """The plain-text test message SES publishes when a topic is set up: not an error."""

    def __init__(self, text: str) -> None:
        self.text = text


def _json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        # Valid JSON nested deeper than Python's decoder goes: hostile, and never SES's.
        raise MalformedMessage(f"{what} is nested too deeply to read") from None
    except (ValueError, TypeError) as exc:
        if isinstance(text, str) and text.lstrip().startswith(_VALIDATION_TEXT):
            return _Validation(text)
        raise MalformedMessage(f"{what} is not JSON ({exc})") from None


def _feedback(msg: Mapping[str, Any], wrapped: bool) -> Feedback:
    if isinstance(msg.get("notificationType"), str):
        kind, fmt = msg["notificationType"], "notification"
    elif isinstance(msg.get("eventType"), str):
        kind, fmt = msg["eventType"], "event"
    else:
        raise MalformedMessage("no notificationType or eventType: not an SES notification")
    mail = msg.get("mail")
    if not isinstance(mail, Mapping):
        if kind in ACTED_ON:
            raise MalformedMessage(f"{kind}: no 'mail' object")
        mail = {}
    provider_id = mail.get("messageId")
    if provider_id is not None and not isinstance(provider_id, str):
        raise MalformedMessage(f"{kind}: mail.messageId is not a string")
    permanent = False
    detail_obj: Any
    if kind == "Bounce":
        bounce = _object(msg, "bounce", kind)
        bounce_type = _string(bounce, "bounceType", kind)
        sub = bounce.get("bounceSubType")
        sub = sub if isinstance(sub, str) else ""
        permanent = bounce_type == "Permanent"
        recipients = tuple(
            RecipientEvent(
                _address(r, "emailAddress", kind),
                f"{bounce_type}/{sub}" if sub else bounce_type,
                _text(r.get("diagnosticCode") or r.get("status")),
            )
            for r in _objects(bounce, "bouncedRecipients", kind)
        )
        fid, detail_obj = bounce.get("feedbackId"), bounce
    elif kind == "Complaint":
        complaint = _object(msg, "complaint", kind)
        ftype = _text(complaint.get("complaintFeedbackType")) or None
        recipients = tuple(
            RecipientEvent(
                _address(r, "emailAddress", kind), ftype, _text(complaint.get("userAgent"))
            )
            for r in _objects(complaint, "complainedRecipients", kind)
        )
        fid, detail_obj = complaint.get("feedbackId"), complaint
    elif kind == "Delivery":
        delivery = _object(msg, "delivery", kind)
        listed = delivery.get("recipients")
        if (
            not isinstance(listed, list)
            or not listed
            or not all(isinstance(a, str) for a in listed)
        ):
            raise MalformedMessage("Delivery: delivery.recipients is not a list of addresses")
        detail = _text(delivery.get("smtpResponse"))
        recipients = tuple(RecipientEvent(_bare(a), None, detail) for a in listed)
        fid, detail_obj = None, delivery
    else:
        recipients, detail_obj = _other(msg, mail, kind)
        fid = None
    if kind in ACTED_ON and not provider_id:
        raise MalformedMessage(f"{kind}: no mail.messageId")
    if not isinstance(fid, str) or not fid:
        fid = _digest(json.dumps([kind, provider_id, detail_obj], sort_keys=True, default=str))
    return Feedback(kind, provider_id, fid, recipients, permanent, fmt, wrapped)


def _other(
    msg: Mapping[str, Any], mail: Mapping[str, Any], kind: str
) -> tuple[tuple[RecipientEvent, ...], Any]:
    """Event types smartmail only records (Send, Open, Click, Reject, DeliveryDelay, ...)."""
    name = kind[:1].lower() + kind[1:].replace(" ", "")
    obj = msg.get(name)
    if kind == "Rendering Failure":
        obj = msg.get("failure", obj)
    subtype: str | None = None
    addrs: list[str] = []
    if kind == "DeliveryDelay" and isinstance(obj, Mapping):
        subtype = _text(obj.get("delayType")) or None
        delayed = obj.get("delayedRecipients")
        if isinstance(delayed, list):
            addrs = [_bare(r["emailAddress"]) for r in delayed if _has_address(r)]
    elif kind == "Reject" and isinstance(obj, Mapping):
        subtype = _text(obj.get("reason")) or None
    if not addrs:
        dest = mail.get("destination")
        if isinstance(dest, list):
            addrs = [_bare(a) for a in dest if isinstance(a, str) and a.strip()]
    if obj is None:
        obj = {k: v for k, v in msg.items() if k not in ("notificationType", "eventType", "mail")}
    return tuple(RecipientEvent(a, subtype) for a in addrs or [""]), obj


def _object(msg: Mapping[str, Any], name: str, kind: str) -> Mapping[str, Any]:
    value = msg.get(name)
    if not isinstance(value, Mapping):
        raise MalformedMessage(f"{kind}: no '{name}' object")
    return value


def _string(obj: Mapping[str, Any], name: str, kind: str) -> str:
    value = obj.get(name)
    if not isinstance(value, str) or not value:
        raise MalformedMessage(f"{kind}: no '{name}'")
    return value


def _objects(obj: Mapping[str, Any], name: str, kind: str) -> list[Mapping[str, Any]]:
    value = obj.get(name)
    if not isinstance(value, list) or not value or not all(isinstance(v, Mapping) for v in value):
        raise MalformedMessage(f"{kind}: '{name}' is not a non-empty list of objects")
    return value


def _has_address(obj: Any) -> bool:
    return isinstance(obj, Mapping) and isinstance(obj.get("emailAddress"), str)


def _address(obj: Mapping[str, Any], name: str, kind: str) -> str:
    value = obj.get(name)
    if not isinstance(value, str) or not value.strip():
        raise MalformedMessage(f"{kind}: a recipient has no {name}")
    return _bare(value)


def _bare(value: str) -> str:
    """SES lists bare addresses, but be lenient with 'Name <addr>'."""
    if "<" in value:
        value = parseaddr(value)[1] or value
    return key(value)


def _text(value: Any) -> str:
    return value[:MAX_DETAIL] if isinstance(value, str) else ""


def _digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:40]
