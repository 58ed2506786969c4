"""Schemathesis hooks for the REST schema run (``SCHEMATHESIS_HOOKS`` in test_rest.py).

Positive cases must be accepted, and JSON Schema cannot say "the elements of a batch share
one clientId and one ephemeral flag" or "a capability string holds JSON". These two rules
are made true of generated positive bodies before they are sent; negative ones are left
alone, so the server's refusals of them are still checked.
"""

from __future__ import annotations

from typing import Any

import schemathesis
from schemathesis import GenerationMode


@schemathesis.hook
def before_call(context: schemathesis.HookContext, case: Any, kwargs: dict[str, Any]) -> None:
    """Make a positive case's body satisfy the rules its schema cannot express."""
    meta = case.meta
    if meta is None or meta.generation.mode is not GenerationMode.POSITIVE:
        return
    body = case.body
    if isinstance(body, list) and body and all(isinstance(item, dict) for item in body):
        for item in body[1:]:
            for field in ("clientId", "ephemeral"):
                item.pop(field, None)
                if field in body[0]:
                    item[field] = body[0][field]
    if isinstance(body, dict) and isinstance(body.get("capability"), str):
        body["capability"] = '{"schemathesis:*":["publish"]}'
