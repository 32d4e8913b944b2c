"""Settings → Federation and the audit log, in the browser (README "Using the browser").

Thin adapters over the same services and selectors as federation/api/views.py,
with the same permissions (team admins). Mutations are POST (CSRF-checked) and
redirect after success (Post/Redirect/Get: a reload never submits twice); a
generated secret, token or invitation, or a ping's verdict, is shown once by the
page redirected to (kite.once: encrypted in the session for one read, never in a
URL). A refusal re-renders the form with the error on its field and changes
nothing, so resubmitting it is harmless.
"""

from dataclasses import asdict, dataclass
from datetime import datetime, time, timedelta

from django.contrib import messages
from django.db.models import Q
from django.http import Http404, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from federation import activity, certificates, channel, grants, heartbeat, invitations, outbox, reachability, selectors
from federation import overview, services
from federation import forms as f
from federation.models import IdentityCertificate, OutboxEntry, Peer
from kite import once
from kite.errors import ApiError
from kite.views import INVITE_PEERS, MANAGE_PEERS, VIEW_AUDIT, actor, apply_error, screen

EXPIRY_WARNING = timedelta(days=14)
DETAIL_ROWS = 50
AUDIT_PAGE = 100
STEPS = [Peer.Status.PROPOSED, Peer.Status.ACCEPTED, Peer.Status.ENROLLED, Peer.Status.ACTIVE]


def chip_of(peer: Peer, now: datetime) -> str | None:
    return reachability.of_peer(peer, now=now)  # None for a revoked peer (templates/federation/_chip.html)


@dataclass(frozen=True)
class Revealed:
    """A plaintext shown once, and the sentence saying where it goes on the other side;
    `slug` names its field (#reveal-<slug>)."""

    label: str
    value: str
    where: str = ""
    slug: str = "secret"


def _shown_once(kept: dict | None) -> list[Revealed]:
    return [Revealed(**item) for item in (kept or {}).get("revealed", [])]


def _with_once(request, url: str, *revealed: Revealed, **values):
    return once.redirect_with(request, url, revealed=[asdict(item) for item in revealed], **values)


def _peer(request, peer_id, role: str | None = "peer") -> Peer:
    peer = selectors.peer_for_team(request.principal.team.id, peer_id, role=role)
    if peer is None:
        raise Http404("No such peer in your team.")
    return peer


def _live_peer(request, peer_id) -> Peer:
    peer = _peer(request, peer_id)
    if peer.status == Peer.Status.REVOKED:
        raise Http404("This peer is revoked: nothing can be changed on it any more.")
    return peer


# --- peers -------------------------------------------------------------------------


@require_GET
@screen(MANAGE_PEERS)
def peer_list(request):
    return _peers_page(request)


def _peers_page(request, *, refused: f.MakePeerForm | None = None, refused_id: int | None = None,
                http_status: int = 200):
    form = f.PeerFilterForm(request.GET)
    wanted = form.cleaned_data if form.is_valid() else {}
    peers = selectors.peers(request.principal.team.id)
    status = wanted.get("status") or ""
    if status != "all":
        peers = peers.filter(status=status) if status else peers.exclude(status=Peer.Status.REVOKED)
    if wanted.get("q"):
        q = wanted["q"]
        peers = peers.filter(Q(name__icontains=q) | Q(peer_hook_url__icontains=q) | Q(remote_instance_id__icontains=q))
    peers = list(peers)
    depths, now = selectors.outbox_depths([peer.pk for peer in peers]), timezone.now()
    rows = [{"peer": peer, "chip": chip_of(peer, now), "depth": depths[peer.pk]} for peer in peers]
    if wanted.get("reachability"):
        rows = [row for row in rows if row["chip"] == wanted["reachability"]]
    return render(request, "federation/peers.html", {"form": form, "rows": rows, "now": now,
                                                     "senders": _senders(request, refused, refused_id)},
                  status=http_status)  # fmt: skip


def _senders(request, refused: f.MakePeerForm | None = None, refused_id: int | None = None) -> list[dict]:
    """The live trusted senders, each with its Make it a peer form (the refused one as it was sent)."""
    senders = selectors.trusted_senders(request.principal.team.id).exclude(status=Peer.Status.REVOKED)
    return [{"sender": sender, "form": refused if sender.pk == refused_id else f.MakePeerForm(prefix=f"s{sender.pk}")}
            for sender in senders]  # fmt: skip


@require_POST
@screen(MANAGE_PEERS)
def sender_promote(request, sender_id):
    """Make it a peer: the same row, its inbound secret kept; a generated outbound secret is shown once."""
    sender = _peer(request, sender_id, role="sender")
    form = f.MakePeerForm(request.POST, prefix=f"s{sender.pk}")
    if form.is_valid():
        try:
            issued = services.trusted_sender_promote(sender=sender, actor=actor(request), **form.service_kwargs())
        except ApiError as exc:
            apply_error(form, exc, form.ERRORS)
        else:
            messages.success(request, f"{sender.name} is a peer now: events matching its scopes are sent to it.")
            return _created(request, issued)
    return _peers_page(request, refused=form, refused_id=sender.pk, http_status=400)


@require_http_methods(["GET", "POST"])
@screen(MANAGE_PEERS)
def peer_new(request):
    """A peer by hand (docs/architecture.md "Two ways to peer": by hand): URL, its PEM, our two secrets generated or pasted."""
    form = f.PeerCreateForm(request.POST if request.method == "POST" else None)
    if form.is_valid():
        try:
            issued = services.peer_create(team=request.principal.team, actor=actor(request), **form.service_kwargs())
        except ApiError as exc:
            apply_error(form, exc, form.ERRORS)
        else:
            return _created(request, issued)
    identity = selectors.identity(request.principal.team)
    return render(request, "federation/peer_new.html", {"form": form, "identity": identity},
                  status=400 if form.is_bound else 200)  # fmt: skip


def _created(request, issued: services.Issued):
    peer, plain = issued.row, issued.secrets
    revealed = []
    if "outbound_token" in plain:
        revealed.append(Revealed("Outbound secret", plain["outbound_token"],
                                 f"On {peer.name}, paste this into the Inbound secret field of its peer for this "
                                 "instance: it is what that side checks our requests with.", "1"))  # fmt: skip
    if "inbound_token" in plain:
        revealed.append(Revealed("Inbound secret", plain["inbound_token"],
                                 f"On {peer.name}, paste this into the Outbound secret field of its peer for this "
                                 "instance: it is what that side signs its requests to us with.", "2"))  # fmt: skip
    return _with_once(request, reverse("federation:peer-created", args=[peer.pk]), *revealed)


@require_GET
@screen(MANAGE_PEERS)
def peer_created(request, peer_id):
    """Where a new peer's form redirects: its generated secrets once (`kept` is None on a reload)."""
    kept = once.take(request)
    return render(request, "federation/peer_created.html", {"peer": _peer(request, peer_id), "kept": kept is not None,
                                                            "shown_once": _shown_once(kept)})  # fmt: skip


@require_GET
@screen(MANAGE_PEERS)
def peer_detail(request, peer_id):
    """Where the peer's forms redirect: a secret they generated or a ping's verdict is shown once."""
    kept = once.take(request) or {}
    ping = kept.get("ping")
    return _detail(request, _peer(request, peer_id), shown_once=_shown_once(kept),
                   ping=heartbeat.PingResult(**ping) if ping else None)  # fmt: skip


def _detail(request, peer: Peer, status: int = 200, **forms_and_results):
    """The peer page; `forms_and_results` replaces a blank form by a refused one, or adds a
    ping verdict or the secrets shown once."""
    wanted = request.GET.get("outbox", "")
    wanted = wanted if wanted in OutboxEntry.Status.values else ""
    initial = {"peer_hook_url": peer.peer_hook_url, "scopes": peer.scopes, "filters": peer.filters,
               "max_hops": peer.max_hops, "rate_limit_per_second": peer.rate_limit_per_second}  # fmt: skip
    context = {
        "peer": peer,
        "chip": chip_of(peer, timezone.now()),
        "depth": selectors.outbox_depths([peer.pk])[peer.pk],
        "outbox_status": wanted,
        "entries": selectors.outbox_entries(peer, status=wanted or None)[:DETAIL_ROWS],
        "deliveries": selectors.deliveries(peer)[:DETAIL_ROWS // 2],
        "activity": overview.peer_charts(activity.peer_last_day(peer, timezone.now())),
        "grants": list(peer.grants.order_by("-created_at", "-id")),
        "now": timezone.now(),
        "live": peer.status != Peer.Status.REVOKED,
        "channel": channel.has_channel(peer),  # rotations are carried to the peer, nothing to paste
        "settings_form": f.PeerSettingsForm(initial=initial),
        "rotate_inbound": f.RotateForm(initial={"direction": "inbound"}, prefix="inbound"),
        "rotate_outbound": f.RotateForm(initial={"direction": "outbound"}, prefix="outbound"),
        "replay_form": f.ReplayForm(),
        "grant_form": f.GrantForm(),
        **forms_and_results,
    }
    return render(request, "federation/peer_detail.html", context, status=status)


@require_POST
@screen(MANAGE_PEERS)
def peer_ping(request, peer_id):
    peer = _live_peer(request, peer_id)
    if not peer.sends_to:
        messages.error(request, "This peer has no URL to ping yet (an invitation not redeemed).")
        return redirect("federation:peer", peer.pk)
    result = heartbeat.heartbeat(peer, actor=actor(request))
    return _with_once(request, reverse("federation:peer", args=[peer.pk]), ping=result.as_dict())


@require_POST
@screen(MANAGE_PEERS)
def peer_settings(request, peer_id):
    peer = _live_peer(request, peer_id)
    form = f.PeerSettingsForm(request.POST)
    if form.is_valid():
        try:
            services.peer_update(peer=peer, actor=actor(request), **form.changes(peer))
        except ApiError as exc:
            apply_error(form, exc, form.ERRORS)
        else:
            messages.success(request, "Saved.")
            return redirect("federation:peer", peer.pk)
    return _detail(request, _peer(request, peer.pk), status=400, settings_form=form)


@require_POST
@screen(MANAGE_PEERS)
def peer_rotate(request, peer_id):
    peer = _live_peer(request, peer_id)
    direction = "inbound" if "inbound-direction" in request.POST else "outbound"
    form = f.RotateForm(request.POST, prefix=direction)
    if form.is_valid():
        try:  # carried to the peer over the signed channel when it has one (every invitation peer)
            rotated = channel.rotate_secret(peer=peer, direction=direction, secret=form.cleaned_data["secret"] or None,
                                            propagate=channel.has_channel(peer), grace=not form.cleaned_data["now"],
                                            actor=actor(request))  # fmt: skip
        except ApiError as exc:
            apply_error(form, exc, form.ERRORS)
        else:
            return _rotated(request, rotated.peer, direction, rotated.secret, rotated)
    return _detail(request, peer, status=400, **{f"rotate_{direction}": form})


def _rotated(request, peer: Peer, direction: str, secret: str | None, rotated=None):
    fingerprint = getattr(peer, f"{direction}_fingerprint")
    if rotated is not None and rotated.propagated:
        messages.success(request, f"{direction.capitalize()} secret rotated; {peer.name} was told over the signed "
                                  f"channel and switched itself. Fingerprint now {fingerprint}.")  # fmt: skip
        return redirect("federation:peer", peer.pk)
    if rotated is not None and rotated.error:
        messages.warning(request, f"{peer.name} could not be told over the channel ({rotated.error}): paste the "
                                  "secret below there.")  # fmt: skip
    if direction == "inbound":
        where = (f"On {peer.name}, paste this as the new outbound secret of its peer for this instance (Rotate "
                 f"outbound secret). The old inbound secret keeps working here until "
                 f"{peer.previous_inbound_expires_at:%Y-%m-%d %H:%M} UTC.")  # fmt: skip
    else:
        where = (f"On {peer.name}, paste this as the new inbound secret of its peer for this instance (Rotate "
                 "inbound secret). We sign with it from now on: deliveries wait until it is pasted there.")  # fmt: skip
    messages.success(request, f"{direction.capitalize()} secret rotated; fingerprint now {fingerprint}.")
    revealed = [Revealed(f"New {direction} secret", secret, where, "rotated")] if secret else []
    return _with_once(request, reverse("federation:peer", args=[peer.pk]), *revealed)


@require_POST
@screen(MANAGE_PEERS)
def peer_replay(request, peer_id):
    peer = _live_peer(request, peer_id)
    form = f.ReplayForm(request.POST)
    if not form.is_valid():
        return _detail(request, peer, status=400, replay_form=form)
    count = outbox.replay_dead(peer=peer, limit=form.cleaned_data["limit"], actor=actor(request))
    messages.success(request, f"{count} dead entr{'y' if count == 1 else 'ies'} re-queued for immediate delivery.")
    return redirect(reverse("federation:peer", args=[peer.pk]) + "?outbox=pending")


@require_POST
@screen(MANAGE_PEERS)
def grant_create(request, peer_id):
    peer = _live_peer(request, peer_id)
    form = f.GrantForm(request.POST)
    if form.is_valid():
        try:
            grant, token = grants.create(peer=peer, actor=actor(request), **form.service_kwargs())
        except ApiError as exc:
            apply_error(form, exc, form.ERRORS)
        else:
            where = (f"Give this to {peer.name}'s operator: they store it on their Fleet page (Fleet access from "
                     f"this instance). Valid until {grant.expires_at:%Y-%m-%d %H:%M} UTC.")  # fmt: skip
            messages.success(request, f"Grant fg-{grant.pk} created.")
            revealed = Revealed(f"Grant fg-{grant.pk}", token, where, "grant")
            return _with_once(request, reverse("federation:peer", args=[peer.pk]), revealed)
    return _detail(request, peer, status=400, grant_form=form)


@require_http_methods(["GET", "POST"])
@screen(MANAGE_PEERS)
def grant_revoke(request, peer_id, grant_id):
    peer = _peer(request, peer_id)
    grant = peer.grants.filter(pk=grant_id).first()
    if grant is None:
        raise Http404("No such grant for this peer.")
    back = reverse("federation:peer", args=[peer.pk])
    return _confirm_then(
        request, lambda: grants.revoke(peer=peer, grant_id=grant.pk, actor=actor(request)),
        done=f"Grant fg-{grant.pk} revoked: its token stops working now.", back=back,
        title=f"Revoke grant fg-{grant.pk}?", button="Revoke grant", consequences=[
            f"{peer.name} can no longer read {grant.resource_kind} {grant.resource_id or '(all)'} with its token: "
            "its next call is refused (grant_revoked / bad_grant).",
        ],
    )  # fmt: skip


@require_http_methods(["GET", "POST"])
@screen(MANAGE_PEERS)
def peer_delete(request, peer_id):
    peer = _live_peer(request, peer_id)
    if request.method == "POST":
        told = services.peer_delete(peer=peer, actor=actor(request))
        if told is not None and not told.ok:
            messages.warning(request, f"{peer.name} is deleted here, but could not be told: {told.error}. "
                                      "Delete this instance on its side too.")  # fmt: skip
        else:
            messages.success(request, f"{peer.name} deleted.")
        return redirect("federation:peers")
    depth = selectors.outbox_depths([peer.pk])[peer.pk]
    queued = depth["pending"] + depth["in_flight"]
    other_side = (
        f"{peer.name} is told at once (a signed terminate): its peer row for this instance becomes revoked, it "
        "stops sending here, and its operator sees the row as revoked — terminated by the peer."
        if peer.sends_to else
        "The invitation issued for it stops working: whoever pastes it is refused (unknown invitation)."
    )  # fmt: skip
    return _confirm(request, f"Delete peer {peer.name}?", [
        other_side,
        f"Here: nothing more is sent to or accepted from it; {queued} queued entr{'y' if queued == 1 else 'ies'} "
        "will be dead-lettered. To federate again, peer anew.",
    ], "Delete peer", reverse("federation:peer", args=[peer.pk]))  # fmt: skip


def _confirm(request, title: str, consequences: list[str], button: str, cancel_url: str):
    return render(request, "confirm.html", {"title": title, "consequences": consequences, "button": button,
                                            "cancel_url": cancel_url})  # fmt: skip


def _confirm_then(request, act, *, done: str, back: str, title: str, consequences: list[str], button: str):
    """GET: the page saying what will happen; POST (CSRF-checked): `act()`, then back to `back`."""
    if request.method != "POST":
        return _confirm(request, title, consequences, button, back)
    act()
    messages.success(request, done)
    return redirect(back)


# --- invitations ---------------------------------------------------------------------


@require_http_methods(["GET", "POST"])
@screen(INVITE_PEERS)
def invite(request):
    form = f.InviteForm(request.POST if request.method == "POST" else None)
    if form.is_valid():
        try:
            peer, invitation = invitations.issue(team=request.principal.team, actor=actor(request), **form.cleaned_data)
        except ApiError as exc:
            apply_error(form, exc, form.ERRORS)
        else:
            where = ("Send it to the other side's operator over a private channel: they paste it on their Accept "
                     "an invitation page. It works once.")
            revealed = Revealed("Invitation", invitation, where, "invitation")
            return _with_once(request, reverse("federation:invited", args=[peer.pk]), revealed)
    return render(request, "federation/invite.html", {"form": form}, status=400 if form.is_bound else 200)


@require_GET
@screen(INVITE_PEERS)
def invited(request, peer_id):
    """Where an invitation's form redirects: the invitation once, then its expiry and progress."""
    return render(request, "federation/invite.html", {"peer": _peer(request, peer_id), "steps": STEPS,
                                                      "shown_once": _shown_once(once.take(request))})  # fmt: skip


@require_http_methods(["GET", "POST"])
@screen(INVITE_PEERS)
def accept(request):
    form = f.AcceptForm(request.POST if request.method == "POST" else None)
    if form.is_valid():
        try:
            peer = invitations.accept(team=request.principal.team, actor=actor(request), **form.cleaned_data)
        except ApiError as exc:
            apply_error(form, exc, {**form.ERRORS, "unknown_invitation": "invitation", "invitation": "invitation",
                                    "instance_id_taken": "invitation"})  # fmt: skip
        else:
            return redirect("federation:accepted", peer.pk)
    return render(request, "federation/accept.html", {"form": form}, status=400 if form.is_bound else 200)


@require_GET
@screen(INVITE_PEERS)
def accepted(request, peer_id):
    """Where an accepted invitation redirects: the peering's progress."""
    return render(request, "federation/accept.html", {"peer": _peer(request, peer_id), "steps": STEPS})


@require_GET
@screen(INVITE_PEERS)
def peer_progress(request, peer_id):
    """What the invite and accept pages poll until the peer is active."""
    peer = _peer(request, peer_id)
    return JsonResponse({"name": peer.name, "status": peer.status, "reachability": chip_of(peer, timezone.now()),
                         "last_error": peer.last_error, "url": reverse("federation:peer", args=[peer.pk])})  # fmt: skip


# --- certificates ------------------------------------------------------------------


def _certificates(request, form=None, status=200):
    kept = once.take(request) or {}
    now = timezone.now()
    rows = [{"row": row, "expired": row.not_after <= now, "expiring": now < row.not_after <= now + EXPIRY_WARNING}
            for row in IdentityCertificate.objects.filter(team_id=request.principal.team.id)
            .order_by("-created_at", "-id")]  # fmt: skip
    issued = next((item["row"] for item in rows if item["row"].pk == kept.get("issued")), None)
    return render(request, "federation/certificates.html", {
        "rows": rows, "form": form or f.CertificateForm(), "issued": issued, "warning_days": EXPIRY_WARNING.days,
    }, status=status)  # fmt: skip


@require_http_methods(["GET", "POST"])
@screen(MANAGE_PEERS)
def certificate_list(request):
    if request.method == "GET":
        return _certificates(request)
    form = f.CertificateForm(request.POST)
    if form.is_valid():
        try:
            row = certificates.issue(team=request.principal.team, actor=actor(request), **form.cleaned_data)
        except ApiError as exc:
            apply_error(form, exc, form.ERRORS)
        else:
            return once.redirect_with(request, reverse("federation:certificates"), issued=row.pk)
    return _certificates(request, form=form, status=400)


@require_http_methods(["GET", "POST"])
@screen(MANAGE_PEERS)
def certificate_revoke(request, certificate_id):
    row = IdentityCertificate.objects.filter(team_id=request.principal.team.id, pk=certificate_id).first()
    if row is None:
        raise Http404("No such certificate in your team.")
    return _confirm_then(
        request, lambda: certificates.revoke(certificate=row, actor=actor(request)),
        done=f"Certificate {row.subject} revoked.", back=reverse("federation:certificates"),
        title=f"Revoke certificate {row.subject}?", button="Revoke certificate", consequences=[
            "It signs nothing more. Peers that pinned it refuse what this instance sends until they are given the "
            "newer certificate's PEM (bad_certificate on their side).",
            f"Thumbprint {row.thumbprint}.",
        ],
    )  # fmt: skip


# --- tokens and trusted senders ----------------------------------------------------------


def _tokens(request, status=200, **extra):
    team_id = request.principal.team.id
    return render(request, "federation/tokens.html", {
        "tokens": list(selectors.tokens(team_id)), "senders": list(selectors.trusted_senders(team_id)),
        "token_form": f.TokenForm(), "sender_form": f.TrustedSenderForm(),
        "shown_once": _shown_once(once.take(request)), **extra,
    }, status=status)  # fmt: skip


@require_http_methods(["GET", "POST"])
@screen(MANAGE_PEERS)
def token_list(request):
    if request.method == "GET":
        return _tokens(request)
    form = f.TokenForm(request.POST)
    if not form.is_valid():
        return _tokens(request, status=400, token_form=form)
    issued = services.token_create(team=request.principal.team, actor=actor(request), **form.cleaned_data)
    revealed = Revealed(f"Token {issued.row.label}", issued.secrets["token"],
                        "Paste it where the other side's guide asks for this token: as the outbound secret of a "
                        "peer on one side and the inbound secret (peer or trusted sender) on the other.",
                        "token")  # fmt: skip
    messages.success(request, f"Token {issued.row.label} generated.")
    return _with_once(request, reverse("federation:tokens"), revealed)


@require_http_methods(["GET", "POST"])
@screen(MANAGE_PEERS)
def token_delete(request, token_id):
    token = selectors.tokens(request.principal.team.id).filter(pk=token_id).first()
    if token is None:
        raise Http404("No such token in your team.")
    return _confirm_then(
        request, lambda: services.token_delete(token=token, actor=actor(request)),
        done=f"Token {token.label} deleted.", back=reverse("federation:tokens"),
        title=f"Delete token {token.label}?", button="Delete token",
        consequences=["Only this record of it goes: peers and trusted senders it was pasted into keep their copy."],
    )  # fmt: skip


@require_POST
@screen(MANAGE_PEERS)
def sender_create(request):
    form = f.TrustedSenderForm(request.POST)
    if form.is_valid():
        data = {**form.cleaned_data, "inbound_token": form.cleaned_data["inbound_token"].strip() or None}
        try:
            issued = services.trusted_sender_create(team=request.principal.team, actor=actor(request), **data)
        except ApiError as exc:
            apply_error(form, exc, form.ERRORS)
        else:
            secret = issued.secrets.get("inbound_token")
            revealed = [Revealed(f"Inbound secret of {issued.row.name}", secret,
                                 f"On {issued.row.name}, paste this as the outbound secret of its peer for this "
                                 "instance.", "sender")] if secret else []  # fmt: skip
            messages.success(request, f"Trusted sender {issued.row.name} added.")
            return _with_once(request, reverse("federation:tokens"), *revealed)
    return _tokens(request, status=400, sender_form=form)


@require_http_methods(["GET", "POST"])
@screen(MANAGE_PEERS)
def sender_revoke(request, sender_id):
    sender = _peer(request, sender_id, role="sender")
    return _confirm_then(
        request, lambda: services.peer_revoke(peer=sender, actor=actor(request)),
        done=f"Trusted sender {sender.name} revoked.", back=reverse("federation:tokens"),
        title=f"Revoke trusted sender {sender.name}?", button="Revoke sender", consequences=[
            f"Requests signed with its inbound secret ({sender.inbound_fingerprint}) are refused from now on "
            "(401 on its side).",
        ],
    )  # fmt: skip


# --- audit ---------------------------------------------------------------------------------


@require_GET
@screen(VIEW_AUDIT)
def audit_log(request):
    form = f.AuditFilterForm(request.GET)
    rows, more = [], False
    if form.is_valid():
        wanted = form.cleaned_data
        since, until = wanted["since"], wanted["until"]
        after = _midnight(since) if since else None
        before = wanted["before"] or (_midnight(until + timedelta(days=1)) if until else None)
        filters = selectors.AuditFilter(action=wanted["action"] or None, peer=wanted["peer"] or None,
                                        outcome=wanted["outcome"] or None, after=after, before=before)  # fmt: skip
        rows, more = selectors.audit_events(request.principal.team.id, filters, AUDIT_PAGE)
    older = None
    if more:
        query = request.GET.copy()
        query["before"] = rows[-1].pk
        older = "?" + query.urlencode()
    return render(request, "federation/audit.html", {"form": form, "rows": rows, "older": older},
                  status=200 if form.is_valid() else 400)  # fmt: skip


def _midnight(day) -> datetime:
    return timezone.make_aware(datetime.combine(day, time.min))


# --- an operator's maintenance pause -----------------------------------------------------------


@require_POST
@screen(MANAGE_PEERS)
def peer_pause(request, peer_id):
    peer = _peer(request, peer_id)
    try:
        peer, changed = services.peer_pause(peer=peer, reason=request.POST.get("reason", ""), actor=actor(request))
    except ApiError as exc:
        messages.error(request, exc.detail)
    else:
        messages.success(request, f"{peer.name} paused: events queue here and nothing is sent to it until you "
                                  "resume; heartbeats go on." if changed else f"{peer.name} was paused already.")
    return redirect("federation:peer", peer.pk)


@require_POST
@screen(MANAGE_PEERS)
def peer_resume(request, peer_id):
    peer = _peer(request, peer_id)
    pending = selectors.outbox_depths([peer.pk])[peer.pk]["pending"]  # before: the worker may start at once
    try:
        peer, changed = services.peer_resume(peer=peer, actor=actor(request))
    except ApiError as exc:
        messages.error(request, exc.detail)
    else:
        queued = "1 queued entry is" if pending == 1 else f"{pending} queued entries are"
        messages.success(request, f"{peer.name} resumed: {queued} being delivered now." if changed
                         else f"{peer.name} was not paused by an operator: nothing to resume.")  # fmt: skip
    return redirect("federation:peer", peer.pk)
