"""Message templates: their fields and their rendering for a contact."""

from __future__ import annotations

import string
from dataclasses import dataclass

from daemon.errors import InputError
from daemon.store.models import Contact

_BUILTIN_FIELDS = ("name", "phone")


def template_fields(template: str) -> set[str]:
    """The `{variable}` names a template uses; InputError if it is malformed."""
    return set(template_field_order(template))


def template_field_order(template: str) -> list[str]:
    """The `{variable}` names a template uses, each once, in the order they
    first appear; InputError if it is malformed."""
    fields: dict[str, None] = {}
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
        fields.setdefault(field_name)
    return list(fields)


def template_values(contact) -> dict[str, str]:
    """{variable: text} of a Contact (or anything with phone, name, variables)."""
    values = {k: str(v) for k, v in (contact.variables or {}).items()}
    values["name"] = contact.name
    values["phone"] = contact.phone
    return values


def template_parameter_values(contact, message1: str) -> dict[str, str]:
    """The values a provider template for ``message1`` is given (Meta's body
    parameters), in their order: the contact's variables named by a number
    ("1", "2": a template's own {{1}}, {{2}}) by number, then the variables
    ``message1``'s text uses in the order they appear in it, so that a
    template written like the text ("Bonjour {{1}} de {{2}}" for "Bonjour
    {name} de {city}") reads the same on the phone. Not every column of the
    contact, nor its name and phone unless the text uses them: Meta refuses
    a template given more parameters than it has (132000)."""
    values = template_values(contact)
    numbered = sorted((key for key in values if key.isdigit()), key=int)
    used = [key for key in template_field_order(message1) if key in values]
    return {key: values[key] for key in numbered + used}


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
