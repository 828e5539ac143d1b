"""A real OpenID provider for the sign-in tests: idpyoidc's server behind a few Starlette routes.

All protocol logic (request validation, PKCE, client authentication, codes, tokens, ID token
signing, userinfo) is idpyoidc's; this module only configures it and carries HTTP requests
to its endpoints and their answers back. The configured user is signed in without a form
(idpyoidc's ``NoAuthn``), with a ``roles`` claim.

PKCE is required by idpyoidc's ``pkce`` add-on (``essential``), with S256 as the only method:
an authorization request without a ``code_challenge``, or with ``plain``, is refused.

    python -m tests.oidc_provider --port 9000 --client-id triage \\
        --redirect-uri http://127.0.0.1:8000/auth/oidc/callback --user alice --roles reader
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from typing import Any

import uvicorn
from idpyoidc.message import Message
from idpyoidc.server import Server
from idpyoidc.server.configure import OPConfiguration
from idpyoidc.server.endpoint import Endpoint
from idpyoidc.server.exception import ClientAuthenticationError
from idpyoidc.server.oauth2.add_on.pkce import CC_METHOD
from idpyoidc.server.scopes import SCOPE2CLAIMS
from idpyoidc.server.user_authn.authn_context import INTERNETPROTOCOLPASSWORD
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

ENDPOINTS = {
    "provider_config": (".well-known/openid-configuration",
                        "idpyoidc.server.oidc.provider_config.ProviderConfiguration", {}),
    "authorization": ("authorization", "idpyoidc.server.oidc.authorization.Authorization",
                      {"response_types_supported": ["code"],
                       "response_modes_supported": ["query"]}),
    "token": ("token", "idpyoidc.server.oidc.token.Token", {}),
    "userinfo": ("userinfo", "idpyoidc.server.oidc.userinfo.UserInfo",
                 {"add_claims_by_scope": True}),
}


def client(*, client_id: str, client_secret: str | None, redirect_uri: str) -> dict[str, Any]:
    """The registration of the service at the provider (idpyoidc's client database entry)."""
    registration: dict[str, Any] = {
        "client_id": client_id,
        "redirect_uris": [(redirect_uri, {})],
        "response_types_supported": ["code"],
        "allowed_scopes": ["openid", "profile", "roles"],
        "token_endpoint_auth_method": "client_secret_basic" if client_secret else "none",
        "pkce_essential": True,
    }
    if client_secret:
        registration["client_secret"] = client_secret
    return registration


def configuration(*, issuer: str, user: str, roles: list[str], roles_in_id_token: bool,
                  public_client: bool) -> dict[str, Any]:
    """idpyoidc's OP configuration: one user, PKCE with S256 required."""
    id_token_claims = ["preferred_username", "name"] + (["roles"] if roles_in_id_token else [])
    # The token endpoint accepts what it lists from any client: a public client's "none"
    # is listed only when the client is public, so that a confidential one must authenticate.
    token_authn = ["none"] if public_client else ["client_secret_basic", "client_secret_post"]
    endpoints = {name: {"path": path, "class": cls, "kwargs": kwargs}
                 for name, (path, cls, kwargs) in ENDPOINTS.items()}
    endpoints["token"]["kwargs"] = {"client_authn_method": token_authn}
    return {
        "issuer": issuer,
        "httpc_params": {"verify": False},
        "key_conf": {"key_defs": [{"type": "RSA", "use": ["sig"]}], "uri_path": "jwks"},
        "endpoint": endpoints,
        "authentication": {"anon": {"acr": INTERNETPROTOCOLPASSWORD,
                                    "class": "idpyoidc.server.user_authn.user.NoAuthn",
                                    "kwargs": {"user": user}}},
        "userinfo": {"class": "idpyoidc.server.user_info.UserInfo",
                     "kwargs": {"db": {user: {"sub": user, "preferred_username": user,
                                              "name": user.title(), "roles": roles}}}},
        "scopes_to_claims": {**SCOPE2CLAIMS, "roles": ["roles"]},
        "token_handler_args": {
            "code": {"kwargs": {"lifetime": 600}},
            "token": {"class": "idpyoidc.server.token.jwt_token.JWTToken",
                      "kwargs": {"lifetime": 3600, "alg": "RS256"}},
            "id_token": {"class": "idpyoidc.server.token.id_token.IDToken",
                         "kwargs": {"always_add_claims": id_token_claims}},
        },
        "add_on": {"pkce": {"function": "idpyoidc.server.oauth2.add_on.pkce.add_support",
                            "kwargs": {"essential": True,
                                       "code_challenge_methods": {"S256": CC_METHOD["S256"]}}}},
    }


def _http_info(request: Request) -> dict[str, Any]:
    return {"headers": dict(request.headers), "method": request.method,
            "url": str(request.url), "cookie": None}


def _answer(endpoint: Endpoint, request: Message, info: dict[str, Any]) -> Response:
    """An endpoint's answer as HTTP: a redirect for the authorization endpoint, else a body."""
    if "http_response" in info:
        return Response(info["http_response"], media_type="text/html")
    answer = endpoint.do_response(request=request, **info)
    placement = answer.get("response_placement", endpoint.response_placement)
    response: Response
    if placement == "url":
        response = RedirectResponse(answer["response"], status_code=303)
    else:
        response = Response(answer["response"], status_code=answer.get("response_code", 200))
    for name, value in answer["http_headers"]:
        response.headers[name] = value
    return response


async def _handle(endpoint: Endpoint, request: Request) -> Response:
    """One request to one of idpyoidc's endpoints: parse, process, answer."""
    if request.method == "POST":
        arguments: Any = (await request.body()).decode()
    else:
        arguments = request.url.query
    http_info = _http_info(request)
    try:
        parsed = endpoint.parse_request(arguments, http_info=http_info)
    except ClientAuthenticationError:  # RFC 6749 §5.2
        return Response(Message(error="invalid_client").to_json(), status_code=401,
                        media_type="application/json")
    if "error" in parsed:
        return Response(parsed.to_json(), status_code=400, media_type="application/json")
    info = endpoint.process_request(parsed, http_info=http_info)
    if "error" in info:
        return Response(Message(**info).to_json(), status_code=400,
                        media_type="application/json")
    return _answer(endpoint, parsed, info)


def application(server: Server) -> Starlette:
    def route(name: str, path: str) -> Route:
        endpoint = server.get_endpoint(name)

        async def serve(request: Request) -> Response:
            return await _handle(endpoint, request)

        return Route(f"/{path}", serve, methods=["GET", "POST"])

    async def jwks(request: Request) -> Response:
        """The public signing keys (idpyoidc's key jar exports no private part)."""
        keys = server.keyjar.export_jwks(issuer_id="")
        return Response(Message(**keys).to_json(), media_type="application/json")

    routes = [route(name, path) for name, (path, _, _) in ENDPOINTS.items()]
    routes.append(Route("/jwks", jwks))
    return Starlette(routes=routes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--client-secret")
    parser.add_argument("--redirect-uri", required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--roles", default="", help="comma-separated values of the roles claim")
    parser.add_argument("--roles-in", choices=["id_token", "userinfo"], default="id_token",
                        help="where the roles claim is released")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    issuer = f"http://127.0.0.1:{args.port}"
    with tempfile.TemporaryDirectory(prefix="oidc-provider-") as workdir:
        # idpyoidc keeps its generated cookie and token keys in files under its base path.
        conf = configuration(issuer=issuer, user=args.user,
                             roles=[r for r in args.roles.split(",") if r],
                             roles_in_id_token=args.roles_in == "id_token",
                             public_client=not args.client_secret)
        server = Server(OPConfiguration(conf, base_path=workdir), cwd=workdir)
        server.context.cdb[args.client_id] = client(
            client_id=args.client_id, client_secret=args.client_secret,
            redirect_uri=args.redirect_uri)
        uvicorn.run(application(server), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
