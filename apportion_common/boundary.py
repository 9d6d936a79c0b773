"""What may arrive over the wire: limits and checks shared by every service.

Each peer checks every field it receives where protobuf becomes its own types
(the scheduler in :mod:`scheduler_service.wire`, the worker on its Worker
service and on its instructions, the client on task updates). A field that
cannot be used raises :class:`WireError` naming the field, so the peer that
sent it hears what was wrong.

Checks are pydantic ``TypeAdapter`` s over ``TypedDict`` s, one per message
kind (a message that is only a key gets a plain check): a schema per
message is easy to read, pydantic-core's errors name the field path
(``dependencies[3]: String should have at most 1024 characters``), and it
costs no more than hand-written checks (``python -m
tests.unit.scheduler.test_wire`` times it). The exception is TaskFinished,
which every task sends: building the adapter's input dict costs more than the
conversion itself, so it has plain checks with the same wording and a fast
path for the usual report. Payloads are measured apart (a TypeAdapter would
copy the bytes).

The limits bound what one message can make a peer do or keep; each is far
above what a well-behaved peer sends (the gRPC message limit, 256 MiB, bounds
the rest). Error text is the exception: a user's exception may legitimately
carry a huge message, so over-long error text is cut short rather than
refused (refusing would drop the worker's stream for the user's bug).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, Field, StringConstraints, TypeAdapter, ValidationError
from typing_extensions import TypedDict

from .resources import MAX_SPELLING_LENGTH

#: Task keys, dependency keys, result keys.
MAX_KEY_LENGTH = 1024
#: Worker names and client ids.
MAX_NAME_LENGTH = 1024
#: ``host:port``; a DNS name is at most 253 characters.
MAX_ADDRESS_LENGTH = 512
MAX_RESOURCE_NAME_LENGTH = 256
#: Distinct resources in one map (a worker's declaration, a task's needs).
MAX_RESOURCES = 1024
#: 1e18 (an exabyte of MEMORY): far above any real amount, and small enough
#: that fixed-point accounting (1e9 quanta per unit) stays exact in an int
#: and its sums convert back to floats.
MAX_AMOUNT = 1e18
MAX_NTHREADS = 100_000
#: One task's pickled function and arguments; half the gRPC message limit, so
#: a batch holding one still has room for the rest.
MAX_PAYLOAD_BYTES = 128 * 1024 * 1024
MAX_DEPENDENCIES = 100_000
#: Names or addresses one task may be restricted to.
MAX_WORKER_RESTRICTIONS = 10_000
#: Holders of one input named in an assignment.
MAX_INPUT_ADDRESSES = 10_000
#: A result small enough to travel with the worker's report (workers send up
#: to 16 KiB; this leaves them room to raise that without a scheduler change).
MAX_INLINE_RESULT_BYTES = 1024 * 1024
#: Items in one list at the top of a message: tasks in a submit batch, keys
#: in a cancel or release, reports in a batch. A real client sends keys of 30
#: characters or more, so the 256 MiB message limit stops it well below this;
#: only a message of absurdly short keys reaches it.
MAX_ITEMS_PER_MESSAGE = 10_000_000
#: Error text a worker reports; longer text is cut (see the module docstring).
MAX_ERROR_TYPE_LENGTH = 1024
MAX_ERROR_TEXT_CHARS = 256 * 1024
#: A pickled exception over this is dropped; the client rebuilds the
#: exception from its type name and message instead.
MAX_ERROR_PICKLE_BYTES = 16 * 1024 * 1024


class WireError(ValueError):
    """A message from a peer that cannot be used; the text names the field."""


def check_address(address: str) -> str:
    """``host:port`` with a port in 1..65535 (``[v6-host]:port`` for IPv6)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or any(c.isspace() for c in address):
        raise ValueError(f"{address!r} is not host:port")
    if host.startswith("[") != host.endswith("]") or host in ("[", "[]"):
        raise ValueError(f"{address!r} is not host:port (brackets go around an IPv6 host)")
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"{address!r} has no port in 1..65535")
    return address


def _address_or_empty(address: str) -> str:
    return address if address == "" else check_address(address)


Key = Annotated[str, StringConstraints(min_length=1, max_length=MAX_KEY_LENGTH)]
Name = Annotated[str, StringConstraints(max_length=MAX_NAME_LENGTH)]
Address = Annotated[
    str, StringConstraints(max_length=MAX_ADDRESS_LENGTH), AfterValidator(check_address)
]
#: Where an input could not be fetched from; empty when no holder was known.
AddressOrEmpty = Annotated[
    str, StringConstraints(max_length=MAX_ADDRESS_LENGTH), AfterValidator(_address_or_empty)
]


def _resource_name(name: str) -> str:
    # Worded as the command line words it (apportion_common.resources.check_amount).
    if not name.strip():
        raise ValueError("the name is empty" if not name else "the name is blank")
    if len(name) > MAX_RESOURCE_NAME_LENGTH:
        raise ValueError(f"the name is longer than {MAX_RESOURCE_NAME_LENGTH} characters")
    return name


ResourceName = Annotated[str, AfterValidator(_resource_name)]
Amount = Annotated[float, Field(strict=True, ge=0, le=MAX_AMOUNT, allow_inf_nan=False)]
Resources = Annotated[dict[ResourceName, Amount], Field(max_length=MAX_RESOURCES)]
AmountText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_SPELLING_LENGTH)]
#: Amounts as written, by resource name; each must read as its amount (the
#: caller checks that, against the Resources beside it).
AmountTexts = Annotated[dict[ResourceName, AmountText], Field(max_length=MAX_RESOURCES)]
RunId = Annotated[int, Field(ge=1)]

T = TypeVar("T")


def _where(loc: tuple[int | str, ...]) -> str:
    """``('resources', 'GPU')`` -> ``resources['GPU']``; ``('inputs', 3, 'key')`` ->
    ``inputs[3].key``."""
    text = ""
    previous: int | str | None = None
    for part in loc:
        if part == "[key]":
            pass  # the map key itself was wrong; the message says so
        elif isinstance(part, int):
            text += f"[{part}]"
        elif previous is None:
            text = part
        elif isinstance(previous, int):
            text += f".{part}"  # a field of a list item
        else:
            text += f"[{shorten(part, 40)!r}]"  # a key of a map
        previous = part
    return text or "message"


def describe(exc: ValidationError, what: str, limit: int = 3) -> str:
    """A short sentence naming each bad field (no input echoed): ``what`` and
    ``field: problem``, or ``what[3]: problem`` when ``what`` is a list."""
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    parts = []
    for e in errors[:limit]:
        where = _where(tuple(e["loc"]))
        problem = e["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {problem}" if where != "message" else problem)
    if len(errors) > limit:
        parts.append(f"and {len(errors) - limit} more")
    text = "; ".join(parts)
    return f"{what}{text}" if text.startswith("[") else f"{what}: {text}"


def shorten(text: str, limit: int = 100) -> str:
    """``text`` for an error message: a peer's over-long key is not echoed whole."""
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def check(adapter: TypeAdapter[T], data: Any, what: str) -> T:
    """Validate ``data``; raise :class:`WireError` starting with ``what``."""
    try:
        return adapter.validate_python(data)
    except ValidationError as exc:
        raise WireError(describe(exc, what)) from None


def check_key(key: str, what: str = "task key") -> str:
    """A key on its own (an ExplainTask, a FetchResult): plain checks suffice."""
    if not key:
        raise WireError(f"{what} is empty")
    if len(key) > MAX_KEY_LENGTH:
        raise WireError(f"{what} is longer than {MAX_KEY_LENGTH} characters ({len(key)})")
    return key


def check_count(items: Any, limit: int, what: str) -> None:
    if len(items) > limit:
        raise WireError(f"{what} has {len(items)} items; at most {limit} are allowed")


def cut(text: str, limit: int = MAX_ERROR_TEXT_CHARS, keep_end: bool = False) -> str:
    """``text`` cut to about ``limit`` characters, saying how much was cut."""
    if len(text) <= limit:
        return text
    note = f"[... {len(text) - limit} characters cut ...]"
    return note + text[-limit:] if keep_end else text[:limit] + note


# ------------------------------------------------- what a worker receives


class _InputLocation(TypedDict):
    key: Key
    addresses: Annotated[list[Address], Field(max_length=MAX_INPUT_ADDRESSES)]


class _TaskAssignment(TypedDict):
    # The payload's size is checked apart: pydantic would copy the bytes.
    key: Key
    run_id: RunId
    resources: Resources
    inputs: Annotated[list[_InputLocation], Field(max_length=MAX_DEPENDENCIES)]


_ASSIGNMENT = TypeAdapter(_TaskAssignment)
_RESOURCES = TypeAdapter(Resources)


def check_assignment(assignment: Any, what: str) -> None:
    """A TaskAssignment from the scheduler: raise :class:`WireError` if unusable."""
    check(
        _ASSIGNMENT,
        {
            "key": assignment.key,
            "run_id": assignment.run_id,
            "resources": dict(assignment.resources),
            "inputs": [{"key": i.key, "addresses": list(i.addresses)} for i in assignment.inputs],
        },
        what,
    )
    if len(assignment.payload) > MAX_PAYLOAD_BYTES:
        raise WireError(
            f"{what}: payload: {len(assignment.payload)} bytes; at most {MAX_PAYLOAD_BYTES}"
        )


def check_amounts(resources: Mapping[str, float], what: str) -> dict[str, float]:
    """Resource amounts as received: finite, >= 0, bounded; names not blank."""
    checked: dict[str, float] = check(_RESOURCES, dict(resources), what)
    return checked
