"""The admins' console: queues, workers, jobs, deliveries, models, tokens, the audit trail,
and charts of the pipeline's timings. Admin role only; every action is audited as its
``/api/v1/admin`` counterpart is, and calls the same core functions. Panels refresh on their
own every few seconds (background requests, which do not keep a session alive).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, HTTPException, Request, Response, status
from starlette.concurrency import run_in_threadpool

from triage.admin import (
    JOB_STATES,
    JobNotFound,
    delete_job,
    jobs_in,
    queue_depths,
    requeue,
    requeue_all,
    workers,
)
from triage.api.deps import audit
from triage.api.routes.admin import get_models
from triage.audit import AuditAction, verify
from triage.delivery import retry_failed, undelivered
from triage.ris.store import REJECTED_KEEP, rejected_messages
from triage.tokens import (
    DEFAULT_TOKEN_DAYS,
    Role,
    TokenNotFound,
    create_token,
    list_tokens,
    revoke_token,
    verify_token,
)

from .pages import page_user
from .render import page
from .vigilance import page_context as vigilance_context

router = APIRouter(include_in_schema=False)
ADMINS = (Role.ADMIN,)
PANELS = ("queues", "workers", "jobs", "deliveries", "models", "tokens")


@router.get("/admin")
async def console(request: Request) -> Response:
    await page_user(request, ADMINS)
    return page(request, "admin.html", panels=PANELS, states=JOB_STATES)


@router.get("/admin/vigilance")
async def vigilance(request: Request) -> Response:
    """The vigilance page: its figures, alerts, shadow comparison and version states are read
    by the page's script from the ``/api/v1/admin/vigilance`` routes, with the session."""
    await page_user(request, ADMINS)
    return page(request, "vigilance.html", **vigilance_context(request))


@router.get("/admin/ris")
async def rejected_hl7(request: Request, limit: str = "100") -> Response:
    """HL7 v2 messages from the RIS that the listener did not accept, newest first (a
    mangled ``limit`` shows the latest 100, never an error page)."""
    user = await page_user(request, ADMINS)
    shown = min(max(int(limit), 1), REJECTED_KEEP) if limit.strip().isdigit() else 100
    messages = await run_in_threadpool(rejected_messages, request.app.state.redis, shown)
    # The excerpts hold patient data: who read them is audited.
    await run_in_threadpool(audit, request, user, AuditAction.HL7_REJECTED_VIEWED,
                            details={"messages": len(messages), "via": "page"})
    return page(request, "admin_ris.html", messages=messages, limit=shown)


def _panel_context(request: Request, name: str, state: str) -> dict[str, Any]:
    connection = request.app.state.redis
    if name == "queues":
        return {"queues": queue_depths(connection)}
    if name == "workers":
        return {"workers": workers(connection)}
    if name == "jobs":
        if state not in JOB_STATES:
            state = "failed"
        return {"jobs": jobs_in(connection, state, 100), "state": state}
    if name == "deliveries":
        return {"deliveries": undelivered(connection)}
    if name == "models":
        return {"models": get_models(request.state.user, request.app.state.settings)}
    return {"tokens": list_tokens(connection)}


@router.get("/ui/admin/panel/{name}")
async def panel(name: str, request: Request, state: str = "failed") -> Response:
    request.state.user = await page_user(request, ADMINS)
    if name not in PANELS:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such panel")
    context = await run_in_threadpool(_panel_context, request, name, state)
    return page(request, f"admin_{name}.html", states=JOB_STATES, **context)


async def _after(request: Request, name: str, message: str, *, state: str = "failed",
                 error: bool = False, **extra: Any) -> Response:
    context = await run_in_threadpool(_panel_context, request, name, state)
    return page(request, f"admin_{name}.html", states=JOB_STATES, message=message,
                error=error, status_code=409 if error else 200, **context, **extra)


@router.post("/ui/admin/jobs/{job_id}/requeue")
async def requeue_job(job_id: str, request: Request) -> Response:
    admin = request.state.user = await page_user(request, ADMINS)
    try:
        await run_in_threadpool(requeue, request.app.state.redis, job_id, by=admin.owner)
    except JobNotFound as exc:
        return await _after(request, "jobs", str(exc), error=True)
    await run_in_threadpool(audit, request, admin, AuditAction.JOB_REQUEUED,
                            details={"jobs": [job_id], "via": "console"})
    return await _after(request, "jobs", f"Requeued {job_id}.")


@router.post("/ui/admin/jobs/{job_id}/delete")
async def remove_job(job_id: str, request: Request,
                     state: Annotated[str, Form(max_length=16)] = "failed") -> Response:
    admin = request.state.user = await page_user(request, ADMINS)
    try:
        await run_in_threadpool(delete_job, request.app.state.redis, job_id)
    except JobNotFound as exc:
        return await _after(request, "jobs", str(exc), state=state, error=True)
    await run_in_threadpool(audit, request, admin, AuditAction.JOB_DELETED,
                            details={"jobs": [job_id], "via": "console"})
    return await _after(request, "jobs", f"Deleted {job_id}.", state=state)


@router.post("/ui/admin/jobs/requeue-failed")
async def requeue_failed(request: Request) -> Response:
    admin = request.state.user = await page_user(request, ADMINS)
    requeued = await run_in_threadpool(requeue_all, request.app.state.redis, by=admin.owner)
    await run_in_threadpool(audit, request, admin, AuditAction.JOB_REQUEUED,
                            details={"jobs": requeued, "via": "console"})
    return await _after(request, "jobs", f"Requeued {len(requeued)} failed jobs.")


@router.post("/ui/admin/deliveries/retry")
async def retry_deliveries(request: Request) -> Response:
    admin = request.state.user = await page_user(request, ADMINS)
    retried = await run_in_threadpool(retry_failed, request.app.state.redis)
    await run_in_threadpool(audit, request, admin, AuditAction.JOB_REQUEUED,
                            details={"deliveries": retried, "via": "console"})
    return await _after(request, "deliveries", f"Retrying {len(retried)} deliveries.")


@router.post("/ui/admin/tokens")
async def new_token(request: Request, owner: Annotated[str, Form(min_length=1, max_length=128)],
                    role: Annotated[Role, Form()],
                    days: Annotated[int, Form(ge=1, le=3650)] = DEFAULT_TOKEN_DAYS) -> Response:
    admin = request.state.user = await page_user(request, ADMINS)
    connection = request.app.state.redis
    token = await run_in_threadpool(create_token, connection, role=role, owner=owner.strip(),
                                    days=days)
    record = await run_in_threadpool(verify_token, connection, token)
    assert record is not None
    await run_in_threadpool(audit, request, admin, AuditAction.TOKEN_CREATED,
                            details={"token_id": record.id, "owner": owner,
                                     "role": role.value, "via": "console"})
    # Shown once, in this answer only (never stored, and the answer is not cached).
    return await _after(request, "tokens", f"Token created for {owner}: copy it now, it is "
                        "shown once.", created=token)


@router.post("/ui/admin/tokens/{token_id}/revoke")
async def revoke(token_id: str, request: Request) -> Response:
    admin = request.state.user = await page_user(request, ADMINS)
    try:
        await run_in_threadpool(revoke_token, request.app.state.redis, token_id)
    except TokenNotFound as exc:
        return await _after(request, "tokens", str(exc), error=True)
    await run_in_threadpool(audit, request, admin, AuditAction.TOKEN_REVOKED,
                            details={"token_id": token_id, "via": "console"})
    return await _after(request, "tokens", f"Token {token_id} revoked.")


@router.post("/ui/admin/audit/verify")
async def verify_audit(request: Request) -> Response:
    await page_user(request, ADMINS)
    result = await run_in_threadpool(verify, request.app.state.redis)
    return page(request, "admin_audit.html", verification=result)
