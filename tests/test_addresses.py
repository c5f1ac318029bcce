"""Addresses: IDNA 2008 for international domains; one key for ledger and suppressions."""

from __future__ import annotations

from pathlib import Path

import pytest

from smartmail import MessageTemplate, Row, addresses, build, state
from smartmail.suppression import SuppressionList, key


def test_international_domains_follow_idna_2008_not_2003() -> None:
    # IDNA 2003 (Python's own codec) maps ß to ss: the mail would go to another domain.
    assert addresses.validate("anna@faß.de") == "anna@xn--fa-hia.de"
    assert addresses.to_idna("faß.de") == "xn--fa-hia.de"
    assert addresses.validate("Anna@BÜCHER.example") == "Anna@xn--bcher-kva.example"


@pytest.mark.parametrize("bad", ["a@☺.example", "a@-bücher.example", "a@bü..example"])
def test_domains_idna_2008_refuses_are_invalid(bad: str) -> None:
    with pytest.raises(addresses.AddressError, match="domain"):
        addresses.validate(bad)


def test_a_trailing_dot_is_dropped_once() -> None:
    assert addresses.validate("a@example.com.") == "a@example.com"
    assert addresses.normalise("a@example.com.") == addresses.normalise("a@example.com")
    with pytest.raises(addresses.AddressError):
        addresses.validate("a@example.com..")


@pytest.mark.parametrize(
    "spelling", ["anna@faß.de", " Anna@FAß.de ", "anna@xn--fa-hia.de", "ANNA@faß.de."]
)
def test_every_spelling_of_a_mailbox_has_one_key(spelling: str) -> None:
    assert addresses.normalise(spelling) == "anna@xn--fa-hia.de"
    assert key(spelling) == "anna@xn--fa-hia.de"
    assert addresses.normalise("anna@fass.de") != addresses.normalise(spelling)


def test_a_suppressed_international_address_is_found_in_any_spelling(tmp_path: Path) -> None:
    conn = state.connect(tmp_path / "state.db")
    suppressions = SuppressionList(conn)
    assert suppressions.add("anna@faß.de.", "complaint")
    assert suppressions.reason("ANNA@xn--fa-hia.de") == "complaint"
    assert suppressions.reason("anna@fass.de") is None


def test_the_message_goes_to_the_idna_2008_domain() -> None:
    t = MessageTemplate("From: news@acme.example\nSubject: x\n\nbody\n")
    out = build(t.render(Row(2, {"email": "anna@faß.de"}), "email"))
    assert out.recipients == ["anna@xn--fa-hia.de"]
    assert b"To: anna@xn--fa-hia.de\r\n" in out.data
