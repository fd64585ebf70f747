"""Which arm of an experiment serves a user: the one stable hash, shared by every router.

The client-side ``ABTestingRouter`` (``abtest.py``) and the router model inside Triton
(``triton/python_model/router.py``) both call ``bucket``, so a user lands in the same arm
whichever client asks, in every process, on every Python version and after any restart.
Python's built-in ``hash()`` would not do: it is salted per process for ``str``.

``bucket(user_id, salt)`` maps a user to a number in [0, 1): the first 8 bytes of BLAKE2b over
the salt and the user id, as a fraction of 2**64. A user goes to arm A when the bucket is below
``traffic_split`` (the share of users A serves, as in the module guide 10.4). Raising B's share
(lowering ``traffic_split``) moves users from A to B only; nobody already in B goes back. A
different salt (each experiment defaults to its own name) splits users independently.

A user id is a ``str`` or an ``int``: ``42`` and ``"42"`` are the same user (an int is hashed
as its decimal text), so a client with integer ids and one sending strings agree. Over Triton
the id travels as a BYTES tensor ``user_id`` of shape [batch, 1].
"""

from __future__ import annotations

import hashlib

#: The router model's extra input (BYTES, one id per row) and extra output (BYTES: the model
#: name of the arm that answered each row).
USER_ID_INPUT = "user_id"
ARM_OUTPUT = "arm"
#: Longest user id accepted, in UTF-8 bytes (ids are keys, not payloads).
MAX_USER_ID_BYTES = 256
# One byte that cannot occur in UTF-8 text between salt and id: ("ab", "c") != ("a", "bc").
_SEPARATOR = b"\xff"
_SCALE = float(2**64)


class UserIdError(ValueError):
    """A user id that cannot be routed (wrong type, empty, too long, not UTF-8)."""


def user_key(user_id) -> bytes:
    """The bytes a user id is hashed as: UTF-8 text of a ``str`` (or of an ``int``'s decimal
    form); ``bytes`` as sent over Triton must be UTF-8 text."""
    if isinstance(user_id, bool):
        raise UserIdError(f"user id {user_id!r} is a bool; use a str or an int")
    if isinstance(user_id, int):
        return str(user_id).encode("ascii")
    if isinstance(user_id, str):
        key = user_id.encode("utf-8")
    elif isinstance(user_id, (bytes, bytearray, memoryview)):
        key = bytes(user_id)
        try:
            key.decode("utf-8")
        except UnicodeDecodeError:
            raise UserIdError(f"user id {key[:32]!r} is not UTF-8 text") from None
    else:
        raise UserIdError(f"user id {user_id!r} is a {type(user_id).__name__}; use a str or an int")
    if not key:
        raise UserIdError("user id is empty")
    if len(key) > MAX_USER_ID_BYTES:
        raise UserIdError(f"user id is {len(key)} bytes long; at most {MAX_USER_ID_BYTES} allowed")
    return key


def bucket(user_id, salt: str) -> float:
    """The user's place in [0, 1) for this salt: uniform over users, the same everywhere."""
    digest = hashlib.blake2b(
        salt.encode("utf-8") + _SEPARATOR + user_key(user_id), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big") / _SCALE


def goes_to_a(user_id, traffic_split: float, salt: str) -> bool:
    """True when the user belongs to arm A under ``traffic_split`` (A's share of users)."""
    return bucket(user_id, salt) < traffic_split


def mirrored(user_id, shadow_fraction: float, salt: str) -> bool:
    """Shadow mode: True for the users whose requests are also sent to B. They are exactly the
    users an A/B split of ``1 - shadow_fraction`` would give to B, so a shadow run followed by
    that A/B test sees the same users on B."""
    return bucket(user_id, salt) >= 1.0 - shadow_fraction


__all__ = [
    "ARM_OUTPUT",
    "MAX_USER_ID_BYTES",
    "USER_ID_INPUT",
    "UserIdError",
    "bucket",
    "goes_to_a",
    "mirrored",
    "user_key",
]
