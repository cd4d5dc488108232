"""The PostgreSQL the machine (and CI) runs on 127.0.0.1:5432: trust auth, database ``test``.

Tests and benchmarks that need it make a database of their own through this connection, and
skip (or say) why when there is none.
"""

from __future__ import annotations

#: The administrative connection: databases are created and dropped through it.
DSN = "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=3"


def unavailable() -> str | None:
    """Why PostgreSQL cannot be used here, or None when it can."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed (pip install 'psycopg[binary]')"
    try:
        with psycopg.connect(DSN, autocommit=True):
            return None
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"no PostgreSQL on 127.0.0.1:5432 (trust auth, database 'test'): {reason}"
