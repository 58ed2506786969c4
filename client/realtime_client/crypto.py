"""End-to-end payload encryption, byte-compatible with the SDK's ``crypto.ts``.

AES-GCM with a random 96-bit IV per payload. The plaintext is the JSON text of the value;
``data`` on the wire is the base64 of ``iv || ciphertext || tag`` (a JSON string) and
``encoding`` is ``cipher+aes-256-gcm/base64`` (or ``cipher+aes-128-gcm/base64`` for a 16-byte
key). The server never sees the key; it stores ``data`` and ``encoding`` verbatim.
"""

from __future__ import annotations

import base64
import binascii
import os
from typing import Any, Literal

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "CIPHER_TOKEN_128",
    "CIPHER_TOKEN_256",
    "Cipher",
    "CipherError",
    "generate_random_key",
    "is_cipher_encoding",
]

CIPHER_TOKEN_256 = "cipher+aes-256-gcm"
CIPHER_TOKEN_128 = "cipher+aes-128-gcm"
BASE64_TOKEN = "base64"
IV_BYTES = 12

CipherAlgorithm = Literal["aes-256-gcm", "aes-128-gcm"]


class CipherError(ValueError):
    """A payload that cannot be decrypted: wrong key, tampering, or not a cipher encoding."""


def is_cipher_encoding(encoding: str | None) -> bool:
    """True when ``encoding`` names a cipher transform (the payload needs a key to read)."""
    if not encoding:
        return False
    return any(token in (CIPHER_TOKEN_256, CIPHER_TOKEN_128) for token in encoding.split("/"))


def generate_random_key(bits: Literal[128, 256] = 256) -> str:
    """A fresh random AES key as base64 (share it between clients, never with the server)."""
    if bits not in (128, 256):
        raise ValueError("bits must be 128 or 256")
    return base64.b64encode(os.urandom(bits // 8)).decode("ascii")


class Cipher:
    """AES-GCM for one channel: ``encrypt`` a JSON value into ``(encoding, data)`` and back.

    ``key`` is 16 or 32 raw bytes or their base64; ``algorithm``, when given, must agree with
    the key's length (as in the SDK, a contradicting label is an error rather than a silent
    downgrade).
    """

    def __init__(self, key: bytes | str, algorithm: CipherAlgorithm | None = None) -> None:
        if isinstance(key, str):
            try:
                key = base64.b64decode(key, validate=True)
            except binascii.Error as error:
                raise ValueError(f"Cipher: key is not base64: {error}") from None
        if len(key) not in (16, 32):
            raise ValueError(f"Cipher: key must be 16 or 32 bytes (AES-128/256), got {len(key)}")
        if algorithm is not None:
            expected = 32 if algorithm == "aes-256-gcm" else 16
            if len(key) != expected:
                raise ValueError(f"Cipher: {algorithm} needs a {expected}-byte key, got {len(key)}")
        self._aead = AESGCM(key)
        token = CIPHER_TOKEN_256 if len(key) == 32 else CIPHER_TOKEN_128
        self.encoding = f"{token}/{BASE64_TOKEN}"

    def encrypt(self, value: Any) -> tuple[str, str]:
        """Encrypt ``value`` (JSON-serialisable; ``None`` is ``null``) with a fresh IV.

        Returns ``(encoding, data)``, ``data`` being base64 of ``iv || ciphertext || tag``.
        """
        return self.encoding, self.encrypt_bytes(orjson.dumps(value))

    def encrypt_bytes(self, plaintext: bytes) -> str:
        """Encrypt JSON text already serialised (``encrypt`` without the dumps)."""
        iv = os.urandom(IV_BYTES)
        return base64.b64encode(iv + self._aead.encrypt(iv, plaintext, None)).decode("ascii")

    def decrypt(self, encoding: str, data: Any) -> Any:
        """Decrypt ``data`` carried under ``encoding`` back to its JSON value.

        Raises ``CipherError`` on a bad key, tampering, or a payload that is not ours.
        """
        if not is_cipher_encoding(encoding):
            raise CipherError(f'Cipher: not a cipher encoding: "{encoding}"')
        if not isinstance(data, str):
            raise CipherError("Cipher: encrypted data must be a base64 string")
        try:
            blob = base64.b64decode(data, validate=True)
        except binascii.Error as error:
            raise CipherError(f"Cipher: data is not base64: {error}") from None
        if len(blob) < IV_BYTES + 16:
            raise CipherError("Cipher: encrypted data is too short")
        try:
            plaintext = self._aead.decrypt(blob[:IV_BYTES], blob[IV_BYTES:], None)
        except InvalidTag:
            raise CipherError("Cipher: wrong key or tampered data") from None
        try:
            return orjson.loads(plaintext)
        except orjson.JSONDecodeError as error:
            raise CipherError(f"Cipher: plaintext is not JSON: {error}") from None
