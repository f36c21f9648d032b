"""The labelling web app: FastAPI routes over `alignkit.feedback.db`, server-rendered pages from `templates`.

    app = create_app("sqlite:///labels.db", per_prompt=3)      # then uvicorn.run(app, ...)

Routes: /login (the only one open without a session), /logout, / (to /label or /admin), /label (GET: the
labeler's current prompt, POST: submit), /skip, /admin (progress, agreement, new labelers),
/admin/export?format=rankings|pairs. Sessions and CSRF: `alignkit.feedback.auth`. Every response carries
a Content-Security-Policy that only allows the app's own inline script and stylesheet.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from alignkit.errors import UserError
from alignkit.feedback import db
from alignkit.feedback.auth import COOKIE, Forbidden, NeedSignIn, Session, check_csrf, new_cookie, session_of
from alignkit.feedback.forms import DIMENSIONS, FLAGS, MAX_NOTE, SCALE, FormError, parse_label_form
from alignkit.feedback.report import NOTHING_TO_EXPORT, export_rows, progress
from alignkit.feedback.templates import CSP, environment

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # a completion's name on the page: db.MAX_K = 26 at most


@dataclass
class Context:
    engine: object
    secret: bytes
    env: object
    per_prompt: int
    secure_cookies: bool
    max_age: float
    rng: random.Random | None

    def set_cookie(self, response: Response, value: str) -> None:
        response.set_cookie(COOKIE, value, max_age=int(self.max_age), httponly=True, samesite="lax",
                            secure=self.secure_cookies)

    def page(self, name: str, s: Session, status: int = 200, **values) -> HTMLResponse:
        values = {"user": s.labeler, "csrf": s.csrf, "error": None, **values}
        response = HTMLResponse(self.env.get_template(name).render(**values), status_code=status)
        if s.fresh:
            self.set_cookie(response, s.fresh)
        return response

    def label_page(self, s: Session, status: int = 200, error: str | None = None) -> HTMLResponse:
        item = db.current_assignment(self.engine, s.labeler["id"], self.per_prompt, self.rng)
        if item is None:
            return self.page("done", s, status=status, error=error)
        return self.page("label", s, status=status, error=error, item=item, dims=DIMENSIONS, scale=SCALE,
                         flag_kinds=FLAGS, max_note=MAX_NOTE, letters=LETTERS,
                         default_ranking=json.dumps(list(range(len(item["shown"])))))


def session(request: Request) -> Session:
    ctx: Context = request.app.state.ctx
    return session_of(ctx.secret, request.cookies.get(COOKIE), ctx.max_age,
                      lambda labeler_id: db.find_labeler(ctx.engine, labeler_id=labeler_id))


def signed_in(s: Session = Depends(session)) -> Session:
    if s.labeler is None:
        raise NeedSignIn()
    return s


def admin(s: Session = Depends(signed_in)) -> Session:
    if not s.labeler["is_admin"]:
        raise Forbidden()
    return s


async def form_data(request: Request) -> dict[str, list[str]]:
    """The form's fields as name -> values (uploads are ignored)."""
    out: dict[str, list[str]] = {}
    for key, value in (await request.form()).multi_items():
        out.setdefault(key, []).append(value if isinstance(value, str) else "")
    return out


def _assignment_id(form: dict) -> int:
    try:
        assignment_id = int(form.get("assignment_id", [""])[0])
    except ValueError:
        raise FormError("field 'assignment_id' must be an integer") from None
    if not 0 < assignment_id < 2**31:  # an Integer key's range in every database (32-bit in PostgreSQL)
        raise FormError(f"field 'assignment_id' must be an assignment number, 1 to {2**31 - 1}")
    return assignment_id


def create_app(url: str, per_prompt: int = 3, secure_cookies: bool = False, max_age: float = 7 * 86400,
               rng: random.Random | None = None) -> FastAPI:
    """The app on database `url`; each prompt goes to at most `per_prompt` labelers (`rng`: display shuffles)."""
    if per_prompt < 1:
        raise UserError(f"--per-prompt must be >= 1, got {per_prompt}")
    engine = db.connect(url)
    app = FastAPI(title="alignkit label", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ctx = ctx = Context(engine, db.signing_secret(engine), environment(), per_prompt, secure_cookies,
                                  max_age, rng)

    @app.exception_handler(NeedSignIn)
    def _to_sign_in(request, exc):
        return RedirectResponse("/login", status_code=303)

    @app.exception_handler(Forbidden)
    def _forbidden(request, exc):
        return HTMLResponse("<!doctype html><title>Forbidden</title><p>Forbidden: sign in again, or ask an admin.</p>",
                            status_code=403)

    @app.middleware("http")
    async def _security_headers(request, call_next):
        response = await call_next(request)
        response.headers.update({"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                                 "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"})
        return response

    _session_routes(app, ctx)
    _label_routes(app, ctx)
    _admin_routes(app, ctx)
    return app


def _session_routes(app: FastAPI, ctx: Context) -> None:
    @app.get("/login", response_class=HTMLResponse)
    def login_page(s: Session = Depends(session)):
        return ctx.page("login", s)

    @app.post("/login")
    def login(s: Session = Depends(session), form: dict = Depends(form_data)):
        check_csrf(s, form)
        labeler = db.find_labeler(ctx.engine, token=form.get("token", [""])[0].strip()[:200])
        if labeler is None:
            return ctx.page("login", s, status=401, error="Unknown or revoked token.")
        response = RedirectResponse("/", status_code=303)
        ctx.set_cookie(response, new_cookie(ctx.secret, labeler["id"]))  # a fresh nonce on sign-in
        return response

    @app.post("/logout")
    def logout(s: Session = Depends(signed_in), form: dict = Depends(form_data)):
        check_csrf(s, form)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE)
        return response

    @app.get("/")
    def home(s: Session = Depends(signed_in)):
        return RedirectResponse("/admin" if s.labeler["is_admin"] else "/label", status_code=303)


def _label_routes(app: FastAPI, ctx: Context) -> None:
    @app.get("/label", response_class=HTMLResponse)
    def show_label(s: Session = Depends(signed_in)):
        return ctx.label_page(s)

    @app.post("/label")
    def submit_label(s: Session = Depends(signed_in), form: dict = Depends(form_data)):
        check_csrf(s, form)
        try:
            assignment_id = _assignment_id(form)
            k = db.assignment_size(ctx.engine, s.labeler["id"], assignment_id)
            db.save_label(ctx.engine, s.labeler["id"], assignment_id, *parse_label_form(form, k))
        except FormError as e:
            return ctx.label_page(s, status=400, error=str(e))
        except LookupError:
            return ctx.label_page(s, status=404, error="That prompt is not assigned to you.")
        return RedirectResponse("/label", status_code=303)

    @app.post("/skip")
    def skip(s: Session = Depends(signed_in), form: dict = Depends(form_data)):
        check_csrf(s, form)
        try:
            db.skip_assignment(ctx.engine, s.labeler["id"], _assignment_id(form))
        except FormError as e:
            return ctx.label_page(s, status=400, error=str(e))
        except LookupError:
            return ctx.label_page(s, status=404, error="That prompt is not assigned to you.")
        return RedirectResponse("/label", status_code=303)


def _admin_routes(app: FastAPI, ctx: Context) -> None:
    @app.get("/admin", response_class=HTMLResponse)
    def admin_page(s: Session = Depends(admin)):
        return ctx.page("admin", s, p=progress(ctx.engine, ctx.per_prompt), new_token=None)

    @app.post("/admin/labelers", response_class=HTMLResponse)
    def create_labeler(s: Session = Depends(admin), form: dict = Depends(form_data)):
        check_csrf(s, form)
        name = form.get("name", [""])[0]
        try:
            token = db.add_labeler(ctx.engine, name, admin=form.get("admin", [""])[0] == "1")
        except UserError as e:
            return ctx.page("admin", s, status=400, p=progress(ctx.engine, ctx.per_prompt), new_token=None,
                            error=str(e))
        return ctx.page("admin", s, p=progress(ctx.engine, ctx.per_prompt), new_token=token, new_name=name.strip())

    @app.get("/admin/export")
    def export(format: str = "pairs", s: Session = Depends(admin)):
        if format not in ("rankings", "pairs"):
            return ctx.page("message", s, status=400, message="format must be rankings or pairs")
        rows = export_rows(ctx.engine, format)
        if not rows:  # as the CLI: an empty file would pass for an export
            return ctx.page("message", s, status=404, message=NOTHING_TO_EXPORT)
        body = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        return Response(body, media_type="application/x-ndjson",
                        headers={"Content-Disposition": f'attachment; filename="{format}.jsonl"'})
