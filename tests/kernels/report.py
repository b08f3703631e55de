#!/usr/bin/env python3
"""Checks the kernel matrix's console logs and writes docs/kernels.md.

Usage: report.py --write docs/kernels.md LABEL=LOG [LABEL=LOG ...]

Each LOG is the serial console of one guest running tests/kernels/init.
Fails (exit 1) when a case did not finish, a command failed, or a figure
is wrong:
  - TCP: with the tcp family on eBPF, the 3 000 000 bytes sent to port 5000
    must be counted exactly (received by the server end), and so must the
    1 234 567 bytes of a connection still open at the collection (counted
    by the socket walk);
  - retransmits: with tcp on eBPF, under the iptables rule that drops every
    20th segment to port 5003, Perch's `perch.tcp.retransmits` (all peers:
    no other connection loses anything) must be within 2 % of the guest's
    Tcp RetransSegs delta (more than 20), and the 2 000 000 bytes sent
    through the loss must be counted exactly;
  - context switches: with sched on eBPF, Perch's count must lie between
    the /proc/stat ctxt movement during the workloads (inside the window)
    and the movement from before perch starts to after it exits;
  - run-queue latency: with sched on eBPF, at least one sample per wake-up
    of the 10 000 pipe round trips (2 per round trip);
  - drops: with drops on eBPF, each of the 1 000 UDP datagrams to a closed
    port (the guest's Udp NoPorts must move by exactly that) and each
    segment the loss rule dropped (its own packet counter) must be counted:
    as `no_socket` and `netfilter_drop` where the kernel gives reasons, else
    together as `unknown` with `network.type` `ipv4` (kernels before 5.17),
    at least once (those kernels also pass frees that are not drops);
  - BTF: without BTF no family may run on tp_btf, and with the kernel's own
    BTF handed over as a file the plan must equal the plan with BTF.
"""

import json
import re
import sys

EBPF_FAMILIES = ["sched", "softirq", "tcp", "drops"]
CASES = ["base", "collect", "no-tracefs", "no-btf", "btf-file"]
TCP_BYTES = 3_000_000
OPEN_BYTES = 1_234_567
LOSS_BYTES = 2_000_000
ROUND_TRIPS = 10_000
DATAGRAMS = 1_000


def cases(text):
    out = {}
    for name in CASES:
        m = re.search(
            r"PERCH-CASE-BEGIN %s\n(.*?)PERCH-CASE-END %s rc=(\d+)\n" % (name, name),
            text,
            re.S,
        )
        if not m:
            raise SystemExit(f"case {name} did not finish")
        body, rc = m.group(1), int(m.group(2))
        stderr = "\n".join(re.findall(r"PERCH-STDERR (.*)", text[m.end():].split("PERCH-CASE-BEGIN")[0]))
        if rc != 0:
            raise SystemExit(f"case {name}: perch exited {rc}: {stderr}")
        out[name] = json.loads(body[body.index("{"):])
    return out


def plan(doc):
    return {f["family"]: f for f in doc["plan"]["families"]}


def cell(f):
    return f"{f['source']} ({f['hook']})" if f["hook"] else f["source"]


def points(snap, name):
    return [p for m in snap["metrics"] if m["name"] == name for p in m["points"]]


def received(snap, port):
    """Bytes Perch counted received by the server end of `port`."""
    return sum(
        p["value"]
        for p in points(snap, "perch.tcp.io")
        if p["attributes"].get("server.port") == port
        and p["attributes"].get("perch.tcp.role") == "server"
        and p["attributes"].get("network.io.direction") == "receive"
    )


def check(label, text):
    text = text.replace("\r", "")
    if "PERCH-DONE" not in text:
        raise SystemExit(f"{label}: the guest did not finish (no PERCH-DONE)")
    kernel = re.search(r"PERCH-KERNEL (\S+)", text).group(1)
    c = cases(text)
    errors = []
    rows = []
    for name in ["base", "no-tracefs", "no-btf", "btf-file"]:
        p = plan(c[name])
        rows.append((name, [cell(p[f]) for f in EBPF_FAMILIES]))

    # BTF hidden: no tp_btf; the file restores the plan with BTF.
    for f, e in plan(c["no-btf"]).items():
        if e["hook"] == "tp_btf":
            errors.append(f"no-btf: {f} on tp_btf without BTF")
    with_btf = {f: (e["source"], e["hook"]) for f, e in plan(c["no-tracefs"]).items()}
    from_file = {f: (e["source"], e["hook"]) for f, e in plan(c["btf-file"]).items()}
    if with_btf != from_file:
        errors.append(f"btf-file plan {from_file} != plan with BTF {with_btf}")
    if c["btf-file"]["kernel"].get("btf_source") != "/tmp/vmlinux.btf":
        errors.append("btf-file: kernel.btf_source is not the file")

    # Accuracy in the collect case.
    snap = c["collect"]
    sp = plan(snap)
    figures = []
    c0, c0a, c1a, c1 = map(int, re.search(r"PERCH-CTXT (\d+) (\d+) (\d+) (\d+)", text).groups())
    ended = int(re.search(r"PERCH-WORKLOAD-END (\d+)", text).group(1))
    if snap["time"] < ended + 1:
        errors.append(
            f"the workloads ended at {ended}, after the collection at {snap['time']:.0f}: "
            "raise --duration in tests/kernels/init"
        )
    if sp["sched"]["source"] == "ebpf":
        v = sum(p["value"] for p in points(snap, "perch.cpu.context_switches"))
        # The window contains [c0a, c1a] and lies within [c0, c1].
        figures.append(
            f"context switches: {v} counted; /proc/stat ctxt moved {c1a - c0a} during the "
            f"workloads (inside the window) and {c1 - c0} from before start to after exit"
        )
        if not c1a - c0a <= v <= c1 - c0:
            errors.append(f"context switches {v} outside the ctxt bracket {c1a - c0a}..{c1 - c0}")
        runq = sum(p["count"] for p in points(snap, "perch.scheduler.runqueue.latency"))
        figures.append(
            f"run-queue latency: {runq} samples; the pipe round trips alone woke a task "
            f"{2 * ROUND_TRIPS} times"
        )
        if runq < 2 * ROUND_TRIPS:
            errors.append(f"run-queue samples {runq} < {2 * ROUND_TRIPS} wake-ups")
    else:
        figures.append(f"context switches: sched on {sp['sched']['source']}")
    u0, u1 = map(int, re.search(r"PERCH-NOPORTS (\d+) (\d+)", text).groups())
    if u1 - u0 != DATAGRAMS:
        errors.append(f"Udp NoPorts moved {u1 - u0}, not {DATAGRAMS}")
    if sp["drops"]["source"] == "ebpf":
        drops = points(snap, "perch.network.packet.drops")
        by = {}
        for p in drops:
            a = p["attributes"]
            key = a["perch.drop.reason"] + (f"/{a['network.type']}" if "network.type" in a else "")
            by[key] = by.get(key, 0) + p["value"]
        # No reason on this kernel: every series is `unknown`.
        by_protocol = any(k.startswith("unknown") for k in by)
        nf = int(re.search(r"PERCH-NF-DROPPED (\d+)", text).group(1))
        if by_protocol and not all(k.startswith("unknown") for k in by):
            errors.append(f"drops both with and without reasons: {by}")
        if by_protocol:
            want = [("unknown/ipv4", u1 - u0 + nf)]
        else:
            want = [("no_socket", u1 - u0), ("netfilter_drop", nf)]
        figures.append(
            "drops: "
            + ", ".join(f"{by.get(k, 0)} counted as `{k}`" for k, _ in want)
            + f" (all: {by}); Udp NoPorts moved {u1 - u0} for {DATAGRAMS} datagrams to a "
            f"closed port, and the loss rule dropped {nf} segments"
        )
        for k, floor in want:
            if by.get(k, 0) < floor:
                errors.append(f"drops `{k}` {by.get(k, 0)} < {floor} (NoPorts delta and/or rule)")
    else:
        figures.append(f"drops: on {sp['drops']['source']}")
    moved = int(re.search(r"PERCH-TCP (\d+)", text).group(1))
    if moved != TCP_BYTES:
        errors.append(f"the workload moved {moved} bytes, not {TCP_BYTES}")
    if sp["tcp"]["source"] == "ebpf":
        got = received(snap, 5000)
        figures.append(
            f"TCP: {got} bytes counted received on port 5000; the receiver read {moved}"
        )
        if got != moved:
            errors.append(f"TCP bytes {got} != {moved} read by the receiver")
        held = int(re.search(r"PERCH-TCP-OPEN (\d+)", text).group(1))
        live = received(snap, 5001)
        figures.append(
            f"TCP, connection open at the collection (the socket walk): {live} bytes "
            f"counted on port 5001; the receiver read {held}"
        )
        if live != held or held != OPEN_BYTES:
            errors.append(f"open-connection bytes {live} (receiver {held}, sent {OPEN_BYTES})")
        r0, r1 = map(int, re.search(r"PERCH-RETRANS (\d+) (\d+)", text).groups())
        retrans = sum(p["value"] for p in points(snap, "perch.tcp.retransmits"))
        figures.append(
            f"TCP retransmits under the loss rule (every 20th segment to port 5003 dropped): "
            f"{retrans} counted; Tcp RetransSegs moved {r1 - r0}"
        )
        if r1 - r0 <= 20:
            errors.append(f"the loss rule caused too few retransmits ({r1 - r0}) to compare")
        elif abs(retrans - (r1 - r0)) > 0.02 * (r1 - r0):
            errors.append(f"retransmits {retrans} vs RetransSegs delta {r1 - r0}: more than 2 % apart")
        lossy = int(re.search(r"PERCH-TCP-LOSS (\d+)", text).group(1))
        got_loss = received(snap, 5003)
        figures.append(
            f"TCP through the loss: {got_loss} bytes counted received on port 5003; "
            f"the receiver read {lossy}"
        )
        if got_loss != lossy or lossy != LOSS_BYTES:
            errors.append(f"bytes through the loss {got_loss} (receiver {lossy}, sent {LOSS_BYTES})")
    else:
        figures.append(f"TCP bytes: tcp on {sp['tcp']['source']}")
    for m in re.findall(r"PERCH-INSMOD-FAILED (\S+)", text):
        errors.append(f"insmod {m} failed")
    if "PERCH-IPTABLES-FAILED" in text:
        errors.append("the iptables loss rule could not be added")

    refused = [
        (h["family"], h["hook"], h.get("error", ""))
        for h in c["base"]["kernel"]["hooks"]
        if h["status"] != "ok" and h["family"] in EBPF_FAMILIES
    ]
    return kernel, rows, figures, refused, errors


def main():
    args = sys.argv[1:]
    out = None
    if args[:1] == ["--write"]:
        out, args = args[1], args[2:]
    sections = []
    failed = []
    for a in args:
        label, path = a.split("=", 1)
        kernel, rows, figures, refused, errors = check(label, open(path, errors="replace").read())
        for e in errors:
            failed.append(f"{label}: {e}")
            print(f"FAIL {label}: {e}", file=sys.stderr)
        sections.append((label, kernel, rows, figures, refused, errors))
    doc = [
        "# Kernel matrix",
        "",
        "Written by `cargo xtask kernels` (part of `cargo xtask test`): Debian's own",
        "cloud kernels booted under qemu with an initramfs holding the release",
        "`perch` and busybox (`tests/kernels/init`), checked by",
        "`tests/kernels/report.py`. Cases: `base` (tracefs mounted), `no-tracefs`,",
        "`no-btf` (`/sys/kernel/btf` hidden under a tmpfs), `btf-file` (still hidden,",
        "the kernel's own BTF handed over with `--btf-path`).",
        "",
        "`no-btf` runs after `no-tracefs`, so tracefs is unmounted there too. Without",
        "BTF a 5.10 kernel keeps only softirq on eBPF: `sched_switch` has no",
        "`prev_state` argument before 5.18 and the task's own state is found through",
        "BTF (the classic tracepoint would serve, but needs tracefs); tcp reads",
        "socket structs at offsets only BTF gives; and without BTF Perch cannot tell",
        "that `kfree_skb` has no reason argument before 5.17, so its `raw_tp`",
        "program reads one and the kernel refuses the attach (`EINVAL`). Handing",
        "over a BTF file (`btf-file`, `probes.btf_path`) restores the full plan.",
        "",
        "| kernel | case | " + " | ".join(EBPF_FAMILIES) + " |",
        "|---|---|" + "---|" * len(EBPF_FAMILIES),
    ]
    for label, kernel, rows, *_ in sections:
        for name, cells in rows:
            doc.append(f"| {label}: `{kernel}` | {name} | " + " | ".join(cells) + " |")
    doc.append("")
    for label, kernel, rows, figures, refused, errors in sections:
        doc.append(f"## {label}: `{kernel}`")
        doc.append("")
        doc.append("Accuracy (collect case):")
        doc.append("")
        doc.extend(f"- {f}" for f in figures)
        doc.append("")
        if refused:
            doc.append("Refused variants (base case), with the kernel's reason:")
            doc.append("")
            for fam, hook, err in refused:
                doc.append(f"- {fam} `{hook}`: {err}")
            doc.append("")
        if errors:
            doc.append("**Failures:** " + "; ".join(errors))
            doc.append("")
    text = "\n".join(doc)
    if out:
        open(out, "w").write(text)
    print(text)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
