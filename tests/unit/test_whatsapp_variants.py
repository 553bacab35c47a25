"""The other forms WhatsApp may give a number (domain/contacts/phones.py)."""

from __future__ import annotations

import pytest

from daemon.domain.contacts.phones import whatsapp_variants


@pytest.mark.parametrize(
    ("phone", "variants"),
    [
        ("+525512345678", ("+5215512345678",)),
        ("+5215512345678", ("+525512345678",)),
        ("+5491123456789", ("+541123456789",)),
        ("+541123456789", ("+5491123456789",)),
        ("+5511987654321", ("+551187654321",)),
        ("+551187654321", ("+5511987654321",)),
        # A Brazilian landline (subscriber number from 2 to 5) has no ninth digit.
        ("+551133334444", ()),
        ("+33612345678", ()),
        ("+14155550123", ()),
        ("+5255123456", ()),  # too short for a Mexican mobile
    ],
)
def test_variants(phone, variants):
    assert whatsapp_variants(phone) == variants
    for other in variants:
        assert phone in whatsapp_variants(other)  # the way back
