"""Message templates: their fields and their rendering for a contact."""

from __future__ import annotations

import string
from dataclasses import dataclass

from daemon.errors import InputError
from daemon.store.models import Contact

_BUILTIN_FIELDS = ("name", "phone")


def template_fields(template: str) -> set[str]:
    """The `{variable}` names a template uses; InputError if it is malformed."""
    fields = set()
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise InputError(f"invalid template {template[:40]!r}: {exc}") from None
    for _, field_name, format_spec, conversion in parsed:
        if field_name is None:
            continue
        if not field_name.isidentifier():
            raise InputError(
                f"invalid template variable {{{field_name}}}: use {{name}}-style "
                "names (letters, digits, underscore)"
            )
        if format_spec or conversion:
            raise InputError(f"template variable {{{field_name}}}: no format specs")
        fields.add(field_name)
    return fields


def template_values(contact) -> dict[str, str]:
    """{variable: text} of a Contact (or anything with phone, name, variables)."""
    values = {k: str(v) for k, v in (contact.variables or {}).items()}
    values["name"] = contact.name
    values["phone"] = contact.phone
    return values


def template_parameter_values(contact, message1: str) -> dict[str, str]:
    """The values a provider template for ``message1`` is given (Meta's body
    parameters): the variables ``message1``'s text uses, and the contact's
    variables named by a number ("1", "2": a template's own {{1}}, {{2}}).
    Not every column of the contact, nor its name and phone unless the text
    uses them: Meta refuses a template given more parameters than it has
    (132000)."""
    used = template_fields(message1)
    return {
        key: value
        for key, value in template_values(contact).items()
        if key in used or key.isdigit()
    }


def render(template: str, contact: Contact) -> str:
    return template.format_map(template_values(contact))


def _check_contact_has(fields: set[str], contact) -> None:
    values = template_values(contact)
    for name in sorted(fields):
        if not values.get(name):
            raise InputError(
                f"template variable {{{name}}} is missing for contact {contact.phone}"
            )


@dataclass(frozen=True)
class _Recipient:
    """What render() reads of a contact."""

    phone: str
    name: str
    variables: dict | None
