"""``realtime keys``: create, list, revoke and rotate keys in the key registry (a NATS KV
bucket every gateway follows; see gateway/keys.py). Needs ``RT_KEYS_SECRET`` (the same value
as the gateways') to seal and open secrets, and ``--nats`` / ``RT_NATS_URL``.

``create`` and ``rotate`` print the key (``appSlug.keyId:secret``) as their last line, the only
time a secret is ever shown; ``list`` never prints secrets.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import orjson

from nats_adapter.connect import connect
from nats_adapter.keys import key_bucket, stored_names, stored_value
from shared.capabilities import Capability
from shared.keys import KeyRecord, SecretBox, decode_record, encode_record, new_key
from shared.settings import Settings, parse_duration

__all__ = ["add_key_commands", "run_keys"]


def add_key_commands(commands: Any) -> None:
    """Add ``keys`` and its subcommands to the ``realtime`` parser's subcommands."""
    keys = commands.add_parser("keys", help="manage keys in the key registry (NATS KV)")
    keys.add_argument("--nats", help="NATS URL (RT_NATS_URL)")
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a key; prints it as the last line")
    create.add_argument("app", help="app slug (A-Z a-z 0-9 _ -)")
    create.add_argument(
        "--capability", help='JSON, e.g. \'{"chat:*":["subscribe","publish"]}\' (default: all)'
    )
    create.add_argument("--label", default="", help="free text shown by list")
    create.add_argument("--expires", help="lifetime, e.g. 30d, 12h (default: never)")
    listing = actions.add_parser("list", help="list keys (never their secrets)")
    listing.add_argument("app", nargs="?", help="only this app's keys")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    revoke = actions.add_parser("revoke", help="revoke a key: its connections close in seconds")
    revoke.add_argument("name", help="appSlug.keyId")
    rotate = actions.add_parser("rotate", help="new secret; the old one works for --grace")
    rotate.add_argument("name", help="appSlug.keyId")
    rotate.add_argument(
        "--grace",
        help="how long the old secret keeps working (RT_KEY_ROTATION_GRACE_S, default 1h)",
    )


async def run_keys(arguments: argparse.Namespace, settings: Settings) -> int:
    """Run one ``realtime keys`` action; return the exit status."""
    box = SecretBox(settings.keys_secret)  # ValueError (exit 2) without RT_KEYS_SECRET
    nc = await connect(settings, "realtime-keys")
    try:
        bucket = await key_bucket(nc.jetstream(), settings)
        now = time.time()
        action = arguments.action
        if action == "create":
            capability = Capability.allow_all()
            if arguments.capability:
                capability = Capability.parse(arguments.capability)
            expires = parse_duration(arguments.expires) if arguments.expires else None
            record = new_key(arguments.app, capability, arguments.label, expires, now)
            await bucket.create(record.name, encode_record(record, box))
            _describe(record, now)
            print(record.text)
            return 0
        if action == "list":
            for name in await stored_names(bucket):
                if arguments.app and not name.startswith(f"{arguments.app}."):
                    continue
                value = await stored_value(bucket, name)
                if value is None:
                    continue
                _describe(decode_record(value, box), now, as_json=arguments.json)
            return 0
        value = await stored_value(bucket, arguments.name)
        if value is None:
            print(f"realtime keys: no key {arguments.name} in the registry", file=sys.stderr)
            return 1
        if action == "revoke":
            await bucket.delete(arguments.name)
            print(f"revoked {arguments.name}: gateways close its connections within seconds")
            return 0
        grace = (
            parse_duration(arguments.grace) if arguments.grace else settings.key_rotation_grace_s
        )
        rotated = decode_record(value, box).rotated(grace, now)
        await bucket.put(rotated.name, encode_record(rotated, box))
        _describe(rotated, now)
        print(rotated.text)
        return 0
    finally:
        await nc.close()


def _describe(record: KeyRecord, now: float, as_json: bool = False) -> None:
    details = record.describe(now)
    if as_json:
        print(orjson.dumps(details).decode())
        return
    capability = orjson.dumps(details["capability"]).decode()
    extras = [f"label={details['label']!r}"] if details["label"] else []
    if details["expires_at"]:
        extras.append(("expired " if details["expired"] else "expires ") + details["expires_at"])
    if details["previous_secret_until"]:
        extras.append(f"old secret works until {details['previous_secret_until']}")
    print(f"{details['name']}  {capability}  {'  '.join(extras)}".rstrip())
