"""`normbench-admin` (or `python -m app.admin`): create, list and revoke API keys in the configured database.

    normbench-admin create-key --owner alice [--name laptop]   # prints the token once
    normbench-admin list-keys [--owner alice]
    normbench-admin revoke-key KEY_ID_OR_PREFIX                 # 401 on the key's next request

It talks to the database of NORMBENCH_DATABASE_URL directly, so whoever can run it on the server can
manage keys; it needs no admin token. The token is printed to stdout only, never logged.
"""

from __future__ import annotations

import argparse
import sys

from app.config import get_settings
from app.db import session_scope
from app.errors import DomainError
from app.services import keys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="normbench-admin", description="Manage NormBench API keys.")
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create-key", help="create a key for an owner and print its token once")
    create.add_argument("--owner", required=True, help="account the key acts as (letters, digits, . _ @ -)")
    create.add_argument("--name", default=None, help="label to recognise the key by")
    listing = sub.add_parser("list-keys", help="list keys (never their secrets)")
    listing.add_argument("--owner", default=None, help="only this owner's keys")
    revoke = sub.add_parser("revoke-key", help="revoke a key by id or prefix; it is refused from the next request")
    revoke.add_argument("key", help="key id or prefix (the part after nb_), as list-keys shows")
    args = parser.parse_args(argv)

    url = get_settings().resolved_database_url
    try:
        with session_scope(url) as session:
            if args.command == "create-key":
                new = keys.create_key(session, args.owner, args.name)
                print(f"created key {new.row.id} (prefix {new.row.prefix}) for owner {new.row.owner}")
                print("token (shown only now; store it, it cannot be recovered):")
                print(new.token)
            elif args.command == "list-keys":
                rows = keys.list_keys(session, args.owner)
                print(f"{'id':<34}{'prefix':<14}{'owner':<24}{'created':<27}status")
                for k in rows:
                    status = f"revoked {k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "active"
                    print(f"{k.id:<34}{k.prefix:<14}{k.owner:<24}{k.created_at:%Y-%m-%d %H:%M:%S%z}  {status}")
            else:
                row = keys.revoke_key(session, args.key)
                print(f"revoked key {row.id} (prefix {row.prefix}) of owner {row.owner}")
    except DomainError as e:
        print(f"error: {e.detail}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
