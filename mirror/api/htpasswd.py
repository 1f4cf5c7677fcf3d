"""htpasswd files: which entries this mirror checks, how, and the ones it refuses at load.

Checked: bcrypt (`$2y$`/`$2a$`/`$2b$`, cost 4-17, what `mirror user add` and `htpasswd -B`
write), apr1 MD5 (`$apr1$`, the `htpasswd` tool's default) and `$1$`, and SHA1 (`{SHA}`).
Refused when the file is loaded, with the file, line and user named (never the stored
value): DES crypt (it reads only the first 8 characters of a password), plain text,
damaged hashes and duplicate users. So a login can never be a 500 at request time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import bcrypt

from .. import config as cfg

log = logging.getLogger("mirror")

BCRYPT_LIMIT = 72           # bytes of a password that bcrypt uses
BCRYPT_COSTS = range(4, 18)  # what `htpasswd -C` accepts; 18 would be ~20 s per login


class HtpasswdError(cfg.ConfigError):
    """The htpasswd file cannot be used; the message names the file, line and user."""


# 22 characters of salt and 31 of hash. The last character of each carries a few unused
# bits that must be zero: bcrypt raises "Invalid salt" at check time for a salt where not.
BCRYPT = re.compile(r"\$2[aby]\$([0-9]{2})\$[./A-Za-z0-9]{21}[.Oeu][./A-Za-z0-9]{30}"
                    r"[.CGKOSWaeimquy26]")
# The salt: up to 8 printable ASCII characters other than "$" (what openssl passwd takes).
MD5_CRYPT = re.compile(r"\$(apr1|1)\$([!-#%-~]{0,8})\$[./0-9A-Za-z]{22}")
SHA1 = re.compile(r"\{SHA\}[A-Za-z0-9+/]{27}=")
DES_CRYPT = re.compile(r"[./0-9A-Za-z]{13}")
ITOA64 = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Entry:
    name: str
    scheme: str  # "bcrypt", "apr1", "md5" ($1$) or "sha1"
    hashed: str


def htpasswd_entry(line: str, where: str) -> Entry | None:
    """One line of an htpasswd file: an Entry, None for a blank or comment line, or an
    HtpasswdError for what the `htpasswd` tool writes but this mirror refuses to check."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    name, sep, hashed = text.partition(":")
    if not sep or not name:
        raise HtpasswdError(f"{where}: not NAME:HASH")
    if m := BCRYPT.fullmatch(hashed):
        if int(m.group(1)) not in BCRYPT_COSTS:
            raise HtpasswdError(f"{where}: user {name}: bcrypt cost {m.group(1)} is outside "
                                f"{BCRYPT_COSTS.start}-{BCRYPT_COSTS.stop - 1}")
        return Entry(name, "bcrypt", hashed)
    if m := MD5_CRYPT.fullmatch(hashed):
        return Entry(name, "apr1" if m.group(1) == "apr1" else "md5", hashed)
    if SHA1.fullmatch(hashed):
        return Entry(name, "sha1", hashed)
    again = f"set the password again with `mirror user add {name}` (or `htpasswd -B`)"
    if DES_CRYPT.fullmatch(hashed):
        raise HtpasswdError(f"{where}: user {name}: crypt (DES) hashes are refused, they "
                            f"use only the first 8 characters of a password; {again}")
    for prefix, scheme in (("$2", "bcrypt"), ("$apr1$", "apr1"), ("$1$", "MD5"), ("{SHA}", "SHA1")):
        if hashed.startswith(prefix):
            raise HtpasswdError(f"{where}: user {name}: a damaged or unsupported {scheme} "
                                f"hash; {again}")
    # Never echo the value: it may be a plain-text password.
    raise HtpasswdError(f"{where}: user {name}: a plain-text password or an unknown hash "
                        f"(accepted: bcrypt $2y$, apr1 $apr1$, MD5 $1$, SHA1 {{SHA}}); {again}")


def read_htpasswd(path: str | Path) -> dict[str, Entry]:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise HtpasswdError(f"access.htpasswd: cannot read {path}: {e.strerror}") from e
    users: dict[str, Entry] = {}
    for number, raw in enumerate(data.split(b"\n"), 1):
        where = f"access.htpasswd {path} line {number}"
        try:
            entry = htpasswd_entry(raw.decode("utf-8"), where)
        except UnicodeDecodeError:
            raise HtpasswdError(f"{where}: not UTF-8 text") from None
        if entry is None:
            continue
        if entry.name in users:
            raise HtpasswdError(f"{where}: user {entry.name} appears twice")
        users[entry.name] = entry
    return users


def add_user(path: str | Path, name: str, password: str) -> bool:
    """Add or replace `name` in an htpasswd file (bcrypt); True when it was new."""
    if not name or ":" in name or name.startswith("#") or any(c.isspace() for c in name):
        raise ValueError(f"invalid user name {name!r}: no colons or spaces, no leading #")
    if len(password.encode()) > BCRYPT_LIMIT:
        raise ValueError(f"the password is {len(password.encode())} bytes; bcrypt uses only "
                         f"the first {BCRYPT_LIMIT}, so choose one of at most {BCRYPT_LIMIT}")
    path = Path(path)
    # The directory is not made here: a missing one is most often a typo in the path, and a
    # password file belongs in a directory whose owner and mode someone chose.
    if not path.parent.is_dir():
        raise HtpasswdError(f"cannot write {path}: the directory {path.parent} does not exist "
                            f"(create it first: mkdir -p {path.parent})")
    try:
        lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    except (OSError, UnicodeDecodeError) as e:
        raise HtpasswdError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    kept = [line for line in lines if line.partition(":")[0] != name]
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt()).decode()
    temporary = path.with_name(path.name + ".tmp")
    try:
        temporary.write_text("\n".join(kept + [f"{name}:{hashed}"]) + "\n", encoding="utf-8")
        temporary.chmod(0o600)
        temporary.replace(path)  # never a half-written password file
    except OSError as e:
        temporary.unlink(missing_ok=True)
        # The temporary file is ours, not the operator's: name the file they asked for.
        raise HtpasswdError(f"cannot write {path}: {e.strerror or e}") from None
    return len(kept) == len(lines)


def md5_crypt(password: bytes, salt: bytes, magic: bytes = b"$apr1$") -> bytes:
    """Poul-Henning Kamp's MD5 crypt: `$apr1$` as Apache's htpasswd writes it by default,
    `$1$` as glibc's crypt (the same algorithm; only the magic string differs)."""
    salt = salt[:8]
    alternate = hashlib.md5(password + salt + password).digest()
    context = hashlib.md5(password + magic + salt)
    for left in range(len(password), 0, -16):
        context.update(alternate[:min(left, 16)])
    bits = len(password)
    while bits:
        context.update(b"\0" if bits & 1 else password[:1])
        bits >>= 1
    digest = context.digest()
    for i in range(1000):  # slows a guesser down, a little
        step = hashlib.md5(password if i & 1 else digest)
        if i % 3:
            step.update(salt)
        if i % 7:
            step.update(password)
        step.update(digest if i & 1 else password)
        digest = step.digest()
    groups = [(digest[a] << 16) | (digest[b] << 8) | digest[c]
              for a, b, c in ((0, 6, 12), (1, 7, 13), (2, 8, 14), (3, 9, 15), (4, 10, 5))]
    encoded = "".join(_to64(value, 4) for value in groups) + _to64(digest[11], 2)
    return magic + salt + b"$" + encoded.encode()


def _to64(value: int, count: int) -> str:
    return "".join(ITOA64[(value >> 6 * i) & 0x3F] for i in range(count))


def verify(entry: Entry, password: bytes) -> bool:
    """Whether `password` matches `entry`; never raises for an entry htpasswd_entry made."""
    hashed = entry.hashed.encode()
    if entry.scheme == "bcrypt":
        # bcrypt defines a password by its first 72 bytes (as Apache's htpasswd and
        # Distribution's Go bcrypt check it); bcrypt>=5 raises instead of truncating.
        try:
            return bcrypt.checkpw(password[:BCRYPT_LIMIT], hashed)
        except ValueError:  # a hash BCRYPT accepted but bcrypt cannot read: a wrong login
            log.error("user %s: bcrypt cannot read this htpasswd entry", entry.name)
            return False
    if entry.scheme in ("apr1", "md5"):
        magic, _, rest = hashed[1:].partition(b"$")
        salt = rest.partition(b"$")[0]
        return hmac.compare_digest(md5_crypt(password, salt, b"$" + magic + b"$"), hashed)
    return hmac.compare_digest(
        b"{SHA}" + base64.b64encode(hashlib.sha1(password).digest()), hashed)


def dummy_entry(users: dict[str, Entry]) -> Entry:
    """An entry no password matches, as slow to check as the file's usual one: what an
    unknown user is checked against, so a wrong name costs as much as a wrong password."""
    shapes = Counter((e.scheme, e.hashed[:7] if e.scheme == "bcrypt" else "")
                     for e in users.values())
    scheme, prefix = shapes.most_common(1)[0][0] if shapes else ("bcrypt", "")
    if scheme == "bcrypt":
        cost = int(prefix[4:6]) if prefix else 12  # 12: what `mirror user add` writes
        return Entry("", scheme, bcrypt.gensalt(cost).decode() + "." * 31)
    if scheme in ("apr1", "md5"):
        salt = "".join(ITOA64[b & 0x3F] for b in os.urandom(8))
        return Entry("", scheme, f"${'apr1' if scheme == 'apr1' else '1'}${salt}${'.' * 22}")
    return Entry("", scheme, "{SHA}" + base64.b64encode(os.urandom(20)).decode())
