"""VERP addresses: Mailman's encoding, and a decoder that gives every address back."""

from __future__ import annotations

import pytest

from listdelivery import verp

DEFAULT = "${bounces}+${local}=${domain}"


def test_encoding_matches_mailman_for_plain_addresses():
    assert verp.encode("test-bounces@example.com", "aperson@example.com", DEFAULT) == (
        "test-bounces+aperson=example.com@example.com"
    )


def test_an_unqualified_recipient_keeps_the_plain_sender():
    assert verp.encode("test-bounces@example.com", "nobody", DEFAULT) == "test-bounces@example.com"


@pytest.mark.parametrize(
    "recipient",
    [
        "aperson@example.com",
        "plus+tag@example.com",
        "eq=x@example.org",
        "a=b+c=d@example.net",
        "UPPER@Example.COM",
        "jürgen@münchen.example",
        '"odd@local"@example.com',
    ],
)
@pytest.mark.parametrize(
    "verp_format", [DEFAULT, "${bounces}-${local}-at-${domain}", "$bounces+$local=$domain"]
)
def test_every_address_decodes_back_to_itself(recipient, verp_format):
    encoded = verp.encode("test-bounces@example.com", recipient, verp_format)
    assert verp.decode(encoded, verp_format, bounces="test-bounces") == recipient
    if verp_format != "${bounces}-${local}-at-${domain}":  # "-" is also in test-bounces
        assert verp.decode(encoded, verp_format) == recipient


def test_a_plain_bounces_address_is_not_a_verp_address():
    assert verp.decode("test-bounces@example.com", DEFAULT) is None


def test_the_delimiter_splits_off_the_suffix():
    assert verp.split_suffix("test-bounces+a=example.com@example.com", "+") == (
        "test-bounces@example.com",
        "a=example.com",
    )
