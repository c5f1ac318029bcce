"""A fast local stand-in for SES, SQS and DynamoDB, for the worker benchmark (moto spends
~10 ms a request, and a queue worker makes several SQS and DynamoDB calls per job and row).

    python benchmarks/aws_endpoint.py [--max-seconds 900]

The SES endpoint of benchmarks/ses_endpoint.py (same process model: asyncio, HTTP/1.1
keep-alive, 127.0.0.1, its own process; prints `PORT <n>`; GET /stats and /reset), which
also answers, by the `X-Amz-Target` header of botocore's JSON protocols:

- **SQS** (`AmazonSQS.*`): CreateQueue, GetQueueUrl, GetQueueAttributes, SendMessage,
  SendMessageBatch (10 entries, 256 KB a call), ReceiveMessage (long polling, visibility
  timeout, ApproximateReceiveCount), DeleteMessage, DeleteMessageBatch,
  ChangeMessageVisibility. A job not deleted comes back when its visibility runs out.
- **DynamoDB** (`DynamoDB_20120810.*`): DescribeTable, CreateTable, UpdateTimeToLive,
  GetItem, BatchGetItem, PutItem, UpdateItem, DeleteItem, Query (table or index), with the
  expression grammar smartmail's state uses and nothing more: conditions made of `=`, `<>`,
  `<`, `<=`, `>`, `>=`, `IN (...)`, `attribute_exists`, `attribute_not_exists`, `AND`, `OR`
  and parentheses; updates of `SET a = operand [+|- operand]` (operand: a value, an attribute
  or `if_not_exists(a, operand)`) and `REMOVE a, b`; key conditions `k = :v [AND k2 = :v]`;
  top-level projections. Placeholders (`#name`, `:value`) are checked as DynamoDB checks
  them (undefined or unused: refused).

Anything else (another operation, `NOT`, `begins_with`, `ADD`, a nested path…) is refused
with a 400 ValidationException naming it and counted in /stats (`refused`), so a change in
smartmail's calls cannot silently benchmark different semantics: the benchmark fails
instead. One process, one event loop: every request is atomic, as DynamoDB's single-item
writes are. Requests are not signature-checked. /stats also gives, per queue, its depth and
`drained_at`: the `time.monotonic()` (system-wide on Linux) of the delete that emptied it.
Correctness against real DynamoDB semantics is tested with moto in tests/; this stand-in
only has to be fast and strict about what it does not know.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import hashlib
import itertools
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.ses_endpoint import Counters, Http, serve

JSON_10 = b"application/x-amz-json-1.0"
Item = dict[str, Any]
Context = tuple[dict[str, Any], dict[str, str]]  # ExpressionAttributeValues, ...Names


class AwsError(Exception):
    """A 400 answer: `code` becomes the `__type` botocore reads."""

    def __init__(self, code: str, message: str, extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.extra = code, message, extra or {}


class Refused(AwsError):
    """Something this stand-in does not implement (or DynamoDB would refuse)."""

    def __init__(self, message: str) -> None:
        super().__init__("com.amazon.coral.validate#ValidationException", message)


# --- DynamoDB expressions ------------------------------------------------------------------

_TOKEN = re.compile(r"\s*(<>|<=|>=|[=<>(),+\-]|[#:]?[A-Za-z_][A-Za-z0-9_]*)")
_KEYWORDS = {"AND", "OR", "NOT", "IN", "BETWEEN", "SET", "REMOVE", "ADD", "DELETE"}
_COMPARE = {"=", "<>", "<", "<=", ">", ">="}

Operand = Callable[[Item, Context], Any]  # an attribute value ({"S": ...}) or None
Predicate = Callable[[Item, Context], bool]


def _tokens(text: str) -> list[str]:
    out: list[str] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        found = _TOKEN.match(text, pos)
        if not found:
            raise Refused(f"aws_endpoint does not implement the syntax at {text[pos:]!r}")
        out.append(found.group(1))
        pos = found.end()
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokens(text)
        self.pos = 0
        self.placeholders: set[str] = set()

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def at(self, keyword: str) -> bool:
        token = self.peek()
        return token is not None and token.upper() == keyword

    def take(self, expected: str | None = None) -> str:
        token = self.peek()
        if token is None or (expected is not None and token.upper() != expected):
            raise Refused(
                f"aws_endpoint cannot parse {self.text!r} (expected {expected or 'more'} "
                f"at {token!r})"
            )
        self.pos += 1
        return token

    def done(self) -> None:
        if self.peek() is not None:
            raise Refused(f"aws_endpoint cannot parse {self.text!r} (extra {self.peek()!r})")

    # operands --------------------------------------------------------------------------------

    def path(self) -> Callable[[Context], str]:
        token = self.take()
        if token.upper() in _KEYWORDS or token in _COMPARE or token in "(),+-" or token[0] == ":":
            raise Refused(
                f"aws_endpoint expected an attribute name in {self.text!r}, not {token!r}"
            )
        if self.peek() == "(":
            raise Refused(f"aws_endpoint does not implement the function {token}() ({self.text!r})")
        if token[0] == "#":
            self.placeholders.add(token)

            def named(ctx: Context, token: str = token) -> str:
                return ctx[1][token]

            return named
        return lambda ctx: token

    def operand(self) -> Operand:
        token = self.peek()
        if token is not None and token[0] == ":":
            self.take()
            self.placeholders.add(token)
            return lambda item, ctx: ctx[0][token]
        name = self.path()
        return lambda item, ctx: item.get(name(ctx))

    # conditions ------------------------------------------------------------------------------

    def condition(self) -> Predicate:
        left = self.conjunction()
        while self.at("OR"):
            self.take()
            right = self.conjunction()
            left = functools.partial(lambda a, b, i, c: a(i, c) or b(i, c), left, right)
        return left

    def conjunction(self) -> Predicate:
        left = self.primary()
        while self.at("AND"):
            self.take()
            right = self.primary()
            left = functools.partial(lambda a, b, i, c: a(i, c) and b(i, c), left, right)
        return left

    def primary(self) -> Predicate:
        token = self.peek()
        if token == "(":
            self.take()
            inner = self.condition()
            self.take(")")
            return inner
        if token in ("attribute_exists", "attribute_not_exists"):
            self.take()
            self.take("(")
            name = self.path()
            self.take(")")
            if token == "attribute_exists":
                return lambda item, ctx: name(ctx) in item
            return lambda item, ctx: name(ctx) not in item
        if token is not None and token.upper() in _KEYWORDS:
            raise Refused(f"aws_endpoint does not implement {token} ({self.text!r})")
        left = self.operand()
        op = self.take()
        if op.upper() == "IN":
            self.take("(")
            choices = [self.operand()]
            while self.peek() == ",":
                self.take()
                choices.append(self.operand())
            self.take(")")
            return lambda item, ctx: _in(left(item, ctx), [c(item, ctx) for c in choices])
        if op not in _COMPARE:
            raise Refused(f"aws_endpoint does not implement {op!r} ({self.text!r})")
        right = self.operand()
        return lambda item, ctx: _compare(op, left(item, ctx), right(item, ctx))

    # updates ---------------------------------------------------------------------------------

    def update(self) -> Callable[[Item, Context], Item]:
        sets: list[tuple[Callable[[Context], str], Operand]] = []
        removes: list[Callable[[Context], str]] = []
        seen: set[str] = set()
        while self.peek() is not None:
            clause = self.take().upper()
            if clause in seen or clause not in ("SET", "REMOVE"):
                raise Refused(f"aws_endpoint does not implement {clause} here ({self.text!r})")
            seen.add(clause)
            while True:
                if clause == "SET":
                    name = self.path()
                    self.take("=")
                    sets.append((name, self.value()))
                else:
                    removes.append(self.path())
                if self.peek() != ",":
                    break
                self.take()

        def apply(item: Item, ctx: Context) -> Item:
            names = [n(ctx) for n, _ in sets] + [r(ctx) for r in removes]
            if len(set(names)) != len(names):
                raise Refused(f"Two document paths overlap with each other in {self.text!r}")
            if {"pk", "sk"} & set(names):
                raise Refused("Cannot update attribute pk or sk. This attribute is part of the key")
            values = [(n(ctx), v(item, ctx)) for n, v in sets]  # all read the old item
            new = dict(item)
            for name, value in values:
                new[name] = value
            for remove in removes:
                new.pop(remove(ctx), None)
            return new

        return apply

    def value(self) -> Operand:
        left = self.term()
        if self.peek() in ("+", "-"):
            sign = self.take()
            right = self.term()
            return lambda item, ctx: _arith(sign, left(item, ctx), right(item, ctx))
        return left

    def term(self) -> Operand:
        if self.peek() == "if_not_exists":
            self.take()
            self.take("(")
            name = self.path()
            self.take(",")
            fallback = self.term()
            self.take(")")

            def if_not_exists(item: Item, ctx: Context) -> Any:
                found = item.get(name(ctx))
                return found if found is not None else fallback(item, ctx)

            return if_not_exists
        return self.operand()


def _scalar(value: Any) -> tuple[str, Any] | None:
    if not isinstance(value, dict) or len(value) != 1:
        return None
    ((kind, raw),) = value.items()
    if kind == "N":
        return kind, Decimal(raw)
    return kind, raw


def _compare(op: str, left: Any, right: Any) -> bool:
    a, b = _scalar(left), _scalar(right)
    if op == "<>":
        return a != b
    if a is None or b is None or a[0] != b[0]:
        return False
    if op == "=":
        return bool(a[1] == b[1])
    if a[0] not in ("N", "S"):
        return False
    x, y = a[1], b[1]
    return bool({"<": x < y, "<=": x <= y, ">": x > y, ">=": x >= y}[op])


def _in(value: Any, choices: list[Any]) -> bool:
    return any(_compare("=", value, c) for c in choices)


def _arith(sign: str, left: Any, right: Any) -> dict[str, str]:
    a, b = _scalar(left), _scalar(right)
    if a is None or b is None or a[0] != "N" or b[0] != "N":
        raise Refused("An operand in the update expression has an incorrect data type")
    total = a[1] + b[1] if sign == "+" else a[1] - b[1]
    return {"N": str(total.normalize()) if total != total.to_integral() else str(int(total))}


@functools.lru_cache(maxsize=256)
def _condition(text: str) -> tuple[Predicate, frozenset[str]]:
    parser = _Parser(text)
    predicate = parser.condition()
    parser.done()
    return predicate, frozenset(parser.placeholders)


@functools.lru_cache(maxsize=256)
def _update(text: str) -> tuple[Callable[[Item, Context], Item], frozenset[str]]:
    parser = _Parser(text)
    apply = parser.update()
    parser.done()
    return apply, frozenset(parser.placeholders)


@functools.lru_cache(maxsize=64)
def _names(text: str) -> tuple[list[str], frozenset[str]]:
    """A projection: top-level attribute names (or #placeholders), comma-separated."""
    parts = [p.strip() for p in text.split(",")]
    for part in parts:
        if not re.fullmatch(r"#?[A-Za-z_][A-Za-z0-9_]*", part):
            raise Refused(f"aws_endpoint does not implement the projection {text!r}")
    return parts, frozenset(p for p in parts if p[0] == "#")


_KEY_CONDITION = re.compile(r"\s*(#?\w+)\s*=\s*(:\w+)\s*(?:AND\s+(#?\w+)\s*=\s*(:\w+)\s*)?\Z", re.I)


def _context(request: dict[str, Any], used: set[str]) -> Context:
    values = request.get("ExpressionAttributeValues") or {}
    names = request.get("ExpressionAttributeNames") or {}
    for given, kind in ((values, "Values"), (names, "Names")):
        prefix = ":" if kind == "Values" else "#"
        mentioned = {u for u in used if u[0] == prefix}
        if set(given) - mentioned:
            raise Refused(
                f"Value provided in ExpressionAttribute{kind} unused in expressions: keys: "
                f"{{{', '.join(sorted(set(given) - mentioned))}}}"
            )
        if mentioned - set(given):
            raise Refused(
                f"An expression attribute {kind[:-1].lower()} used in expression is not "
                f"defined: {sorted(mentioned - set(given))[0]}"
            )
    return values, names


# --- DynamoDB tables -----------------------------------------------------------------------


@dataclass
class Table:
    name: str
    description: dict[str, Any]
    partitions: dict[str, dict[str, Item]] = field(default_factory=dict)

    def get(self, key: Item) -> Item | None:
        return self.partitions.get(key["pk"]["S"], {}).get(key["sk"]["S"])

    def put(self, item: Item) -> None:
        self.partitions.setdefault(item["pk"]["S"], {})[item["sk"]["S"]] = item

    def delete(self, key: Item) -> Item | None:
        return self.partitions.get(key["pk"]["S"], {}).pop(key["sk"]["S"], None)


def _key_of(request_key: Item) -> Item:
    if set(request_key) != {"pk", "sk"} or not all("S" in v for v in request_key.values()):
        raise Refused("The provided key element does not match the schema")
    return request_key


def _project(item: Item, projection: str | None, names: dict[str, str]) -> Item:
    if not projection:
        return item
    wanted = [names.get(p, p) for p in _names(projection)[0]]
    return {k: item[k] for k in wanted if k in item}


class Dynamo:
    """The state tables, and one method per DynamoDB operation smartmail's state makes."""

    def __init__(self) -> None:
        self.tables: dict[str, Table] = {}

    def table(self, name: str) -> Table:
        found = self.tables.get(name)
        if found is None:
            raise AwsError(
                "com.amazonaws.dynamodb.v20120810#ResourceNotFoundException",
                f"Requested resource not found: Table: {name} not found",
            )
        return found

    def handle(self, operation: str, request: dict[str, Any]) -> dict[str, Any]:
        method = getattr(self, "op_" + operation, None)
        if method is None:
            raise Refused(f"aws_endpoint does not implement DynamoDB {operation}")
        answer: dict[str, Any] = method(request)
        return answer

    def op_DescribeTable(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"Table": self.table(request["TableName"]).description}

    def op_CreateTable(self, request: dict[str, Any]) -> dict[str, Any]:
        name = request["TableName"]
        if name in self.tables:
            raise AwsError(
                "com.amazonaws.dynamodb.v20120810#ResourceInUseException",
                f"Table already exists: {name}",
            )
        keys = {k["AttributeName"]: k["KeyType"] for k in request["KeySchema"]}
        if keys != {"pk": "HASH", "sk": "RANGE"}:
            raise Refused("aws_endpoint only keeps tables keyed by pk (HASH) and sk (RANGE)")
        description = {
            "TableName": name,
            "TableStatus": "ACTIVE",
            "KeySchema": request["KeySchema"],
            "AttributeDefinitions": request["AttributeDefinitions"],
            "BillingModeSummary": {"BillingMode": request.get("BillingMode", "PROVISIONED")},
            "GlobalSecondaryIndexes": [
                {**g, "IndexStatus": "ACTIVE"} for g in request.get("GlobalSecondaryIndexes", [])
            ],
            "CreationDateTime": time.time(),
            "ItemCount": 0,
        }
        self.tables[name] = Table(name, description)
        return {"TableDescription": description}

    def op_UpdateTimeToLive(self, request: dict[str, Any]) -> dict[str, Any]:
        self.table(request["TableName"])
        return {"TimeToLiveSpecification": request["TimeToLiveSpecification"]}

    def op_GetItem(self, request: dict[str, Any]) -> dict[str, Any]:
        table = self.table(request["TableName"])
        projection = request.get("ProjectionExpression")
        used = set(_names(projection)[1]) if projection else set()
        _values, names = _context(request, used)
        found = table.get(_key_of(request["Key"]))
        return {} if found is None else {"Item": _project(found, projection, names)}

    def op_BatchGetItem(self, request: dict[str, Any]) -> dict[str, Any]:
        responses: dict[str, list[Item]] = {}
        for name, wanted in request["RequestItems"].items():
            if set(wanted) - {"Keys", "ConsistentRead"}:
                raise Refused(f"aws_endpoint does not implement BatchGetItem {sorted(wanted)}")
            if len(wanted["Keys"]) > 100:
                raise Refused("Too many items requested for the BatchGetItem call")
            table = self.table(name)
            found = (table.get(_key_of(k)) for k in wanted["Keys"])
            responses[name] = [item for item in found if item is not None]
        return {"Responses": responses, "UnprocessedKeys": {}}

    def _check(self, request: dict[str, Any], old: Item | None, used: set[str]) -> Context:
        condition = request.get("ConditionExpression")
        if condition:
            predicate, placeholders = _condition(condition)
            used |= placeholders
        ctx = _context(request, used)
        if condition and not predicate(old or {}, ctx):
            extra: dict[str, Any] = {}
            if request.get("ReturnValuesOnConditionCheckFailure") == "ALL_OLD" and old:
                extra["Item"] = old
            raise AwsError(
                "com.amazonaws.dynamodb.v20120810#ConditionalCheckFailedException",
                "The conditional request failed",
                extra,
            )
        return ctx

    def _returns(self, request: dict[str, Any], *allowed: str) -> str:
        returns = request.get("ReturnValues", "NONE")
        if returns not in allowed:
            raise Refused(f"aws_endpoint does not implement ReturnValues={returns} here")
        return str(returns)

    def op_PutItem(self, request: dict[str, Any]) -> dict[str, Any]:
        table = self.table(request["TableName"])
        self._returns(request, "NONE")
        item = request["Item"]
        key = _key_of({"pk": item.get("pk"), "sk": item.get("sk")})
        self._check(request, table.get(key), set())
        table.put(item)
        return {}

    def op_UpdateItem(self, request: dict[str, Any]) -> dict[str, Any]:
        table = self.table(request["TableName"])
        returns = self._returns(request, "NONE", "UPDATED_OLD")
        key = _key_of(request["Key"])
        old = table.get(key)
        apply, placeholders = _update(request["UpdateExpression"])
        ctx = self._check(request, old, set(placeholders))
        new = apply(old or dict(key), ctx)
        table.put(new)
        if returns == "UPDATED_OLD" and old:
            # The attributes the update changed, as they were (as moto answers: one it set to
            # the value it had is left out).
            changed = {name: value for name, value in old.items() if new.get(name) != value}
            return {"Attributes": changed} if changed else {}
        return {}

    def op_DeleteItem(self, request: dict[str, Any]) -> dict[str, Any]:
        table = self.table(request["TableName"])
        returns = self._returns(request, "NONE", "ALL_OLD")
        key = _key_of(request["Key"])
        self._check(request, table.get(key), set())
        old = table.delete(key)
        return {"Attributes": old} if returns == "ALL_OLD" and old else {}

    def op_Query(self, request: dict[str, Any]) -> dict[str, Any]:
        table = self.table(request["TableName"])
        known = {
            "TableName", "IndexName", "KeyConditionExpression", "FilterExpression",
            "ProjectionExpression", "ExpressionAttributeValues", "ExpressionAttributeNames",
            "Select", "ExclusiveStartKey", "ConsistentRead",
        }  # fmt: skip
        if set(request) - known or request.get("Select", "COUNT") != "COUNT":
            raise Refused(f"aws_endpoint does not implement Query {sorted(set(request) - known)}")
        found = _KEY_CONDITION.match(request["KeyConditionExpression"])
        if not found:
            raise Refused(
                f"aws_endpoint does not implement the key condition "
                f"{request['KeyConditionExpression']!r}"
            )
        hash_name, hash_value, range_name, range_value = found.groups()
        used = {p for p in found.groups() if p and p[0] in "#:"}
        filtering = request.get("FilterExpression")
        if filtering:
            predicate, placeholders = _condition(filtering)
            used |= placeholders
        projection = request.get("ProjectionExpression")
        if projection:
            used |= _names(projection)[1]
        values, names = _context(request, used)
        hash_name, range_name = names.get(hash_name, hash_name), names.get(range_name, range_name)
        index = request.get("IndexName")
        want = ("gsi1pk", "gsi1sk") if index == "gsi1" else ("pk", "sk")
        if index not in (None, "gsi1") or hash_name != want[0] or range_name not in (None, want[1]):
            raise Refused(
                f"aws_endpoint: no key {hash_name}/{range_name} on {index or 'the table'}"
            )
        if index is None:
            partition = table.partitions.get(values[hash_value].get("S"), {})
            rows = [partition[sk] for sk in sorted(partition)]
        else:
            rows = sorted(
                (
                    item
                    for part in table.partitions.values()
                    for item in part.values()
                    if item.get("gsi1pk") == values[hash_value]
                ),
                key=lambda item: (item["gsi1sk"]["S"], item["pk"]["S"], item["sk"]["S"]),
            )
        if range_value:
            rows = [r for r in rows if r.get(want[1]) == values[range_value]]
        if filtering:
            rows = [r for r in rows if predicate(r, (values, names))]
        if request.get("Select") == "COUNT":
            return {"Count": len(rows), "ScannedCount": len(rows)}
        items = [_project(r, projection, names) for r in rows]
        return {"Items": items, "Count": len(items), "ScannedCount": len(items)}


# --- SQS -----------------------------------------------------------------------------------

MAX_BATCH_BYTES = 256 * 1024


@dataclass
class Message:
    id: str
    body: str
    md5: str
    visible_at: float = 0.0
    receives: int = 0
    handle: str = ""


@dataclass
class Queue:
    name: str
    url: str
    visibility: int = 30
    messages: dict[str, Message] = field(default_factory=dict)
    sent: int = 0
    deleted: int = 0
    received: int = 0
    drained_at: float | None = None

    def stats(self, now: float) -> dict[str, Any]:
        visible = sum(1 for m in self.messages.values() if m.visible_at <= now)
        return {
            "visible": visible,
            "in_flight": len(self.messages) - visible,
            "sent": self.sent,
            "received": self.received,
            "deleted": self.deleted,
            "drained_at": self.drained_at,
        }


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


class Sqs:
    """The queues, and one method per SQS operation smartmail's queue code makes."""

    def __init__(self) -> None:
        self.queues: dict[str, Queue] = {}
        self.by_url: dict[str, Queue] = {}
        self.handles: dict[str, tuple[Queue, str]] = {}
        self.ids = itertools.count(1)

    def queue(self, url: str) -> Queue:
        found = self.by_url.get(url)
        if found is None:
            raise AwsError("com.amazonaws.sqs#QueueDoesNotExist", f"no queue {url}")
        return found

    def handle(self, operation: str, request: dict[str, Any], host: str) -> dict[str, Any]:
        method = getattr(self, "op_" + operation, None)
        if method is None:
            raise Refused(f"aws_endpoint does not implement SQS {operation}")
        if operation == "CreateQueue":
            return self.op_CreateQueue(request, host)
        answer: dict[str, Any] = method(request)
        return answer

    def op_CreateQueue(self, request: dict[str, Any], host: str) -> dict[str, Any]:
        name = request["QueueName"]
        if name not in self.queues:
            visibility = int((request.get("Attributes") or {}).get("VisibilityTimeout", 30))
            queue = Queue(name, f"http://{host}/000000000000/{name}", visibility)
            self.queues[name] = queue
            self.by_url[queue.url] = queue
        return {"QueueUrl": self.queues[name].url}

    def op_GetQueueUrl(self, request: dict[str, Any]) -> dict[str, Any]:
        found = self.queues.get(request["QueueName"])
        if found is None:
            raise AwsError("com.amazonaws.sqs#QueueDoesNotExist", "no such queue")
        return {"QueueUrl": found.url}

    def op_GetQueueAttributes(self, request: dict[str, Any]) -> dict[str, Any]:
        queue = self.queue(request["QueueUrl"])
        counts = queue.stats(time.monotonic())
        every = {
            "VisibilityTimeout": str(queue.visibility),
            "ApproximateNumberOfMessages": str(counts["visible"]),
            "ApproximateNumberOfMessagesNotVisible": str(counts["in_flight"]),
        }
        wanted = request.get("AttributeNames") or []
        if "All" in wanted:
            return {"Attributes": every}
        unknown = set(wanted) - set(every)
        if unknown:
            raise Refused(f"aws_endpoint does not implement the queue attributes {unknown}")
        return {"Attributes": {k: every[k] for k in wanted}}

    def _add(self, queue: Queue, body: str) -> Message:
        message = Message(f"00000000-bench-{next(self.ids):012d}", body, _md5(body))
        queue.messages[message.id] = message
        queue.sent += 1
        queue.drained_at = None
        return message

    def op_SendMessage(self, request: dict[str, Any]) -> dict[str, Any]:
        queue = self.queue(request["QueueUrl"])
        if set(request) - {"QueueUrl", "MessageBody"}:
            raise Refused(f"aws_endpoint does not implement SendMessage {sorted(request)}")
        message = self._add(queue, request["MessageBody"])
        return {"MessageId": message.id, "MD5OfMessageBody": message.md5}

    def op_SendMessageBatch(self, request: dict[str, Any]) -> dict[str, Any]:
        queue = self.queue(request["QueueUrl"])
        entries = request["Entries"]
        if not entries or len(entries) > 10:
            raise AwsError("com.amazonaws.sqs#TooManyEntriesInBatchRequest", "1 to 10 entries")
        if sum(len(e["MessageBody"].encode()) for e in entries) > MAX_BATCH_BYTES:
            raise AwsError("com.amazonaws.sqs#BatchRequestTooLong", "over 256 KB")
        successful = []
        for entry in entries:
            if set(entry) - {"Id", "MessageBody"}:
                raise Refused(f"aws_endpoint does not implement batch entries {sorted(entry)}")
            message = self._add(queue, entry["MessageBody"])
            successful.append(
                {"Id": entry["Id"], "MessageId": message.id, "MD5OfMessageBody": message.md5}
            )
        return {"Successful": successful, "Failed": []}

    def receive(self, request: dict[str, Any]) -> dict[str, Any]:
        """ReceiveMessage without waiting: what is visible now (possibly nothing)."""
        queue = self.queue(request["QueueUrl"])
        wanted = max(1, min(10, int(request.get("MaxNumberOfMessages", 1))))
        visibility = int(request.get("VisibilityTimeout", queue.visibility))
        now = time.monotonic()
        out = []
        for message in queue.messages.values():
            if message.visible_at > now:
                continue
            message.receives += 1
            message.visible_at = now + visibility
            message.handle = base64.b64encode(f"{message.id}#{message.receives}".encode()).decode()
            self.handles[message.handle] = (queue, message.id)
            queue.received += 1
            out.append(
                {
                    "MessageId": message.id,
                    "ReceiptHandle": message.handle,
                    "MD5OfBody": message.md5,
                    "Body": message.body,
                    "Attributes": {"ApproximateReceiveCount": str(message.receives)},
                }
            )
            if len(out) == wanted:
                break
        return {"Messages": out} if out else {}

    def op_ReceiveMessage(self, request: dict[str, Any]) -> dict[str, Any]:
        known = {
            "QueueUrl", "MaxNumberOfMessages", "WaitTimeSeconds", "VisibilityTimeout",
            "AttributeNames", "MessageSystemAttributeNames",
        }  # fmt: skip
        if set(request) - known:
            raise Refused(f"aws_endpoint does not implement ReceiveMessage {sorted(request)}")
        return self.receive(request)

    def _message(self, receipt: str) -> tuple[Queue, Message | None]:
        found = self.handles.get(receipt)
        if found is None:
            raise AwsError("com.amazonaws.sqs#ReceiptHandleIsInvalid", "not a receipt handle")
        queue, message_id = found
        return queue, queue.messages.get(message_id)

    def _delete(self, url: str, receipt: str) -> None:
        queue, message = self._message(receipt)
        if queue.url != url:
            raise AwsError("com.amazonaws.sqs#ReceiptHandleIsInvalid", "another queue's handle")
        if message is not None:
            del queue.messages[message.id]
            queue.deleted += 1
            if not queue.messages:
                queue.drained_at = time.monotonic()

    def op_DeleteMessage(self, request: dict[str, Any]) -> dict[str, Any]:
        self._delete(request["QueueUrl"], request["ReceiptHandle"])
        return {}

    def op_DeleteMessageBatch(self, request: dict[str, Any]) -> dict[str, Any]:
        successful, failed = [], []
        for entry in request["Entries"]:
            try:
                self._delete(request["QueueUrl"], entry["ReceiptHandle"])
                successful.append({"Id": entry["Id"]})
            except AwsError as exc:
                failed.append({"Id": entry["Id"], "SenderFault": True, "Code": exc.code})
        return {"Successful": successful, "Failed": failed}

    def op_ChangeMessageVisibility(self, request: dict[str, Any]) -> dict[str, Any]:
        queue, message = self._message(request["ReceiptHandle"])
        if queue.url != request["QueueUrl"]:
            raise AwsError("com.amazonaws.sqs#ReceiptHandleIsInvalid", "another queue's handle")
        now = time.monotonic()
        if (
            message is None
            or message.visible_at <= now
            or message.handle != request["ReceiptHandle"]
        ):
            raise AwsError("com.amazonaws.sqs#MessageNotInflight", "the message is not in flight")
        message.visible_at = now + int(request["VisibilityTimeout"])
        return {}


# --- HTTP ----------------------------------------------------------------------------------


class World:
    """Everything one stand-in process holds, shared by its connections."""

    def __init__(self, counters: Counters) -> None:
        self.counters = counters
        self.dynamo = Dynamo()
        self.sqs = Sqs()
        self.refused: list[str] = []
        self.requests: dict[str, int] = {}

    def stats(self) -> bytes:
        ses = json.loads(self.counters.stats())
        now = time.monotonic()
        ses["queues"] = {name: q.stats(now) for name, q in self.sqs.queues.items()}
        ses["requests"] = self.requests
        ses["cpu_seconds"] = time.process_time()  # this stand-in's own CPU, to show its share
        ses["refused"] = self.refused[-20:]
        ses["refused_count"] = len(self.refused)
        return json.dumps(ses).encode()


POLL_SECONDS = 0.02


class AwsHttp(Http):
    def __init__(self, counters: Counters, world: World) -> None:
        super().__init__(counters)
        self.world = world

    def answer(self, method: bytes, path: bytes, headers: dict[bytes, bytes], body: bytes) -> None:
        target = headers.get(b"x-amz-target", b"").decode()
        if not path.startswith((b"/stats", b"/reset")):
            what = target or ("SES " + (b"GetSendQuota" if b"Action=" in body else path).decode())
            self.world.requests[what] = self.world.requests.get(what, 0) + 1
        if not target:
            if path.startswith(b"/stats"):
                self.respond(200, self.world.stats(), b"application/json")
                return
            super().answer(method, path, headers, body)
            return
        service, _, operation = target.partition(".")
        try:
            request = json.loads(body or b"{}")
            if service == "DynamoDB_20120810":
                answer = self.world.dynamo.handle(operation, request)
            elif service == "AmazonSQS":
                if operation == "ReceiveMessage":
                    self.receive(request)
                    return
                answer = self.world.sqs.handle(
                    operation, request, headers.get(b"host", b"127.0.0.1").decode()
                )
            else:
                raise Refused(f"aws_endpoint does not implement {target}")
        except AwsError as exc:
            self.error(exc)
            return
        except (KeyError, TypeError, ValueError, InvalidOperation) as exc:
            self.error(Refused(f"aws_endpoint could not read {target}: {exc!r}"))
            return
        self.respond(200, json.dumps(answer).encode(), JSON_10)

    def error(self, exc: AwsError) -> None:
        if isinstance(exc, Refused):
            self.world.refused.append(exc.message)
            print(f"aws_endpoint refused: {exc.message}", file=sys.stderr, flush=True)
        out = json.dumps({"__type": exc.code, "message": exc.message, **exc.extra}).encode()
        code = exc.code.rpartition("#")[2]
        self.respond(400, out, JSON_10, b"x-amzn-query-error: %s;Sender\r\n" % code.encode())

    def receive(self, request: dict[str, Any]) -> None:
        """ReceiveMessage; with WaitTimeSeconds, hold the answer until a job is visible."""
        deadline = time.monotonic() + int(request.get("WaitTimeSeconds", 0))
        try:
            answer = self.world.sqs.op_ReceiveMessage(request)
        except AwsError as exc:
            self.error(exc)
            return
        if answer or time.monotonic() >= deadline:
            self.respond(200, json.dumps(answer).encode(), JSON_10)
            return
        self.held = True
        asyncio.get_running_loop().call_later(POLL_SECONDS, self.poll, request, deadline)

    def poll(self, request: dict[str, Any], deadline: float) -> None:
        assert self.transport is not None
        if self.transport.is_closing():
            return
        try:
            answer = self.world.sqs.receive(request)
        except AwsError as exc:
            self.held = False
            self.error(exc)
        else:
            if not answer and time.monotonic() < deadline:
                asyncio.get_running_loop().call_later(POLL_SECONDS, self.poll, request, deadline)
                return
            self.held = False
            self.respond(200, json.dumps(answer).encode(), JSON_10)
        if self.buffer:
            self.data_received(b"")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-seconds", type=float, default=900.0)
    args = parser.parse_args()
    args.limit, args.max_send_rate = 0, 100000.0
    worlds: dict[int, World] = {}

    def protocol(counters: Counters) -> AwsHttp:
        if id(counters) not in worlds:
            worlds[id(counters)] = World(counters)
        return AwsHttp(counters, worlds[id(counters)])

    asyncio.run(serve(args, protocol))


if __name__ == "__main__":
    main()
