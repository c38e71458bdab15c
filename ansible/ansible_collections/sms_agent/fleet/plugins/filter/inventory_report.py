"""inventory_report and inventory_table: the pre-wave inventory of playbooks/inventory_report.yml.

inventory_report turns each host's `sms-agent probe` and `sms-agent status --json` results into
one JSON-ready mapping; inventory_table prints it one line per host for people.
"""

import json
import time

from ansible.errors import AnsibleFilterError

_GIB = 1024 ** 3


def _parse(result):
    """(object, error) from a registered command result."""
    if not isinstance(result, dict):
        return None, "not probed (host unreachable or skipped)"
    if result.get("rc") != 0:
        err = (result.get("stderr") or result.get("msg") or "").strip().splitlines()
        return None, "rc %s: %s" % (result.get("rc"), err[-1] if err else "no output")
    try:
        return json.loads(result.get("stdout", "")), None
    except ValueError as e:
        return None, "unreadable output: %s" % e


def inventory_report(hosts, hostvars):
    """{generated_at, hosts: {host: {probe, status, error}}} for the hosts named."""
    out = {}
    for host in hosts:
        hv = hostvars[host] if host in hostvars else {}
        probe, perr = _parse(hv.get("_sms_agent_probe"))
        status, serr = _parse(hv.get("_sms_agent_status"))
        out[host] = {"probe": probe, "status": status, "error": perr, "status_error": serr}
    return {"generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "hosts": out}


def _gib(n):
    return "%.1fG" % (n / _GIB)


def _used(probe):
    """Bytes in use on the filesystems the probe saw (partitions and logical volumes)."""
    used = 0
    for d in probe.get("disks") or []:
        for pv in d.get("physical_volumes") or []:
            used += int(pv.get("used_size") or 0)
    for vg in probe.get("volume_groups") or []:
        for lv in vg.get("logical_volumes") or []:
            used += int(lv.get("used_size") or 0)
    return used


def _row(host, entry):
    p = entry.get("probe")
    st = entry.get("status") or {}
    if st.get("running"):
        agent = st.get("source_id") or st.get("activity") or "running"
    else:
        agent = "not running" if entry.get("status") else "-"
    if not p:
        return [host, "-", "-", "-", "-", "-", "-", "-", "-", "-", agent, entry.get("error") or "no probe"]
    disks = p.get("disks") or []
    size = sum(int(d.get("size") or 0) for d in disks)
    return [
        host,
        p.get("name", ""),
        p.get("ip", ""),
        p.get("os_version", ""),
        p.get("kernel_version", ""),
        p.get("firmware", ""),
        str(p.get("cpu_quantity", "")),
        _gib(int(p.get("memory") or 0)),
        "%d / %s" % (len(disks), _gib(size)),
        _gib(_used(p)),
        agent,
        "",
    ]


HEADER = ["HOST", "NAME", "IP", "OS", "KERNEL", "FIRMWARE", "CPUS", "MEMORY", "DISKS", "USED",
          "SOURCE ID", "PROBLEM"]


def inventory_table(report):
    """The report as aligned text columns, one host a line, then a count."""
    if not isinstance(report, dict) or "hosts" not in report:
        raise AnsibleFilterError("inventory_table needs the output of inventory_report")
    rows = [HEADER] + [_row(h, e) for h, e in sorted(report["hosts"].items())]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    ok = sum(1 for e in report["hosts"].values() if e.get("probe"))
    lines.append("")
    lines.append("%d hosts, %d probed, %d not (generated %s)"
                 % (len(rows) - 1, ok, len(rows) - 1 - ok, report.get("generated_at", "")))
    return "\n".join(lines) + "\n"


class FilterModule:
    """The inventory report filters."""

    def filters(self):
        return {"inventory_report": inventory_report, "inventory_table": inventory_table}
