"""XVERP: a VERP'd post through a real Postfix, as bulk chunks against one copy per recipient.

Part of ``python -m bench`` (``--only xverp`` for this alone). A private Postfix
(:class:`tests.postfix.PostfixInstance`: Debian's Postfix on a free loopback port, delivering
to Maildirs) offers XVERP to loopback clients. One VERP'd post of a list without
personalization (``VERP_DELIVERY_INTERVAL`` 1) goes to ``--xverp-members`` members
(10,000; 1,000 with ``--quick``), sent by one runner in this process with
``SMTP_CONNECTIONS`` 4:

- **one copy each**: ``XVERP`` off, one transaction per member with its VERP'd sender
  (what every VERP'd post did before issue 14);
- **XVERP**: ``XVERP`` on, chunks of ``MAX_RECIPIENTS`` with ``MAIL FROM:<…> XVERP=+=``,
  Postfix writing each copy's VERP'd sender; with ``MAX_RECIPIENTS`` 10 (the default), 100
  and 500.

Each reports the recipients per second the runner handed to Postfix, from its start to its
end, and the CPU per message of this process and of Postfix's processes (the master and what it
started); the figure of issue 14 is the ratio of an XVERP run's to one copy each's (at least
5). They run ``--repeat`` rounds (3; 1 with ``--quick``), one copy each first in each round,
and the medians are compared: Postfix's speed here moves by half from one minute to the next,
so each round's own ratio is printed too. Times are Postfix's, not the baseline sink's: no ratio to the baseline. While the runner sends,
Postfix puts what it takes on hold (``smtpd_data_restrictions``: HOLD), so the Maildir
deliveries of the same machine do not compete with the hand-off for the CPU, as a relay's
deliveries to other machines would not; they are released afterwards (the seconds Postfix
then takes to deliver every copy are reported too). Checked: every member has exactly one
copy, whose Return-Path decodes back to that member, and the post ended delivered. Without
Postfix, or not as root (its master must start as root), the scenario is skipped with the
reason.
"""

from __future__ import annotations

import subprocess
import time
from typing import Any

from bench.checks import CorrectnessError
from bench.context import Bench
from bench.cpu import tree_cpu_seconds
from bench.database import flush_tables
from bench.lists import enqueue
from bench.report import Outcome, Row, single_row
from bench.timing import Stopwatch

FULL_MEMBERS = 10_000
QUICK_MEMBERS = 1_000
CONNECTIONS = 4
#: MAX_RECIPIENTS of the XVERP runs: the default, chunks as large as a batch of the runner,
#: and half of what Postfix takes in one transaction (``smtpd_recipient_limit``, 1,000).
CHUNKS = (10, 100, 500)
LIST_ADDRESS = "xverp@bench.example.org"
VERP_FORMAT = "${bounces}+${local}=${domain}"
#: Postfix delivers at its own pace after it has taken the post; this long at most.
DELIVERY_TIMEOUT = 600.0

TARGET_RATIO = 5.0


def once(bench: Bench) -> Outcome:
    members = bench.size(bench.options.xverp_members, QUICK_MEMBERS, FULL_MEMBERS)
    figures = run(members, bench.options.repeat, bench.progress)
    if "skipped" in figures:
        return Outcome(details=figures, lines=[f"xverp: skipped, {figures['skipped']}"])
    copies = figures["one_copy_each"]
    rows = [xverp_row("xverp: one copy each", members, copies)]
    rows += [
        xverp_row(
            f"xverp: XVERP chunks of {chunks['max_recipients']}",
            members,
            chunks,
            target=f">={TARGET_RATIO:g}x one copy each",
            met=f"{'yes' if chunks['met'] else 'NO'} ({chunks['ratio']}x)",
        )
        for chunks in figures["xverp"]
    ]
    return Outcome(rows=rows, details=figures, lines=lines(figures))


def xverp_row(label: str, members: int, figures: dict[str, Any], **fields: Any) -> Row:
    return single_row(
        label,
        members,
        figures["seconds"],
        figures["transactions"],
        members,
        figures["client_cpu"],
        figures["sink_cpu"],
        against_baseline=False,
        note="through a private Postfix (sink CPU: its processes)",
        config={"connections": CONNECTIONS, "max_recipients": figures["max_recipients"]},
        **fields,
    )


def lines(xverp: dict[str, Any]) -> list[str]:
    copies = xverp["one_copy_each"]
    found = [
        f"xverp, VERP'd post to {xverp['members']:,} members through Postfix, "
        f"{xverp['connections']} connections, median of {xverp['rounds']} round(s): one copy each "
        f"{copies['recipients_per_second']:,.0f} recipients/s ({copies['seconds']} s, "
        f"{copies['transactions']:,} transactions; rounds {_each(copies['by_round'])}); "
        f"target {xverp['target']}"
    ]
    for chunks in xverp["xverp"]:
        found.append(
            f"  chunks of {chunks['max_recipients']} with XVERP: "
            f"{chunks['recipients_per_second']:,.0f}/s ({chunks['seconds']} s, "
            f"{chunks['transactions']:,} transactions), {chunks['ratio']}x: "
            f"{'yes' if chunks['met'] else 'NO'}; each round's ratio {_each(chunks['ratio_by_round'])}"
        )
    found.append(
        "  Postfix then delivered every copy in "
        + ", ".join(f"{r['postfix_delivery_seconds']} s" for r in [copies, *xverp["xverp"]])
    )
    return found


def _each(values: list[float]) -> str:
    return ", ".join(f"{value:,.2f}".rstrip("0").rstrip(".") for value in values)


def run(members: int, rounds: int = 1, progress: Any = print) -> dict[str, Any]:
    """``rounds`` rounds of every run through one private Postfix, one copy each first in each;
    a ``skipped`` reason where none can start."""
    from tests.postfix import PostfixInstance, PostfixUnavailable, unavailable_reason

    reason = unavailable_reason()
    if reason is None:
        postfix = PostfixInstance(
            smtpd_authorized_verp_clients="127.0.0.0/8",
            smtpd_data_restrictions="check_client_access static:HOLD",
            queue_run_delay="1s",
        )
        try:
            postfix.add_mailboxes(address(i) for i in range(members))
            postfix.start()
        except (PostfixUnavailable, OSError) as error:
            postfix.close()
            reason = f"Postfix could not start: {error}"
    if reason is not None:
        progress(f"xverp: skipped, {reason}")
        return {"skipped": reason}
    copies_runs: list[dict[str, Any]] = []
    chunk_runs: dict[int, list[dict[str, Any]]] = {chunk: [] for chunk in CHUNKS}
    try:
        for _ in range(rounds):
            copies_runs.append(send(postfix, members, xverp=False, progress=progress))
            for chunk in CHUNKS:
                chunk_runs[chunk].append(send(postfix, members, chunk=chunk, progress=progress))
    finally:
        postfix.close()
        flush_tables()
    copies = median_run(copies_runs)
    xverp = []
    for chunk, runs in chunk_runs.items():
        run_ = median_run(runs)
        ratio = run_["recipients_per_second"] / copies["recipients_per_second"]
        run_["ratio"] = round(ratio, 2)
        run_["met"] = ratio >= TARGET_RATIO
        # Each round's own ratio: how far the machine's changing speed moves it.
        each = [
            r["recipients_per_second"] / c["recipients_per_second"]
            for r, c in zip(runs, copies_runs, strict=True)
        ]
        run_["ratio_by_round"] = [round(r, 2) for r in each]
        xverp.append(run_)
        progress(
            f"xverp, {members:,} members through Postfix: chunks of {chunk} "
            f"with XVERP {run_['recipients_per_second']:,.0f} recipients/s, one copy each "
            f"{copies['recipients_per_second']:,.0f}/s: {ratio:.1f}x (target {TARGET_RATIO:g}x)"
        )
    return {
        "members": members,
        "connections": CONNECTIONS,
        "rounds": rounds,
        "one_copy_each": copies,
        "xverp": xverp,
        "target": f">={TARGET_RATIO:g}x the recipients/s of one copy each",
    }


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of the median recipients/s (the slower middle one of an even count), with every
    round's recipients/s."""
    ordered = sorted(runs, key=lambda r: r["recipients_per_second"])
    return {
        **ordered[(len(ordered) - 1) // 2],
        "by_round": [r["recipients_per_second"] for r in runs],
    }


def address(index: int) -> str:
    from tests.postfix import DOMAIN

    return f"member{index:06d}@{DOMAIN}"


def send(
    postfix: Any, members: int, *, chunk: int = 0, xverp: bool = True, progress: Any
) -> dict[str, Any]:
    """One post to every member through ``postfix``, with XVERP in chunks of ``chunk``
    recipients or one copy each; its figures, once checked."""
    from django.test.utils import override_settings

    from listdelivery.models import MailingList, Member, OutgoingMessage
    from listdelivery.runner import OutgoingRunner
    from tests.postfix import POSTSUPER

    flush_tables()
    postfix.reconfigure(postfix.mailboxes, **postfix.parameters)  # empty Maildirs, a fresh log
    mlist = MailingList.objects.create(address=LIST_ADDRESS)
    addresses = [address(i) for i in range(members)]
    Member.objects.bulk_create(Member(mailing_list=mlist, address=a) for a in addresses)
    config = {
        "SMTP_HOST": postfix.host,
        "SMTP_PORT": postfix.port,
        "SMTP_CONNECTIONS": CONNECTIONS,
        "MAX_RECIPIENTS": chunk or 10,
        "VERP_DELIVERY_INTERVAL": 1,
        "VERP_FORMAT": VERP_FORMAT,
        "XVERP": xverp,
        "ENQUEUE_TASKS": False,
    }
    what = f"XVERP, chunks of {chunk}" if xverp else "one copy each"
    progress(f"xverp: {members:,} members, {what}")
    master = postfix._master_pid()
    with override_settings(LISTDELIVERY=config):
        row = enqueue(mlist, 1)
        with Stopwatch(lambda: tree_cpu_seconds(master) if master else None) as watch:
            summary = OutgoingRunner().run()
        seconds = watch.seconds
    released = time.monotonic()
    # Off hold into the deferred queue, which Postfix looks at every queue_run_delay.
    subprocess.run(
        [POSTSUPER, "-c", str(postfix.config_dir), "-H", "ALL"], capture_output=True, check=True
    )
    postfix.wait_for_copies(members, timeout=DELIVERY_TIMEOUT)
    delivery = time.monotonic() - released
    row = OutgoingMessage.objects.get(pk=row.pk)
    check(postfix, addresses, row, what)
    return {
        "max_recipients": config["MAX_RECIPIENTS"] if xverp else None,
        "seconds": round(seconds, 2),
        "transactions": summary.transactions,
        "recipients_per_second": round(members / seconds, 1),
        "postfix_delivery_seconds": round(delivery, 2),
        "client_cpu": watch.client_cpu,
        "sink_cpu": watch.sink_cpu,
    }


def check(postfix: Any, addresses: list[str], row: Any, what: str) -> None:
    """One copy each, its Return-Path that member's VERP'd address, and the post delivered."""
    from listdelivery import verp
    from listdelivery.models import OutgoingMessage

    copies = postfix.copies()
    if copies != dict.fromkeys(addresses, 1):
        missing = len(set(addresses) - set(copies))
        twice = sum(1 for count in copies.values() if count > 1)
        raise CorrectnessError(
            f"xverp, {what}: {missing} members got no copy, {twice} more than one\n"
            + postfix.log_tail()
        )
    bounces = LIST_ADDRESS.partition("@")[0] + "-bounces"
    for member in addresses:
        (copy,) = postfix.messages(member)
        first_line = copy.split(b"\n", 1)[0].decode()  # Postfix's virtual writes Return-Path first
        return_path = first_line.removeprefix("Return-Path: ").strip("<>")
        if verp.decode(return_path, VERP_FORMAT, bounces=bounces) != member:
            raise CorrectnessError(f"xverp, {what}: {member}'s copy returns to {return_path!r}")
    if row.status != OutgoingMessage.Status.DELIVERED:
        raise CorrectnessError(f"xverp, {what}: the post ended {row.status}: {row.last_error}")
