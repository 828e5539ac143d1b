"""Optional single sign-on: OIDC / JWT bearer tokens from the hospital's identity provider.

A token is accepted when its signature verifies against the configured JWKS (a file, or the
provider's URL inside the hospital network), its issuer and audience match, and it has not
expired. One claim (``roles`` by default) names the service role; values are mapped through
``TRIAGE_OIDC_ROLE_MAP`` or used as they are.
"""

from __future__ import annotations

import json
from functools import cached_property
from typing import Any

import jwt

from triage.settings import Settings
from triage.tokens import Role, TokenRecord
from triage.worklist import utcnow

ALGORITHMS = ["RS256", "RS384", "RS512", "ES256", "ES384", "PS256"]


class OidcValidator:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @cached_property
    def _keys(self) -> jwt.PyJWKSet | jwt.PyJWKClient:
        if self.settings.oidc_jwks_file:
            return jwt.PyJWKSet.from_dict(json.loads(self.settings.oidc_jwks_file.read_text()))
        assert self.settings.oidc_jwks_url
        return jwt.PyJWKClient(self.settings.oidc_jwks_url, cache_keys=True, lifespan=3600)

    def _key(self, token: str) -> Any:
        keys = self._keys
        if isinstance(keys, jwt.PyJWKClient):
            return keys.get_signing_key_from_jwt(token).key
        kid = jwt.get_unverified_header(token).get("kid")
        for key in keys.keys:
            if kid is None or key.key_id == kid:
                return key.key
        raise jwt.InvalidTokenError("no key for this token")

    def validate(self, token: str) -> TokenRecord | None:
        """The caller a valid token names, or ``None``."""
        try:
            claims = jwt.decode(token, self._key(token), algorithms=ALGORITHMS,
                                issuer=self.settings.oidc_issuer,
                                audience=self.settings.oidc_audience,
                                options={"require": ["exp", "iss", "sub"]})
        except (jwt.PyJWTError, ValueError, KeyError):
            return None
        role = self._role(claims.get(self.settings.oidc_role_claim))
        if role is None:
            return None
        owner = str(claims.get("preferred_username") or claims["sub"])
        return TokenRecord(id=f"oidc:{claims['sub']}"[:64], owner=owner, role=role,
                           created_at=utcnow())

    def _role(self, value: Any) -> Role | None:
        values = value if isinstance(value, list) else [value]
        mapped = [self.settings.oidc_role_map.get(str(v), str(v)) for v in values if v]
        for role in (Role.ADMIN, Role.RADIOLOGIST, Role.INTEGRATION):  # the broadest wins
            if role.value in mapped:
                return role
        return None
