"""Exit 0 when USER's entry in the mosquitto password file FILE matches the password on stdin.

Usage: python3 passwd_matches.py FILE USER < password. Exit 1 when the entry is missing, uses
another hash format, or does not match: the caller then (re)writes it with mosquitto_passwd.
The password is read from stdin so that it never appears on a command line.
"""

import base64
import hashlib
import hmac
import sys


def main() -> int:
    path, user = sys.argv[1], sys.argv[2]
    password = sys.stdin.readline().rstrip("\n").encode("utf-8")
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        return 1
    for line in lines:
        name, _, encoded = line.strip().partition(":")
        if name != user:
            continue
        parts = encoded.split("$")
        if len(parts) != 5 or parts[1] != "7":
            return 1
        salt = base64.b64decode(parts[3])
        expected = base64.b64decode(parts[4])
        actual = hashlib.pbkdf2_hmac("sha512", password, salt, int(parts[2]), len(expected))
        return 0 if hmac.compare_digest(actual, expected) else 1
    return 1


if __name__ == "__main__":
    sys.exit(main())
