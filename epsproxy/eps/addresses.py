"""
Method names and return addresses (SPEC §9.2).

A method is ``"<operator>.<method>"``; a request id inside the EPS network is the
address ``"<operator>.<method>(<original id>)"`` that the gateway wrote, and routing
uses the address parsed from the id, not the ``method`` field.

The reference parses addresses with ``^(.*)\\.([^(.]+)\\(([^)]+)\\)$`` (greedy first
group).  :func:`parse_address` gives exactly the same answer (a hypothesis test checks
it against that regular expression) but scans the text once from the right instead of
backtracking, and refuses text longer than :data:`MAX_ADDRESS_LENGTH`, so a hostile id
costs linear time.  ``.`` in the reference does not match a newline, so an operator
part can never contain one.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "MAX_ADDRESS_LENGTH",
    "Address",
    "AddressError",
    "split_method",
    "parse_address",
    "make_address",
]

#: Longest method or address text accepted (characters).
MAX_ADDRESS_LENGTH = 2048


class AddressError(ValueError):
    """A method name or address is malformed, too long, or would not parse back."""


@dataclass(frozen=True)
class Address:
    """A parsed return address: who answers (``operator``), ``method`` and the inner ``id``."""

    operator: str
    method: str
    id: str


def _check_text(text: object, what: str) -> str:
    if not isinstance(text, str):
        raise AddressError(f"{what} must be a string, not {type(text).__name__}")
    if len(text) > MAX_ADDRESS_LENGTH:
        raise AddressError(f"{what} is longer than {MAX_ADDRESS_LENGTH} characters")
    return text


def split_method(text: str) -> tuple[str, str]:
    """
    Split ``"<operator>.<method>"`` at the **last** dot (reference: ``^(.*)\\.(.*)$``):
    ``public-proxy-1.ga.requestConnection`` -> (``public-proxy-1.ga``,
    ``requestConnection``).  Unlike the reference, an empty operator or method is refused.
    """
    text = _check_text(text, "method")
    dot = text.rfind(".")
    if dot < 0:
        raise AddressError(f"method {text!r} has no operator part (expected operator.method)")
    if "\n" in text:
        raise AddressError("method must not contain a newline")
    operator, method = text[:dot], text[dot + 1 :]
    if not operator:
        raise AddressError(f"method {text!r} has an empty operator part")
    if not method:
        raise AddressError(f"method {text!r} has an empty method part")
    return operator, method


def _match(text: str) -> Address | None:
    """The reference regex's match of ``text``, found in one right-to-left scan."""
    n = len(text)
    if n < 5 or text[-1] != ")":
        return None
    # The inner id has no ")": the "(" that opens it lies after the last inner ")".
    # It has at least one character, so the "(" is at most at n - 3.
    floor = text.rfind(")", 0, n - 1)
    newline = text.find("\n")
    p = n - 3
    # Candidates are tried from the right: a later "(" means a longer first group, which
    # the greedy first group prefers.  Each scan stops at the next "(" to its left, so
    # the whole loop looks at every character at most once.
    while p > floor:
        if text[p] != "(":
            p -= 1
            continue
        q = p - 1
        while q >= 0 and text[q] not in ".(":
            q -= 1
        # text[q + 1 : p] is the method: no "." or "(", at least one character, and it
        # must follow a "."; the operator before that "." must not hold a newline.
        if q >= 0 and text[q] == "." and q < p - 1 and (newline < 0 or newline >= q):
            return Address(text[:q], text[q + 1 : p], text[p + 1 : n - 1])
        p = q
    return None


def parse_address(request_id: str) -> Address:
    """
    Parse a return address ``"<operator>.<method>(<id>)"`` as the reference does:
    operator = everything up to the dot before the last possible method (may contain
    dots), method = no ``.`` or ``(``, id = at least one character, no ``)``.
    ``x.y(a(b)`` -> (``x``, ``y``, ``a(b``).  Raises :class:`AddressError` if it does
    not match or is longer than :data:`MAX_ADDRESS_LENGTH`.
    """
    request_id = _check_text(request_id, "request id")
    address = _match(request_id)
    if address is None:
        raise AddressError(
            f"request id {request_id[:80]!r} is not an address (operator.method(id))"
        )
    return address


def make_address(operator: str, method: str, inner_id: str) -> str:
    """
    The address ``"<operator>.<method>(<inner_id>)"``.  Refuses (:class:`AddressError`)
    parts that would not parse back into the same three parts: an empty method or one
    with ``.`` or ``(``, an empty id or one with ``)``, an operator with a newline, ids
    that look like a further ``.method(`` and anything over the length limit.
    """
    for value, what in ((operator, "operator"), (method, "method"), (inner_id, "id")):
        if not isinstance(value, str):
            raise AddressError(f"{what} must be a string, not {type(value).__name__}")
    if not method or "." in method or "(" in method:
        raise AddressError(f"method {method[:80]!r} must be non-empty without '.' or '('")
    if not inner_id or ")" in inner_id:
        raise AddressError(f"id {inner_id[:80]!r} must be non-empty without ')'")
    text = f"{operator}.{method}({inner_id})"
    try:
        parsed = parse_address(text)
    except AddressError as e:
        raise AddressError(f"address would not parse back: {e}") from None
    if parsed != Address(operator, method, inner_id):
        raise AddressError(f"address {text[:80]!r} would not parse back into the same parts")
    return text
