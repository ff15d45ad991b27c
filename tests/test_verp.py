"""VERP addresses: Mailman's encoding, and a decoder that gives every address back."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

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


@pytest.mark.parametrize(
    ("address", "separators", "expected"),
    [
        ("test-bounces+a=example.com@example.com", "+", [("test@example.com", "a=example.com")]),
        ("test-bounces-a=example.com@example.com", "-", [("test@example.com", "a=example.com")]),
        (
            "my-list-bounces-a=example.com@example.com",
            "-",
            [("my-list@example.com", "a=example.com")],
        ),
        ("test-bounces@example.com", "+", [("test@example.com", "")]),
        ("Test-Bounces+x@example.com", "+", [("Test@example.com", "x")]),
        (
            "a-bounces-b-bounces-c=d@example.com",
            "-",
            [("a-bounces-b@example.com", "c=d"), ("a@example.com", "b-bounces-c=d")],
        ),
        ("test-bouncesx@example.com", "+-", []),
        ("test-bounces+a@example.com", "-", []),
        ("-bounces+a@example.com", "+", []),
        ("no-at-sign", "+", []),
    ],
)
def test_the_list_is_found_by_its_bounces_address_and_the_delimiter_after_it(
    address, separators, expected
):
    assert verp.bounces_candidates(address, separators) == expected


@pytest.mark.parametrize(
    ("verp_format", "separator"),
    [(DEFAULT, "+"), ("$bounces-$local=$domain", "-"), ("${local}=${domain}.${bounces}", "")],
)
def test_the_separator_after_bounces_is_read_from_the_format(verp_format, separator):
    assert verp.separator_after_bounces(verp_format) == separator


local_parts = st.text(alphabet=st.sampled_from("abcxyz019-+=._"), min_size=1, max_size=20).filter(
    lambda text: not text.startswith((".", "-")) and not text.endswith(".")
)


@given(
    list_name=local_parts.filter(lambda name: "+" not in name and "=" not in name),
    local=local_parts,
    delimiter=st.sampled_from("+-"),
)
def test_a_verpd_sender_leads_back_to_its_list_and_member(list_name, local, delimiter):
    verp_format = f"${{bounces}}{delimiter}${{local}}=${{domain}}"
    recipient = f"{local}@member.example.org"
    sender = verp.encode(f"{list_name}-bounces@lists.example.com", recipient, verp_format)

    found = dict(verp.bounces_candidates(sender, delimiter))

    assert f"{list_name}@lists.example.com" in found
    decoded = verp.decode(sender, verp_format, bounces=f"{list_name}-bounces")
    assert decoded == recipient
