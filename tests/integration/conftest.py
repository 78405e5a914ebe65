"""Fixtures shared by the integration tests that need them in more than one module."""

from __future__ import annotations

import uuid

import pytest

from helpers import query
from roles import GROUPS, apply_roles_sql, as_user


@pytest.fixture
def logins(database_url):
    """roles.sql applied with per-test group roles, and one login user in each; all dropped after."""
    suffix = uuid.uuid4().hex[:8]
    roles = {group: f"test_{group}_{suffix}" for group in GROUPS}
    roles["definer"] = f"test_definer_{suffix}"  # owns the auditors' definer function; no login
    first_run = apply_roles_sql(database_url, roles)
    users = {group: f"{roles[group]}_user" for group in GROUPS}
    for group, user in users.items():
        query(database_url, f"CREATE ROLE {user} LOGIN PASSWORD 'pw-{user}' IN ROLE {roles[group]}")
    yield {
        "roles": roles,
        "first_run": first_run,
        **{group: as_user(database_url, user) for group, user in users.items()},
    }
    everyone = ", ".join([*users.values(), *roles.values()])
    query(database_url, f"DROP OWNED BY {everyone} CASCADE; DROP ROLE {everyone}")
