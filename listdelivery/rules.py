"""The rules that turn SMTP replies into verdicts: pure functions, no database, no sockets.

A reply is judged by its basic code and, where the server gives one, its RFC
3463 enhanced status code (``5.1.1``), whose middle number says what it is
about:

- 1 (addressing) and 2 (mailbox): the member's own address. A permanent one
  is a bounce.
- 3 (mail system), 4 (network and routing), 5 (protocol): the server's
  trouble. The post is held and retried later; nobody bounces.
- 6 (content) and 7 (security or policy): about the post, or about what the
  server lets this client do. Refused at DATA, the post is held until an
  administrator acts (sending it again would be refused again); refused at
  RCPT for many recipients alike (``554 5.7.1 Relay access denied``), the
  server is misconfigured and the post is held; refused at RCPT for a few,
  those recipients fail without counting as bounces.

A permanent refusal without an enhanced code counts as the member's, as it
always has; a server that gives no enhanced codes cannot be told apart.
``5.3.4`` (message too big) is final for the post: held until an
administrator acts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .models import OutgoingMessage, OutgoingRecipient, Personalization
from .smtp import Outcome

Status = OutgoingMessage.Status
RStatus = OutgoingRecipient.Status

_ENHANCED = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})(?!\S)")
#: Identical non-mailbox refusals in one batch that make them the server's problem, not the members'.
RUN_OF_REFUSALS = 3


def enhanced_code(text: str) -> tuple[int, int, int] | None:
    """The RFC 3463 status code a reply text starts with, such as ``(5, 1, 1)``."""
    match = _ENHANCED.match(text or "")
    return tuple(int(n) for n in match.groups()) if match else None  # type: ignore[return-value]


def is_permanent(code: int | None) -> bool:
    """5xx is permanent, except 552, which RFC 5321 lets mean "too many recipients"."""
    return code is not None and 500 <= code <= 599 and code != 552


def about_mailbox(text: str) -> bool:
    """Whether a reply is about the recipient's address or mailbox (or does not say)."""
    enhanced = enhanced_code(text)
    return enhanced is None or enhanced[1] in (1, 2)


def too_big(code: int | None, text: str) -> bool:
    return enhanced_code(text) == (5, 3, 4) or (code == 552 and "size" in (text or "").lower())


def too_many_recipients(code: int | None, text: str) -> bool:
    """RFC 5321's "too many recipients" (452, or 552 from older servers; enhanced x.5.3)."""
    enhanced = enhanced_code(text)
    if enhanced is not None and enhanced[1:] == (5, 3):
        return True
    return code in (452, 552) and "too many recipients" in (text or "").lower()


def decide_verp(personalize: str, post_id: int, metadata: Mapping[str, Any], config: dict) -> bool:
    """Mailman's rule (``runners/outgoing.py``), in its order.

    Metadata ``verp`` wins; a personalized list is VERP'd only with
    ``VERP_PERSONALIZED_DELIVERIES``; otherwise ``VERP_DELIVERY_INTERVAL`` 0
    never, 1 always, N when the list's current ``post_id`` is a multiple of N.
    """
    if "verp" in metadata:
        return bool(metadata["verp"])
    if personalize != Personalization.NONE:
        return bool(config["VERP_PERSONALIZED_DELIVERIES"])
    interval = config["VERP_DELIVERY_INTERVAL"]
    if interval <= 0:
        return False
    return interval == 1 or post_id % interval == 0


def verp_reason(personalize: str, post_id: int, metadata: Mapping[str, Any], config: dict) -> str:
    """Which step of :func:`decide_verp` decided, in words, for the post's page."""
    if "verp" in metadata:
        return "set for this post by whoever queued it (its metadata)"
    if personalize != Personalization.NONE:
        state = "on" if config["VERP_PERSONALIZED_DELIVERIES"] else "off"
        return f"the list is personalized and VERP_PERSONALIZED_DELIVERIES is {state}"
    interval = config["VERP_DELIVERY_INTERVAL"]
    if interval <= 0:
        return "VERP_DELIVERY_INTERVAL is 0: no post is VERP'd"
    if interval == 1:
        return "VERP_DELIVERY_INTERVAL is 1: every post is VERP'd"
    return f"VERP_DELIVERY_INTERVAL is {interval} and this was post number {post_id} of the list"


# -- what to send again at once ---------------------------------------------------


def resend_now(outcome: Outcome) -> list[str]:
    """Recipients of ``outcome`` that deserve a new transaction at once, not a retry delay.

    Those refused as "too many recipients" (the server wants the rest in another
    transaction); and, when the server hung up after answering some recipients
    finally, those it never got to. A hang-up before any final answer is no
    progress: those recipients wait for the retry delay.
    """
    again = []
    if outcome.accepted:  # the server takes some per transaction: the rest go in the next
        again = [
            a for a, (code, text) in outcome.refused.items() if too_many_recipients(code, text)
        ]
    if outcome.failure is not None and outcome.failure.stage in ("rcpt", "data"):
        answered = any(is_permanent(code) for code, _ in outcome.refused.values())
        if answered:
            # Those never answered, and the one answered "421": closing, about the session.
            again += [a for a in outcome.undelivered if a not in again]
            again += [a for a, (code, _) in outcome.refused.items() if code == 421]
    return again


# -- judging a batch ----------------------------------------------------------------


@dataclass(frozen=True)
class PostFailure:
    """Trouble that is not about one recipient: the post waits, nobody bounces."""

    status: str  # Status.HELD or Status.RETRY
    reason: str
    needs_admin: bool = False  # held until an administrator retries it: sending again is futile
    #: What kind of trouble, for grouping and the remedy shown: one of :data:`PROBLEMS`.
    kind: str = "server"
    #: For "limited": seconds until the limits let the post go on.
    retry_after: float | None = None


#: The kinds of post trouble, and what an administrator can do about each.
PROBLEMS = {
    "auth": "The server refused our login. Check SMTP_USER and SMTP_PASSWORD, then Retry now.",
    "tls": (
        "TLS with the server failed. Check SMTP_SECURE_MODE, SMTP_VERIFY_CERT and "
        "SMTP_VERIFY_HOSTNAME against the server's certificate, then Retry now."
    ),
    "connection": (
        "The server could not be reached. Check SMTP_HOST and SMTP_PORT and that the server "
        "is running; delivery retries on its own."
    ),
    "size": (
        "The server refuses a post this large. Raise the server's size limit and Retry now, "
        "or Cancel the post."
    ),
    "content": (
        "The server refused the post itself (content or policy). Read the reply; fix the "
        "server's policy and Retry now, or Cancel the post."
    ),
    "refusals": (
        "The server refused many recipients alike: usually relay or sender policy. "
        "Check that the server lets this site relay, then Retry now."
    ),
    "server": "The server is in trouble; delivery retries on its own.",
    "limited": (
        "The post waits for a sending limit (rate, daily quota or session cap): it goes on by "
        "itself when the limit allows. Raise the limit in RELAYS or SMTP_RATE if it is wrong."
    ),
}


@dataclass
class Verdicts:
    """What one batch of outcomes means: a status per recipient, grouped for a few UPDATEs."""

    per_address: dict[str, tuple[str, int | None, str]] = field(default_factory=dict)
    post_failure: PostFailure | None = None
    transactions: int = 0

    def add(
        self, status: str, addresses: Iterable[str], code: int | None = None, text: str = ""
    ) -> None:
        for address in addresses:
            self.per_address[address] = (status, code, text)

    @property
    def groups(self) -> dict[tuple[str, int | None, str], list[str]]:
        grouped: dict[tuple[str, int | None, str], list[str]] = {}
        for address, verdict in self.per_address.items():
            grouped.setdefault(verdict, []).append(address)
        return grouped

    def fail_post(self, failure: PostFailure) -> None:
        """Keep the weightiest post failure: one needing an administrator, then a hold."""
        current = self.post_failure

        def weight(f: PostFailure | None) -> int:
            if f is None:
                return 0
            return 3 if f.needs_admin else 2 if f.status == Status.HELD else 1

        if weight(failure) > weight(current):
            self.post_failure = failure


def judge(outcomes: Iterable[Outcome]) -> Verdicts:
    """Sort SMTP outcomes into sent, deferred, bounced and failed recipients, and post trouble.

    Outcomes are read in order; a later verdict on an address (a transaction
    sent again at once) replaces an earlier one.
    """
    verdicts = Verdicts()
    policy_refusals: dict[tuple, list[str]] = {}
    for outcome in outcomes:
        verdicts.transactions += 1
        failure = outcome.failure
        verdicts.add(RStatus.SENT, outcome.accepted)
        for address, (code, text) in outcome.refused.items():
            if not is_permanent(code):
                verdicts.add(RStatus.DEFERRED, [address], code, text)
            elif about_mailbox(text):
                verdicts.add(RStatus.BOUNCED, [address], code, text)
            else:
                key = (code, enhanced_code(text), _without_address(text, address))
                policy_refusals.setdefault(key, []).append(address)
                verdicts.add(RStatus.FAILED, [address], code, text)
        if failure is not None:
            _judge_failure(verdicts, outcome)
    batch_size = len(verdicts.per_address)
    for (code, _, text), addresses in policy_refusals.items():
        if len(addresses) >= min(RUN_OF_REFUSALS, max(batch_size, 2)):
            # The same policy refusal for many: the server's configuration, not the members.
            for address in addresses:
                status, own_code, own_text = verdicts.per_address[address]
                if status == RStatus.FAILED:
                    verdicts.add(RStatus.DEFERRED, [address], own_code, own_text)
            verdicts.fail_post(
                PostFailure(
                    Status.HELD,
                    f"the server refused {len(addresses)} recipients alike: {code} {text}",
                    kind="refusals",
                )
            )
    return verdicts


def _judge_failure(verdicts: Verdicts, outcome: Outcome) -> None:
    failure = outcome.failure
    assert failure is not None
    recipients = outcome.undelivered
    code, text, stage = failure.code, failure.text, failure.stage
    reply = f"{code} {text}" if code is not None else text
    reason = f"SMTP {stage} failed: {reply}"
    if stage == "limited":  # never sent: the recipients stay as they were
        verdicts.fail_post(
            PostFailure(Status.RETRY, text, kind="limited", retry_after=failure.retry_after or 1.0)
        )
        return
    if stage == "smtputf8":
        verdicts.add(RStatus.FAILED, recipients, code, text)
        return
    if stage == "size" or too_big(code, text):
        verdicts.add(RStatus.DEFERRED, recipients, code, text)
        verdicts.fail_post(
            PostFailure(Status.HELD, f"the server refuses a post this large: {reply}", True, "size")
        )
        return
    if stage == "data" and is_permanent(code):
        enhanced = enhanced_code(text)
        if len(outcome.transaction.recipients) == 1 and enhanced and enhanced[1] in (1, 2):
            verdicts.add(RStatus.BOUNCED, recipients, code, text)
            return
        verdicts.add(RStatus.DEFERRED, recipients, code, text)
        about_post = enhanced is not None and enhanced[1] in (6, 7)
        if about_post:
            verdicts.fail_post(
                PostFailure(Status.HELD, f"the server refused the post: {reply}", True, "content")
            )
        else:
            verdicts.fail_post(PostFailure(Status.HELD, reason))
        return
    verdicts.add(RStatus.DEFERRED, recipients, code, text)
    kind = stage if stage in ("auth", "tls") else "connection" if stage == "connect" else "server"
    if is_permanent(code) or stage == "tls":
        verdicts.fail_post(PostFailure(Status.HELD, reason, kind=kind))
    elif failure.concerns_session:
        verdicts.fail_post(PostFailure(Status.RETRY, reason, kind=kind))


def _without_address(text: str, address: str) -> str:
    """A reply text with the recipient's address taken out, to compare refusals of many."""
    return " ".join(re.sub(re.escape(address), "", text or "", flags=re.IGNORECASE).split())


# -- what is stored ------------------------------------------------------------------

MAX_STORED_TEXT = 1000


def storable_code(code: int | None) -> int | None:
    """A reply code the database can hold and a person can read; ``None`` for anything else."""
    return code if isinstance(code, int) and 100 <= code <= 599 else None


def storable_text(text: Any, limit: int = MAX_STORED_TEXT) -> str:
    """Reply text as stored: printable, one line, at most ``limit`` characters."""
    text = "".join(c if c.isprintable() else " " for c in str(text or ""))
    return " ".join(text.split())[:limit]
