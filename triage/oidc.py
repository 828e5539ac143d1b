"""Optional single sign-on with the hospital's identity provider (OpenID Connect).

Two ways in, one claim mapping:

- API clients send a JWT bearer token from the provider (``OidcValidator``). It is accepted
  when its signature verifies against the configured JWKS (a file, or the provider's URL
  inside the hospital network), its issuer and audience match, and it has not expired.
- People sign in from the browser with the authorization code flow and PKCE (RFC 7636)
  (``OidcClient``; the pages are ``triage.web.oidc_signin``). The ID token is validated as
  OpenID Connect Core 1.0 §3.1.3.7 asks: signature against the provider's published keys,
  issuer, audience, expiry, nonce, and ``at_hash`` when present.

One claim (``roles`` by default) names the service role; values are mapped through
``TRIAGE_OIDC_ROLE_MAP`` or used as they are.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from functools import cached_property
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import jwt

from triage.settings import Settings
from triage.tokens import Role, TokenRecord
from triage.worklist import utcnow

ALGORITHMS = ["RS256", "RS384", "RS512", "ES256", "ES384", "PS256"]
# How long the provider's discovery document is kept before it is read again.
DEFAULT_DISCOVERY_SECONDS = 3600
# Every request to the provider gives up after this long: a person is waiting.
DEFAULT_PROVIDER_TIMEOUT = 5.0
# Clocks of the provider and this server may differ by this much.
DEFAULT_CLOCK_SKEW_SECONDS = 60


class SignInError(Exception):
    """Signing in through the identity provider failed.

    ``reason`` is a short code for the log and the audit trail; the message can be shown to
    the person signing in. Neither ever holds a token.
    """

    def __init__(self, reason: str, message: str, *, status_code: int = 400) -> None:
        super().__init__(message)
        self.reason = reason
        self.status_code = status_code


def service_role(settings: Settings, value: Any) -> Role | None:
    """The service role a role claim names (a value or a list), the broadest if several."""
    values = value if isinstance(value, list) else [value]
    mapped = [settings.oidc_role_map.get(str(v), str(v)) for v in values if v]
    for role in (Role.ADMIN, Role.RADIOLOGIST, Role.INTEGRATION):
        if role.value in mapped:
            return role
    return None


def account_name(claims: dict[str, Any]) -> str:
    """The name people know the account by: ``preferred_username``, else the subject."""
    return str(claims.get("preferred_username") or claims["sub"])


def user_record(claims: dict[str, Any], role: Role) -> TokenRecord:
    return TokenRecord(id=f"oidc:{claims['sub']}"[:64], owner=account_name(claims), role=role,
                       created_at=utcnow())


class OidcValidator:
    """Validates JWT bearer tokens the identity provider issued to API clients."""

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
        role = service_role(self.settings, claims.get(self.settings.oidc_role_claim))
        return user_record(claims, role) if role is not None else None


# -- the browser sign-in: authorization code flow with PKCE --------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def pkce_pair() -> tuple[str, str]:
    """A PKCE code verifier (86 characters, RFC 7636 §4.1) and its S256 code challenge."""
    verifier = secrets.token_urlsafe(64)
    return verifier, _b64url(hashlib.sha256(verifier.encode("ascii")).digest())


def verify_id_token(token: str, key: Any, *, issuer: str, client_id: str, nonce: str,
                    access_token: str | None = None,
                    leeway: float = DEFAULT_CLOCK_SKEW_SECONDS) -> dict[str, Any]:
    """The claims of an ID token (OpenID Connect Core 1.0 §3.1.3.7), or ``SignInError``.

    ``key`` is the provider's public key the token names; ``nonce`` the one this service
    sent with the authorization request.
    """
    try:
        claims: dict[str, Any] = jwt.decode(
            token, key, algorithms=ALGORITHMS, issuer=issuer, audience=client_id,
            leeway=leeway, options={"require": ["iss", "sub", "aud", "exp", "iat"]})
    except jwt.PyJWTError as exc:
        raise SignInError("invalid-id-token", "The identity provider's answer could not be "
                          "verified.") from exc
    audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
    azp = claims.get("azp")
    if (len(audiences) > 1 or azp is not None) and azp != client_id:
        raise SignInError("invalid-id-token", "The identity provider's answer was meant for "
                          "another service.")
    if not hmac.compare_digest(str(claims.get("nonce", "")).encode(), nonce.encode()):
        raise SignInError("wrong-nonce", "The identity provider's answer does not belong to "
                          "this sign-in.")
    if access_token is not None and "at_hash" in claims:
        algorithm = jwt.get_algorithm_by_name(jwt.get_unverified_header(token)["alg"])
        digest = algorithm.compute_hash_digest(access_token.encode("ascii"))
        if not hmac.compare_digest(str(claims["at_hash"]), _b64url(digest[:len(digest) // 2])):
            raise SignInError("invalid-id-token", "The identity provider's answer could not "
                              "be verified.")
    return claims


class OidcClient:
    """This service as a relying party of the identity provider: discovery, the
    authorization request, the code exchange, ID token validation and userinfo.

    Network and protocol failures come out as ``SignInError``.
    """

    def __init__(self, settings: Settings) -> None:
        assert settings.oidc_issuer and settings.oidc_client_id
        self.settings = settings
        self.issuer: str = settings.oidc_issuer
        self.client_id: str = settings.oidc_client_id
        self._metadata: dict[str, Any] | None = None
        self._metadata_read_at = 0.0
        self._key_sets: dict[str, jwt.PyJWKClient] = {}

    async def _call(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            async with httpx.AsyncClient(timeout=DEFAULT_PROVIDER_TIMEOUT) as client:
                return await client.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            raise SignInError("provider-unreachable", "The identity provider cannot be "
                              "reached. Try again in a moment.", status_code=502) from exc

    async def metadata(self) -> dict[str, Any]:
        """The provider's discovery document (OpenID Connect Discovery 1.0 §4), cached."""
        if (self._metadata is not None
                and time.monotonic() - self._metadata_read_at < DEFAULT_DISCOVERY_SECONDS):
            return self._metadata
        response = await self._call(
            "GET", f"{self.issuer.rstrip('/')}/.well-known/openid-configuration")
        try:
            response.raise_for_status()
            metadata = response.json()
            endpoints = [metadata[name] for name in
                         ("authorization_endpoint", "token_endpoint", "jwks_uri")]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            raise SignInError("bad-discovery", "The identity provider's configuration could "
                              "not be read.", status_code=502) from exc
        # §4.3: the document must name the issuer it was read from (mix-up protection).
        if metadata.get("issuer") != self.issuer or not all(isinstance(e, str)
                                                             for e in endpoints):
            raise SignInError("bad-discovery", "The identity provider's configuration names "
                              "another issuer.", status_code=502)
        self._metadata, self._metadata_read_at = metadata, time.monotonic()
        return metadata

    async def authorization_url(self, *, redirect_uri: str, state: str, nonce: str,
                                code_challenge: str) -> str:
        metadata = await self.metadata()
        query = urlencode({
            "response_type": "code", "client_id": self.client_id, "redirect_uri": redirect_uri,
            "scope": self.settings.oidc_scopes, "state": state, "nonce": nonce,
            "code_challenge": code_challenge, "code_challenge_method": "S256"})
        endpoint: str = metadata["authorization_endpoint"]
        return f"{endpoint}{'&' if '?' in endpoint else '?'}{query}"

    def _client_authentication(self, metadata: dict[str, Any], form: dict[str, str]
                               ) -> dict[str, str]:
        """Headers for the token request; adds the client to ``form`` where it goes there."""
        secret = self.settings.oidc_client_secret
        if not secret:
            form["client_id"] = self.client_id  # a public client: PKCE alone
            return {}
        methods = metadata.get("token_endpoint_auth_methods_supported",
                               ["client_secret_basic"])
        if "client_secret_basic" in methods:
            # RFC 6749 §2.3.1: both are form-encoded before Basic encoding.
            pair = f"{quote(self.client_id, safe='')}:{quote(secret, safe='')}"
            return {"Authorization": f"Basic {base64.b64encode(pair.encode()).decode()}"}
        form.update(client_id=self.client_id, client_secret=secret)
        return {}

    async def exchange_code(self, *, code: str, code_verifier: str,
                            redirect_uri: str) -> dict[str, Any]:
        """The token response for an authorization code (RFC 6749 §4.1.3, RFC 7636 §4.5)."""
        metadata = await self.metadata()
        form = {"grant_type": "authorization_code", "code": code,
                "redirect_uri": redirect_uri, "code_verifier": code_verifier}
        headers = self._client_authentication(metadata, form)
        response = await self._call("POST", metadata["token_endpoint"], data=form,
                                    headers={**headers, "Accept": "application/json"})
        try:
            tokens = response.json()
        except ValueError:
            tokens = {}
        if response.status_code != 200 or not isinstance(tokens, dict):
            raise SignInError("token-refused", "The identity provider refused to complete "
                              "the sign-in. Start again.")
        if not isinstance(tokens.get("id_token"), str):
            raise SignInError("no-id-token", "The identity provider sent no identity.",
                              status_code=502)
        return tokens

    def id_token_claims(self, token: str, *, nonce: str, jwks_uri: str,
                        access_token: str | None) -> dict[str, Any]:
        """The verified claims of an ID token. Blocking: may fetch the provider's keys."""
        keys = self._key_sets.get(jwks_uri)
        if keys is None:
            keys = self._key_sets[jwks_uri] = jwt.PyJWKClient(
                jwks_uri, cache_keys=True, lifespan=DEFAULT_DISCOVERY_SECONDS,
                timeout=DEFAULT_PROVIDER_TIMEOUT)
        try:
            key = keys.get_signing_key_from_jwt(token).key
        except jwt.PyJWKClientConnectionError as exc:
            raise SignInError("provider-unreachable", "The identity provider's keys cannot be "
                              "read. Try again in a moment.", status_code=502) from exc
        except jwt.PyJWTError as exc:
            raise SignInError("invalid-id-token", "The identity provider's answer could not "
                              "be verified.") from exc
        return verify_id_token(token, key, issuer=self.issuer, client_id=self.client_id,
                               nonce=nonce, access_token=access_token)

    async def userinfo(self, access_token: str, subject: str) -> dict[str, Any]:
        """The userinfo claims of the signed-in account (OpenID Connect Core 1.0 §5.3)."""
        metadata = await self.metadata()
        endpoint = metadata.get("userinfo_endpoint")
        if not isinstance(endpoint, str):
            return {}
        response = await self._call("GET", endpoint, headers={
            "Authorization": f"Bearer {access_token}", "Accept": "application/json"})
        try:
            response.raise_for_status()
            claims = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise SignInError("userinfo-refused", "The identity provider did not say who you "
                              "are. Start again.", status_code=502) from exc
        # §5.3.2: claims about another subject must not be used.
        if not isinstance(claims, dict) or claims.get("sub") != subject:
            raise SignInError("userinfo-mismatch", "The identity provider's answer does not "
                              "belong to this sign-in.", status_code=502)
        return claims

    async def role(self, claims: dict[str, Any], access_token: str | None) -> Role | None:
        """The service role from the ID token's role claim, else from userinfo."""
        claim = self.settings.oidc_role_claim
        value = claims.get(claim)
        if value is None and access_token:
            value = (await self.userinfo(access_token, claims["sub"])).get(claim)
        return service_role(self.settings, value)
